"""Attack driver for test_sandbox_escapes.py: runs every attack in one process.

Usage: python tests/sandbox_attacks.py '<json spec>'; prints one JSON line
{attack: {"score", "wall_s", "effects"}}. Started as root; with "uid" set it
drops to that uid first, so the sandbox is the one a non-root trainer gets.
It is a child subreaper: whatever a run leaves behind, setsid or not, ends up
as its child, so "no child left" means "no process of the run left".

Only stdlib plus sandbox.py/code.py/text.py are loaded (the r1jax packages
are stubbed): the driver stays single-threaded for its os.fork, and starts
fast. Every attack's `add` returns the right answer only if its hack worked,
and each effect is also checked from outside (files, listener, processes).
"""

import ctypes
import json
import os
import pathlib
import signal
import socket
import sys
import time
import types

_ROOT = pathlib.Path(__file__).resolve().parent.parent
for _name, _path in (("r1jax", _ROOT / "r1jax"), ("r1jax.rewards", _ROOT / "r1jax/rewards")):
  _module = types.ModuleType(_name)
  _module.__path__ = [str(_path)]
  sys.modules[_name] = _module
sys.path.insert(0, str(_ROOT / "tests"))
import sandbox_programs  # noqa: E402
from r1jax.rewards import code as code_reward  # noqa: E402
from r1jax.rewards import sandbox as sb  # noqa: E402

TEST = ["assert add(1, 2) == 3"]
_TIME_BURNERS = {"infinite_loop", "sleep_forever", "fork_bomb", "huge_output", "memory_creep"}

# Runs a shell command by fork+exec in C, the way no audit event reports.
_FORK_EXEC = '''
import _posixsubprocess, os
def sh(cmd):
  r, w = os.pipe()
  pid = _posixsubprocess.fork_exec(
      [b"/bin/sh", b"-c", cmd.encode()], [b"/bin/sh"], True, (w,), None, None,
      -1, -1, -1, -1, -1, -1, r, w, False, False, -1, None, None, None, -1, None, False)
  os.close(w); os.read(r, 64); os.close(r)
  os.waitpid(pid, 0)
'''
_SPAWN = '''
import os
def sh(cmd):
  pid = os.posix_spawn("/bin/sh", ["sh", "-c", cmd], {"PATH": "/usr/bin:/bin"})
  os.waitpid(pid, 0)
'''


def attacks(w: str, tmp: str, port: int, host_pid: int, marker: str) -> dict[str, str]:
  """name -> program. `w`: a directory the trainer's uid may write; `tmp`: a
  path prefix in the shared /tmp; `host_pid`: a process outside the sandbox
  whose environment holds `marker`."""
  touch = f"echo x > {w}/{{0}}; echo x > {tmp}_{{0}}; rm -f {w}/victim"
  def done(name):  # right only where the file written outside can be seen
    return (f"import os\ndef add(a, b):\n"
            f"  return a + b if os.path.exists({w + '/' + name!r}) else 0\n")
  net = (f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
         f".sendall(b'{marker}')")
  return {
      # The two confirmed escapes of the old restricted mode.
      "fork_exec": _FORK_EXEC + f"sh({touch.format('fork_exec')!r})\n" + done("fork_exec"),
      "dir_fd_write": (f"import os\nfd = os.open({w!r}, os.O_RDONLY)\n"
                       "os.close(os.open('dir_fd', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))\n"
                       "os.remove('victim', dir_fd=fd)\n" + done("dir_fd")),
      "dir_fd_proc_read": ("import os\nfd = os.open('/proc', os.O_RDONLY)\n"
                           f"env = os.open('{host_pid}/environ', os.O_RDONLY, dir_fd=fd)\n"
                           "data = os.read(env, 1 << 16)\n"
                           f"def add(a, b):\n  return a + b if b'{marker}' in data else 0\n"),
      "ctypes_system": ("import ctypes\nctypes.CDLL(None).system("
                        f"{touch.format('ctypes_system')!r}.encode())\n" + done("ctypes_system")),
      "ctypes_execve": ("import ctypes\nlibc = ctypes.CDLL(None)\n"
                        "argv = (ctypes.c_char_p * 4)(b'/bin/sh', b'-c', "
                        f"{touch.format('ctypes_execve')!r}.encode(), None)\n"
                        "libc.execve(b'/bin/sh', argv, None)\n" + done("ctypes_execve")),
      "posix_spawn": _SPAWN + f"sh({touch.format('posix_spawn')!r})\n" + done("posix_spawn"),
      "execv": f"import os\nos.execv('/bin/sh', ['sh', '-c', {touch.format('execv')!r}])\n",
      "write_outside_python": (f"open({w + '/python'!r}, 'w').write('x')\n"
                               f"open({tmp + '_python'!r}, 'w').write('x')\n"
                               f"import os\nos.remove({w + '/victim'!r})\n" + done("python")),
      # No audit event reports these: in the unsafe mode only Landlock stops them.
      "mknod_outside": (f"import os\nos.mkfifo({w + '/fifo'!r})\nos.mknod({w + '/node'!r})\n"
                        + done("fifo")),
      "network_python": f"{net}\ndef add(a, b):\n  return a + b\n",
      # A fresh interpreter has no audit hook: only the namespaces stop it.
      "network_unhooked": _SPAWN + f"sh({'/usr/bin/python3 -c ' + repr(net)!r})\n"
                          "def add(a, b):\n  return 0\n",
      "proc_read_other": _SPAWN + f"sh('cat /proc/{host_pid}/environ > env; ls /proc > ls')\n"
                         "data = open('env', 'rb').read() + open('ls', 'rb').read()\n"
                         f"def add(a, b):\n  return a + b if b'{marker}' in data or "
                         f"b'{host_pid}' in data.split() else 0\n",
      "fork_bomb": "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n",
      "sleeping_children": (
          "import os, time\n"
          "if os.fork() == 0:\n  os.setsid()\n  time.sleep(10**6)\n"
          + _SPAWN + "sh('setsid /usr/bin/python3 -c \"import time; time.sleep(10**6)\" "
          f"{marker} &')\n"
          "def add(a, b):\n  return 0\n"),
  }


# Must score 1 where exec works (the namespace modes): they show the attacks
# above fail because of the sandbox, not because their code is broken.
CONTROLS = {
    "control_fork_exec": _FORK_EXEC + "sh('echo ok > here')\n"
                         "def add(a, b):\n"
                         "  return a + b if open('here').read() == 'ok\\n' else 0\n",
    "control_spawn_python": _SPAWN + "sh('/usr/bin/python3 -c \"print(6 * 7)\" > p')\n"
                            "def add(a, b):\n"
                            "  return a + b if open('p').read() == '42\\n' else 0\n",
    # The fresh /proc holds the sandbox's own processes only.
    "control_private_proc": ("import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
                             "def add(a, b):\n"
                             "  return a + b if os.getpid() == 1 and len(pids) <= 3 else 0\n"),
}


def _live_children() -> list[int]:
  """Live children of this process (orphans of a run land here: subreaper)."""
  while True:
    try:
      if os.waitpid(-1, os.WNOHANG)[0] == 0:
        break
    except ChildProcessError:
      break
  pid, live = os.getpid(), []
  for task in os.listdir(f"/proc/{pid}/task"):
    with open(f"/proc/{pid}/task/{task}/children") as f:
      live += [int(c) for c in f.read().split()]
  return live


def _marked(marker: str) -> list[int]:
  found = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        if marker.encode() in f.read():
          found.append(int(entry))
    except (OSError, ValueError):
      pass
  return found


def _effects(w: str, tmp: str, server: socket.socket, marker: str) -> list[str]:
  seen = []
  extra = sorted(set(os.listdir(w)) - {"victim"})
  if extra or not os.path.exists(os.path.join(w, "victim")):
    seen.append(f"files in {w}: {sorted(os.listdir(w))}")
  directory, prefix = os.path.split(tmp)
  seen += [f"created /tmp/{n}" for n in os.listdir(directory) if n.startswith(prefix)]
  try:
    conn, _ = server.accept()
    conn.close()
    seen.append("listener got a connection")
  except BlockingIOError:
    pass
  deadline = time.monotonic() + 1.0  # PDEATHSIG kills are asynchronous
  while (left := _live_children() + [p for p in _marked(marker) if p != os.getpid()]) \
      and time.monotonic() < deadline:
    time.sleep(0.02)
  if left:
    seen.append(f"processes left: {left}")
    for pid in left:
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass
  # A clean slate for the next attack.
  for name in os.listdir(w):
    os.remove(os.path.join(w, name))
  for name in os.listdir(directory):
    if name.startswith(prefix):
      os.remove(os.path.join(directory, name))
  return seen


def _killed_worker(info: sb.SandboxInfo, marker: str) -> list[str]:
  """A reward worker SIGKILLed mid-job (the evaluator's per-call timeout)."""
  program = ("import os, time\n"
             + ("" if info.mode == "restricted" else
                "if os.fork() == 0:\n  os.setsid()\n  time.sleep(10**6)\n")
             + "time.sleep(10**6)\n")
  pid = os.fork()
  if pid == 0:  # the "worker": single-threaded, so forking here is safe
    try:
      sb.run_job(program, "exec", "pass", sb.SandboxLimits(wall_s=60.0, cpu_s=60), info=info)
    finally:
      os._exit(0)
  # worker -> harness (restricted), or worker -> keeper -> PID 1 -> child.
  wanted = 1 if info.mode == "restricted" else 3
  deadline = time.monotonic() + 5.0
  while time.monotonic() < deadline and len(_descendants(pid)) < wanted:
    time.sleep(0.02)
  time.sleep(0.2)  # the candidate's code is sleeping by now
  os.kill(pid, signal.SIGKILL)
  os.waitpid(pid, 0)
  sb.remove_workdirs(pid)  # as the evaluator does for a worker it killed
  deadline = time.monotonic() + 2.0
  while (left := _live_children()) and time.monotonic() < deadline:
    time.sleep(0.02)
  return [f"processes left: {left}"] if left else []


def _descendants(pid: int) -> list[int]:
  found, todo = [], [pid]
  while todo:
    p = todo.pop()
    try:
      with open(f"/proc/{p}/task/{p}/children") as f:
        kids = [int(c) for c in f.read().split()]
    except OSError:
      continue
    found += kids
    todo += kids
  return found


def main() -> None:
  spec = json.loads(sys.argv[1])
  libc = ctypes.CDLL(None, use_errno=True)
  if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    raise OSError(ctypes.get_errno(), "subreaper")
  if spec["uid"] is not None:
    os.setgroups([])
    os.setresgid(spec["uid"], spec["uid"], spec["uid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    # The uid change made it non-dumpable; a trainer is not: its /proc files
    # are open to its own uid, the mark for proc_read_other.
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
  info = sb.sandbox_info(allow_unsafe=spec["allow_unsafe"])
  limits = sb.SandboxLimits(wall_s=spec["wall_s"], cpu_s=2, memory_mb=256)
  w, marker = spec["workspace"], spec["marker"]
  tmp = os.path.join("/tmp", marker)
  results = {"mode": info.mode}
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    # This process is the one to spy on: its environment holds the marker.
    assert os.environ.get("R1JAX_ATTACK_MARKER") == marker
    programs = attacks(w, tmp, server.getsockname()[1], os.getpid(), marker)
    tests = dict.fromkeys(programs, TEST)
    if info.namespaced:
      programs.update(CONTROLS)
      tests.update(dict.fromkeys(CONTROLS, TEST))
    if spec["classics"]:  # test_rewards_code.py's attacks, run there as root
      for name, program in sandbox_programs.ATTACKS.items():
        programs["classic_" + name] = program
        kinds = sandbox_programs.BOTH_KINDS
        # One test is enough for what only burns time (it is killed either way).
        one = name in sandbox_programs.VALUE_ONLY or name in _TIME_BURNERS
        tests["classic_" + name] = kinds[:1] if one else kinds
    for name, program in programs.items():
      pathlib.Path(w, "victim").write_text("keep me")
      start = time.monotonic()
      completion = f"<think>x</think>\n```python\n{program}\n```"
      score = code_reward.code(completion, {"tests": tests[name]}, limits=limits,
                               allow_unsafe_sandbox=spec["allow_unsafe"])
      results[name] = {"score": score, "wall_s": round(time.monotonic() - start, 3),
                       "effects": _effects(w, tmp, server, marker)}
  start = time.monotonic()
  results["killed_worker"] = {"score": 0.0, "effects": _killed_worker(info, marker),
                              "wall_s": round(time.monotonic() - start, 3)}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
