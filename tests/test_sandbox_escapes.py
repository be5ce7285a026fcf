"""The code sandbox against escapes, as root and as an unprivileged user.

`sandbox_attacks.py` runs every attack in a child process: as root (the
"isolated" mode), as uid 65534 (the "userns" mode a non-root trainer gets),
and as uid 65534 with namespaces forced off and the unsafe mode opted into
("restricted"). Each attack must score 0 *and* have no effect seen from
outside: no file written, no connection, no process left.
"""

import json
import os
import secrets
import subprocess
import sys
import tempfile

import pytest

from r1jax.rewards import RewardSpec, code, sandbox_info
from r1jax.rewards import sandbox as sb
from tests.sandbox_programs import ATTACKS as CLASSICS
from tests.sandbox_programs import BOTH_KINDS

# Sandbox runs are checked for leftover processes system-wide (any sandbox uid):
# one xdist worker runs them all, so no worker sees another's live sandbox.
pytestmark = pytest.mark.xdist_group("sandbox")


_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_attacks.py")
NOBODY = 65534
ATTACKS = ["fork_exec", "dir_fd_write", "dir_fd_proc_read", "ctypes_system", "ctypes_execve",
           "posix_spawn", "execv", "write_outside_python", "mknod_outside", "network_python",
           "network_unhooked", "proc_read_other", "fork_bomb", "sleeping_children",
           "killed_worker"]
CONTROLS = ["control_fork_exec", "control_spawn_python", "control_private_proc"]
# mode -> (uid to run as, opt into the unsafe mode, namespaces forced off)
MODES = {"isolated": (None, False, False), "userns": (NOBODY, False, False),
         "restricted": (NOBODY, True, True)}
WALL_S = 1.0
GOOD = "<think>x</think>\n```python\ndef add(a, b):\n  return a + b\n```"


@pytest.fixture(scope="module")
def results():
  """mode -> the driver's report; the three drivers run side by side."""
  if os.geteuid() != 0:
    pytest.skip("needs root, to run the attacks both as root and as uid 65534")
  runs, dirs = {}, []
  for mode, (uid, unsafe, no_ns) in MODES.items():
    # World-writable, so only the sandbox stands between the run and it.
    workspace = tempfile.mkdtemp(prefix="r1jax_attack_")
    os.chmod(workspace, 0o777)
    if uid is not None:
      os.chown(workspace, uid, uid)
    dirs.append(workspace)
    marker = "r1jaxmark" + secrets.token_hex(8)
    env = {"PATH": "/usr/bin:/bin", "R1JAX_ATTACK_MARKER": marker}
    if no_ns:
      env[sb.NO_NAMESPACES_ENV] = "1"
    spec = {"uid": uid, "allow_unsafe": unsafe, "wall_s": WALL_S, "workspace": workspace,
            "marker": marker, "classics": uid is not None}
    runs[mode] = subprocess.Popen([sys.executable, _DRIVER, json.dumps(spec)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
  reports = {}
  for mode, proc in runs.items():
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
      if b"SandboxUnavailable" in err and mode == "userns":
        reports[mode] = None  # no user namespaces here: nothing to attack
        continue
      raise AssertionError(f"{mode} driver failed:\n{err.decode()[-3000:]}")
    reports[mode] = json.loads(out.splitlines()[-1])
  for workspace in dirs:
    for name in os.listdir(workspace):
      os.remove(os.path.join(workspace, name))
    os.rmdir(workspace)
  return reports


def _report(results, mode):
  report = results[mode]
  if report is None:
    pytest.skip(f"{mode}: unprivileged user namespaces are not available here")
  assert report["mode"] == mode
  return report


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", ATTACKS)
def test_attack_fails_and_leaves_no_trace(results, mode, name):
  run = _report(results, mode)[name]
  assert run["score"] == 0.0
  assert run["effects"] == []
  assert run["wall_s"] < WALL_S + 1.5


@pytest.mark.parametrize("mode", ["userns", "restricted"])
@pytest.mark.parametrize("name", sorted(CLASSICS))
def test_classic_attack_as_non_root(results, mode, name):
  """test_rewards_code.py's attacks (run there as root), as uid 65534."""
  run = _report(results, mode)["classic_" + name]
  assert run["score"] == 0.0
  assert run["effects"] == []
  assert run["wall_s"] < len(BOTH_KINDS) * WALL_S + 1.5


@pytest.mark.parametrize("mode", ["isolated", "userns"])
def test_controls_pass(results, mode):
  """The same tools work inside the sandbox (exec, a fresh interpreter, a
  private /proc): the attacks above fail because of the walls, not a typo."""
  report = _report(results, mode)
  assert {name: report[name]["score"] for name in CONTROLS} == dict.fromkeys(CONTROLS, 1.0)
  classics = {"classic_" + name for name in CLASSICS} if mode == "userns" else set()
  assert set(report) == {"mode", *ATTACKS, *CONTROLS, *classics}


@pytest.fixture
def no_namespaces(monkeypatch):
  """The probe reports no namespace mode (as on a machine without userns)."""
  monkeypatch.setenv(sb.NO_NAMESPACES_ENV, "1")
  sb._safe_mode.cache_clear()
  yield
  monkeypatch.delenv(sb.NO_NAMESPACES_ENV)
  sb._safe_mode.cache_clear()


def test_refuses_without_namespaces_unless_opted_in(no_namespaces):
  tests = {"tests": ["assert add(1, 2) == 3"]}
  for completion in (GOOD, "no code at all"):
    with pytest.raises(sb.SandboxUnavailable) as refused:
      code(completion, tests)
  message = str(refused.value)
  assert "\n" not in message and "allow_unsafe_sandbox=True" in message
  with pytest.raises(sb.SandboxUnavailable):
    sb.run_job("x = 1", "exec", "pass")
  # Opting in runs the unsafe mode, through the reward's config kwargs.
  spec = RewardSpec.create([("code", 1.0, {"allow_unsafe_sandbox": True})])
  assert code(GOOD, tests, **spec.terms[0].kwargs) == 1.0
  assert sandbox_info(allow_unsafe=True).mode == "restricted"


def test_a_run_with_code_rewards_refuses_before_it_starts(no_namespaces):
  """The refusal comes at validation and when the evaluator is built, as one line
  naming the opt-in key, not as worst-value scores counted during training."""
  from r1jax.pipeline import validate
  from r1jax.rewards import RewardEvaluator, RewardSpec
  from tests.experiment_loader import load_config
  spec = RewardSpec.create([("code", 1.0)])
  with pytest.raises(sb.SandboxUnavailable, match=sb.UNSAFE_OPTION):
    RewardEvaluator(spec)
  c = load_config("experiments/r1_zero/tiny.py")
  with c.unlocked():
    c.stages.grpo.rewards = (("code", 1.0),)
  with pytest.raises(validate.ConfigError, match=rf"^stages\.grpo: code sandbox: .*"
                                                 rf"{sb.UNSAFE_OPTION}=True") as e:
    validate.validate(c, n_devices=8)
  assert "\n" not in str(e.value)
  with c.unlocked():
    c.stages.grpo.rewards = (("code", 1.0, {sb.UNSAFE_OPTION: True}),)
  validate.validate(c, n_devices=8)
