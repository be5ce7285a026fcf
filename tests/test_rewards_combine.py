"""Reward specs, the weighted sum, and the evaluator's killable pool."""

import os
import pathlib
import tempfile
import threading
import time

import numpy as np
import pytest

from r1jax.rewards import BOUNDS, REWARDS, RewardEvaluator, RewardSpec, make_reward_fn
from r1jax.rewards import sandbox as sb

# Sandbox runs are checked for leftover processes system-wide (any sandbox uid):
# one xdist worker runs them all, so no worker sees another's live sandbox.
pytestmark = pytest.mark.xdist_group("sandbox")


GOOD = "<think>add them</think>\nThe answer is \\boxed{3}."
EXAMPLE = {"answer": "3", "language": "en"}
# sympy evaluates this power tower eagerly, in C: only killing the worker stops it.
HANG = "<think>hmm</think>\\boxed{9^{9^{9^{9}}}}"
# Forks of this (JAX, multithreaded) test process that would run Python in the
# child: os.fork() and subprocess's preexec_fn path run this hook.
_PYTHON_FORKS = []
os.register_at_fork(before=lambda: _PYTHON_FORKS.append(threading.get_ident()))


def test_spec_validation_is_early_and_clear():
  with pytest.raises(ValueError, match="known rewards: .*accuracy"):
    RewardSpec.create([("acuracy", 1.0)])
  with pytest.raises(ValueError, match="unknown options \\['mod'\\]"):
    RewardSpec.create([("format", 1.0, {"mod": "r1"})])
  with pytest.raises(ValueError, match="twice"):
    RewardSpec.create([("format", 1.0), ("format", 2.0)])
  with pytest.raises(ValueError, match="non-finite"):
    RewardSpec.create({"format": float("nan")})
  with pytest.raises(ValueError, match="at least one"):
    RewardSpec.create([])
  spec = RewardSpec.create({"accuracy": 1.0, "format": 0.5})
  assert [t.name for t in spec.terms] == ["accuracy", "format"]
  assert set(REWARDS) >= {"accuracy", "format", "language", "code", "overlong",
                          "cosine_accuracy", "repetition"}


def test_weighted_sum_in_process():
  fn = make_reward_fn(RewardSpec.create([("accuracy", 1.0), ("format", 0.5, {"mode": "r1"}),
                                         ("language", 0.25)]))
  assert fn(GOOD, EXAMPLE) == pytest.approx(1.75)
  assert fn("no", EXAMPLE) == pytest.approx(0.25)


def test_evaluator_survives_hangs_and_errors():
  spec = RewardSpec.create([("accuracy", 1.0), ("language", 1.0)], timeout_s=1.0,
                           num_workers=2)
  completions = [GOOD, HANG, GOOD, "<think>wrong guess</think>\\boxed{4}"]
  examples = [EXAMPLE, EXAMPLE, {"answer": "3"}, EXAMPLE]  # third: no language -> error
  with RewardEvaluator(spec) as evaluator:
    start = time.monotonic()
    rewards, per_reward, metrics = evaluator(completions, examples)
    assert time.monotonic() - start < 6.0
    np.testing.assert_allclose(per_reward["accuracy"], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(per_reward["language"], [1.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(rewards, [2.0, 1.0, 1.0, 1.0])
    assert metrics["reward/accuracy/timeouts"] == 1.0
    assert metrics["reward/language/errors"] == 1.0
    assert metrics["reward/timeouts"] == 1.0 and metrics["reward/errors"] == 1.0
    assert metrics["reward/wall_s"] > 0
    # The pool was repaired: the next batch runs normally.
    rewards, _, metrics = evaluator([GOOD] * 3, [EXAMPLE] * 3)
    np.testing.assert_allclose(rewards, [2.0] * 3)
    assert metrics["reward/timeouts"] == 0.0
  with pytest.raises(RuntimeError, match="closed"):
    evaluator([GOOD], [EXAMPLE])


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_killed_worker_leaves_no_sandbox_behind():
  spec = RewardSpec.create([("code", 1.0, {"limits": sb.SandboxLimits(wall_s=30.0, cpu_s=30)})],
                           timeout_s=1.5, num_workers=1)
  sleeper = "<think>x</think>```python\nimport time\ntime.sleep(10**6)\n```"
  forks = len(_PYTHON_FORKS)
  with RewardEvaluator(spec) as evaluator:
    pid = evaluator._workers[0].proc.pid
    rewards, _, metrics = evaluator([sleeper], [{"tests": ["assert f() == 1"]}])
  assert rewards.tolist() == [0.0] and metrics["reward/timeouts"] == 1.0
  deadline = time.monotonic() + 3.0
  while time.monotonic() < deadline and sb.processes_of(
      uid_range=(sb.UID_BASE, sb.UID_BASE + sb.UID_SPAN)):
    time.sleep(0.05)
  assert sb.processes_of(uid_range=(sb.UID_BASE, sb.UID_BASE + sb.UID_SPAN)) == []
  assert not list(pathlib.Path(tempfile.gettempdir()).glob(f"r1jax_sbx_{pid}_*"))
  # Workers and their replacement come from the forkserver, never a fork of us.
  assert len(_PYTHON_FORKS) == forks


def test_length_mismatch_is_an_error():
  with RewardEvaluator(RewardSpec.create({"format": 1.0}, num_workers=1)) as evaluator:
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
      evaluator(["a", "b"], [{}])
    rewards, per_reward, _ = evaluator([], [])
    assert rewards.shape == (0,) and per_reward["format"].shape == (0,)


def test_bounds_are_declared_and_checked_early():
  terms = {t.name: t for t in RewardSpec.create(
      [("accuracy", 1.0, {"format_score": 0.1}), ("overlong", 1.0), ("repetition", 2.0),
       ("cosine_accuracy", 1.0, {"wrong": (-10.0, 0.0), "exceed": -10.0}),
       ("format", -1.0)]).terms}
  assert terms["accuracy"].bounds() == (0.0, 1.0)
  assert terms["overlong"].bounds() == (-1.0, 0.0)
  assert terms["repetition"].bounds() == (-1.0, 0.0)
  assert terms["cosine_accuracy"].bounds() == (-10.0, 1.0)
  # The worst value minimises weight × value: the top of the range for a negative weight.
  assert [terms[n].worst() for n in ("accuracy", "overlong", "cosine_accuracy", "format")] == [
      0.0, -1.0, -10.0, 1.0]
  assert set(BOUNDS) == set(REWARDS)
  with pytest.raises(ValueError, match="repetition.*range"):
    RewardSpec.create([("repetition", 1.0, {"max_penalty": 0.5})])


# A penalty's best value is 0: a completion that breaks it must not escape it.
TOKENS = {"answer": "3", "language": "en", "completion_tokens": 10}


def test_errors_and_timeouts_score_the_worst_value():
  spec = RewardSpec.create([("overlong", 1.0), ("cosine_accuracy", 1.0), ("repetition", 0.5),
                            ("language", -0.5)], timeout_s=1.0, num_workers=2)
  completions = [GOOD, GOOD, HANG]
  examples = [TOKENS, EXAMPLE, TOKENS]  # row 1 lacks completion_tokens: the shaping terms raise
  examples[2] = {k: v for k, v in TOKENS.items() if k != "language"}  # language raises
  with RewardEvaluator(spec) as evaluator:
    rewards, per_reward, metrics = evaluator(completions, examples)
  assert "KeyError" in evaluator.last_error["overlong"]
  assert "completion_tokens" in evaluator.last_error["overlong"]
  np.testing.assert_allclose(per_reward["overlong"], [0.0, -1.0, 0.0])
  # Row 2 hangs math-verify inside cosine_accuracy: a timeout, worst = -1.
  assert per_reward["cosine_accuracy"][0] > 0.9
  np.testing.assert_allclose(per_reward["cosine_accuracy"][1:], [-1.0, -1.0])
  np.testing.assert_allclose(per_reward["repetition"], [0.0, 0.0, 0.0])
  np.testing.assert_allclose(per_reward["language"], [1.0, 1.0, 1.0])  # weight < 0: worst = 1
  np.testing.assert_allclose(rewards, [per_reward["cosine_accuracy"][0] - 0.5, -2.5, -1.5])
  assert metrics["reward/overlong/errors"] == 1.0
  assert metrics["reward/cosine_accuracy/errors"] == 1.0
  assert metrics["reward/cosine_accuracy/timeouts"] == 1.0
  assert metrics["reward/language/errors"] == 1.0
  assert metrics["reward/errors"] == 3.0 and metrics["reward/timeouts"] == 1.0
