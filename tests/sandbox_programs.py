"""Hostile programs for the code reward, shared by test_rewards_code.py (as
root, in-process) and sandbox_attacks.py (as an unprivileged user).

Standard library only: the attack driver loads it without the r1jax stack.
"""

# Each program would "pass" the add tests if the hack worked; each must get 0.
ATTACKS = {
    "infinite_loop": "while True:\n  pass",
    "sleep_forever": "import time\ntime.sleep(10**6)",
    "fork_bomb": "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass",
    "memory_bomb": "x = bytearray(8 * 1024**3)\ndef add(a, b):\n  return a + b",
    "memory_creep": "x = []\nwhile True:\n  x.append(' ' * 10**7)",
    "disk_filler": ("i = 0\nwhile True:\n  open(f'f{i}', 'wb').write(b'x' * 10**6)\n  i += 1"),
    "sys_exit_before_tests": "import sys\nsys.exit(0)",
    "os_exit_before_tests": "import os\nos._exit(0)",
    "exit_in_function": "import os\ndef add(a, b):\n  os._exit(0)",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos._exit(0)",
    "kill_everything": "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "always_equal": ("class E:\n  def __eq__(self, o):\n    return True\n"
                     "def add(a, b):\n  return E()"),
    "int_subclass_eq": ("class I(int):\n  def __eq__(self, o):\n    return True\n"
                        "def add(a, b):\n  return I(0)"),
    "patch_assertion_error": ("import builtins\nclass N(Exception): pass\n"
                              "builtins.AssertionError = N\ndef add(a, b):\n  return 0"),
    "fake_output": ("import sys\nprint('3 passed')\nsys.stdout.write('OK\\n' * 100)\n"
                    "def add(a, b):\n  return 0"),
    "patch_harness_io": ("import os, json\nos.write = lambda fd, b: len(b)\n"
                         "json.dumps = lambda *a, **k: '[\"i\", \"0x3\"]'\n"
                         "def add(a, b):\n  return 0"),
    "steal_nonce_frames": ("import sys\nf = sys._getframe(1)\nnonce = f.f_locals['nonce']\n"
                           "import os\nos.write(f.f_locals['result_fd'], nonce + b' null')\nos._exit(0)"),
    "steal_nonce_gc": ("import gc\nfor o in gc.get_objects():\n  pass\n"
                       "def add(a, b):\n  return 0"),
    "steal_nonce_signal": ("import signal\nsignal.signal(signal.SIGALRM, lambda s, f: None)\n"
                           "def add(a, b):\n  return 0"),
    "steal_nonce_proc_mem": ("open('/proc/self/mem', 'rb')\ndef add(a, b):\n  return 0"),
    "steal_nonce_traceback": ("import sys\ntry:\n  raise ValueError\nexcept ValueError as e:\n"
                              "  fr = e.__traceback__.tb_frame\ndef add(a, b):\n  return 0"),
    "trace_hook": ("import sys\nsys.settrace(lambda *a: None)\ndef add(a, b):\n  return 0"),
    "ctypes": ("import ctypes\ndef add(a, b):\n  return 0"),
    "atexit_exit": ("import atexit, os\natexit.register(lambda: os._exit(0))\n"
                    "def add(a, b):\n  return 0"),
    "forged_result_fd": ("import os\nfor fd in range(3, 64):\n  try:\n"
                         "    os.write(fd, b'0' * 32 + b' null')\n  except OSError:\n    pass\n"
                         "def add(a, b):\n  return 0"),
    "huge_output": ("import os, sys\nfor _ in range(2000):\n  sys.stdout.write('x' * 100000)\n"
                    "  sys.stderr.write('y' * 100000)\n"
                    "  for fd in range(3, 16):\n    try:\n      os.write(fd, b'z' * 65536)\n"
                    "    except OSError:\n      pass\n"),
    "background_child": ("import os, time\nif os.fork() == 0:\n  os.setsid()\n  time.sleep(10**6)\n"
                         "def add(a, b):\n  return 0"),
}


# A value test and a statement test: the statement test is the one a forged
# harness report would pass (e.g. steal_nonce_frames without the audit hook).
BOTH_KINDS = ["assert add(1, 2) == 3", "x = add(1, 2)\nassert x == 3"]
# Rigged __eq__ passes a *statement* test by design (see code.py); value tests
# are the defence, so these attacks get the value test only.
VALUE_ONLY = {"always_equal", "int_subclass_eq"}
