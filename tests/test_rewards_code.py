"""Code reward and its sandbox: passing, failing and hostile programs.

Every attack must score 0, return within its deadline and leave no process.
"""

import os
import socket
import sys
import tempfile
import threading
import time

import pytest

from r1jax.rewards import code, extract_code, run_tests, sandbox_info
from r1jax.rewards import sandbox as sb
from tests.sandbox_programs import ATTACKS, BOTH_KINDS, VALUE_ONLY

# Sandbox runs are checked for leftover processes system-wide (any sandbox uid):
# one xdist worker runs them all, so no worker sees another's live sandbox.
pytestmark = pytest.mark.xdist_group("sandbox")


LIMITS = sb.SandboxLimits(wall_s=2.0, cpu_s=2, memory_mb=256)
# Every fork of this (JAX, multithreaded) test process that would run Python
# in the child: os.fork() and subprocess's preexec_fn path run this hook. The
# count is the guard: JAX's fork RuntimeWarning is raised inside such a hook,
# where an error is only reported, not propagated.
_PYTHON_FORKS = []
os.register_at_fork(before=lambda: _PYTHON_FORKS.append(threading.get_ident()))
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def _completion(program: str) -> str:
  return f"<think>write it</think>\n```python\n{program}\n```"


def _leftovers() -> list[int]:
  """Processes of any sandbox uid, or in a session started by a sandbox run."""
  return sb.processes_of(uid_range=(sb.UID_BASE, sb.UID_BASE + sb.UID_SPAN))


@pytest.fixture(autouse=True)
def _no_process_left_behind():
  yield
  assert _leftovers() == []


def test_sandbox_mode_is_reported():
  info = sandbox_info()
  assert info.mode in ("isolated", "userns") and info.network == "netns"
  if os.geteuid() == 0:
    assert info.mode == "isolated", "root with namespaces should get full isolation"


def test_correct_partial_and_binary():
  good = _completion("def add(a, b):\n  return a + b")
  assert code(good, {"tests": ADD_TESTS}, limits=LIMITS) == 1.0
  half = _completion("def add(a, b):\n  return a + b if a >= 0 else 7")
  assert code(half, {"tests": ADD_TESTS}, limits=LIMITS) == pytest.approx(2 / 3)
  assert code(half, {"tests": ADD_TESTS}, limits=LIMITS, binary=True) == 0.0
  assert code("<think>x</think> no code", {"tests": ADD_TESTS}) == 0.0
  with pytest.raises(ValueError, match="tests"):
    code(good, {"tests": "assert add(1, 2) == 3"})


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_caller_is_never_forked_with_threads_alive():
  """The trainer is multithreaded (XLA pools): Python in a forked copy of it can
  deadlock, so neither a run nor its deadline cleanup may fork it."""
  import jax.numpy as jnp
  jnp.ones(2).block_until_ready()  # XLA threads up, JAX's fork warning armed
  stop = threading.Event()
  thread = threading.Thread(target=stop.wait, daemon=True)
  thread.start()
  before = len(_PYTHON_FORKS)
  try:
    good = _completion("def add(a, b):\n  return a + b")
    assert code(good, {"tests": ADD_TESTS}, limits=LIMITS) == 1.0
    sleeper = _completion("import os, time\nos.fork()\ntime.sleep(100)")
    quick = sb.SandboxLimits(wall_s=0.5)
    assert code(sleeper, {"tests": ADD_TESTS[:1]}, limits=quick) == 0.0  # killed
    info = sb.SandboxInfo("restricted", "audit_hook", "same_uid", sys.executable)
    run = sb.run_job("import time\ntime.sleep(100)", "exec", "pass", quick, info=info)
    assert run.status == "timeout"
  finally:
    stop.set()
    thread.join()
  assert len(_PYTHON_FORKS) == before


def test_deadline_fallback_through_the_keeper(monkeypatch):
  """Where PID 1 cannot be signalled from here, the keeper's SIGTERM handler
  kills it, and the namespace is still empty when `run_job` returns."""
  if sandbox_info().mode != "isolated":
    pytest.skip("isolated mode only")
  monkeypatch.setattr(sb, "_kill_pid1", lambda keeper: False)
  program = "import os, time\nif os.fork() == 0:\n  os.setsid()\ntime.sleep(100)"
  run = sb.run_job(program, "exec", "pass", sb.SandboxLimits(wall_s=0.5))
  assert run.status == "timeout" and run.wall_s < 2.0


def test_extraction_takes_last_python_block_after_thinking():
  text = ("<think>```python\ndef add(a, b): return 0\n```</think>"
          "```python\ndef add(a, b): return 1\n```\n```cpp\nint x;\n```\n"
          "```py\ndef add(a, b): return a + b\n```\ntrailing words")
  assert extract_code(text) == "def add(a, b): return a + b\n"
  assert extract_code("<think>```python\ndef f(): pass\n```</think> none") is None
  assert extract_code("<think>never closed ```python\nx=1\n```") is None


def test_value_and_statement_tests():
  program = ("import collections\n"
             "def freq(s):\n  return collections.Counter(s)\n"
             "def pair(a):\n  return collections.namedtuple('P', 'x y')(a, a)\n"
             "def big():\n  return 3 ** 5000\n"
             "def half():\n  return 0.5\n"
             "def none():\n  return None\n")
  tests = ["assert freq('aab') == {'a': 2, 'b': 1}", "assert pair(1) == (1, 1)",
           f"assert big() == {3 ** 5000}", "assert half() < 1", "assert 0.5 == half()",
           "assert none() is None", "assert 'b' in freq('ab')",
           "x = freq('aa')\nassert x['a'] == 2", "assert sorted(freq('ba')) == ['a', 'b']"]
  outcomes = run_tests(program, tests, LIMITS)
  assert [o.passed for o in outcomes] == [True] * len(tests)
  wrong = run_tests(program, ["assert half() == 0.25", "assert none() is not None"], LIMITS)
  assert [(o.passed, o.status) for o in wrong] == [(False, "wrong"), (False, "wrong")]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_scores_zero_within_deadline(name):
  tests = BOTH_KINDS[:1] if name in VALUE_ONLY else BOTH_KINDS
  start = time.monotonic()
  score = code(_completion(ATTACKS[name]), {"tests": tests}, limits=LIMITS)
  elapsed = time.monotonic() - start
  assert score == 0.0
  assert elapsed < len(tests) * LIMITS.wall_s + 1.5


def test_network_is_unreachable():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    program = ("import socket\ndef add(a, b):\n"
               f"  socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
               "  return a + b")
    assert code(_completion(program), {"tests": ADD_TESTS[:1]}, limits=LIMITS) == 0.0
    with pytest.raises(socket.timeout):
      server.accept()


def test_reading_outside_is_allowed_writing_is_not():
  readable = "def add(a, b):\n  return a + b if open('/etc/passwd').read() else None"
  assert code(_completion(readable), {"tests": ADD_TESTS[:1]}, limits=LIMITS) == 1.0
  # A directory the caller owns (not world-writable), and the shared /tmp.
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(__file__))) as owned:
    os.chmod(owned, 0o755)
    for target in (os.path.join(owned, "pwned"), os.path.join(tempfile.gettempdir(), "r1jax_pwned")):
      program = (f"open({target!r}, 'w').write('x')\n"
                 "def add(a, b):\n  return a + b")
      assert code(_completion(program), {"tests": ADD_TESTS[:1]}, limits=LIMITS) == 0.0
      assert not os.path.exists(target)


def test_own_directory_is_writable_and_fresh():
  program = ("import os\nassert os.listdir('.') == []\nopen('scratch', 'w').write('ok')\n"
             "def add(a, b):\n  return a + b if open('scratch').read() == 'ok' else 0")
  assert code(_completion(program), {"tests": ADD_TESTS}, limits=LIMITS) == 1.0


def test_restricted_mode_blocks_what_namespaces_would():
  """The fallback for machines without privilege: the audit hook does the work."""
  info = sb.SandboxInfo("restricted", "audit_hook", "same_uid", sys.executable)
  ok = sb.run_job("def add(a, b):\n  return a + b", "eval", "add(1, 2)", LIMITS, info=info)
  assert (ok.status, ok.payload) == ("ok", '["i","0x3"]')
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(__file__))) as owned:
    target = os.path.join(owned, "pwned")
    for program in ["import socket\nsocket.socket()", "import os\nos.fork()",
                    "import os\nos.kill(os.getppid(), 9)", "import subprocess\nsubprocess.run(['true'])",
                    f"open({target!r}, 'w')", f"import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)",
                    "import sys\nsys._getframe(1)"]:
      run = sb.run_job(program, "exec", "pass", LIMITS, info=info)
      assert run.status == "failed", program
    assert not os.path.exists(target)
