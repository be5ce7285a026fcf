"""Every registered reward on the production path: task generators → GRPOStep → RewardEvaluator.

The examples are what the task generators and JSONL readers produce plus the
"prompt_ids" the prompt pipeline adds; the rollout adds "completion_tokens".
A random tiny model never writes a well-formed answer, so the reward function
handed to GRPOStep wraps each sampled text in the R1-Zero template around the
reference answer before the evaluator scores it; the examples pass untouched.
"""

from __future__ import annotations

import json
import math
import random
import types

import jax
import numpy as np
import pytest

from r1jax.data.tasks import arithmetic, countdown, read_code, read_math
from r1jax.model import ModelConfig, init_params
from r1jax.rewards import REWARDS, RewardEvaluator, RewardSpec
from r1jax.rewards import sandbox as sb
from r1jax.rewards import text as text_lib
from r1jax.rl import step as step_lib
from r1jax.rl.step import GRPOConfig, GRPOStep
from r1jax.train.optim import OptimConfig

# Sandbox runs are checked for leftover processes system-wide (any sandbox uid):
# one xdist worker runs them all, so no worker sees another's live sandbox.
pytestmark = pytest.mark.xdist_group("sandbox")


G, Q, P, N = 2, 3, 16, 8
PAD = 0
GCFG = GRPOConfig(group_size=G, prompts_per_step=Q, max_prompt_len=P, max_new_tokens=N,
                  n_minibatches=1, beta=0.0)
OCFG = OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10, weight_decay=0.0)
LIMITS = sb.SandboxLimits(wall_s=5.0, cpu_s=5, memory_mb=256)
# Every registered reward, split by what the examples carry: "answer" or "tests".
MATH_TERMS = [("accuracy", 1.0), ("format", 0.5), ("language", 0.1),
              ("overlong", 1.0, {"max_len": 6, "cache_len": 4}),
              ("cosine_accuracy", 1.0, {"max_len": N}), ("repetition", 0.5),
              ("preference", 0.5)]
CODE_TERMS = [("code", 1.0, {"limits": LIMITS}), ("format", 0.5), ("language", 0.1),
              ("overlong", 1.0), ("repetition", 0.5)]
SOLUTION = "def add(a, b):\n  return a + b"


def ids_text(ids: list[int]) -> str:
  return " ".join(f"t{t}" for t in ids)


def with_prompt_ids(example: dict) -> dict:
  """What r1jax.data.pipelines.prompt_examples adds: the encoded prompt."""
  ids = [1 + b % 511 for b in example["question"].encode()][:P]
  return {**example, "prompt_ids": ids}


def well_formed(text: str, example: dict) -> str:
  """An R1-Zero completion: the sampled text as reasoning, the reference as the answer."""
  answer = f"```python\n{SOLUTION}\n```" if "tests" in example else example["answer"]
  return f"<think>{example.get('cot', 'work')} {text}</think>\n<answer>{answer}</answer>"


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> dict[str, list[dict]]:
  d = tmp_path_factory.mktemp("jsonl")
  (d / "math.jsonl").write_text(json.dumps({"problem": "What is 6 * 7?", "answer": 42}) + "\n")
  (d / "code.jsonl").write_text("".join(json.dumps(
      {"prompt": f"Write add(a, b), version {i}.",
       "tests": ["assert add(1, 2) == 3", f"assert add({i}, 1) == {i + 1}"]}) + "\n"
      for i in range(Q)))
  math_exs = [arithmetic.sample(random.Random(0)), countdown.sample(random.Random(1)),
              read_math(str(d / "math.jsonl"))[0]]
  return {"math": [with_prompt_ids(e) for e in math_exs],
          "code": [with_prompt_ids(e) for e in read_code(str(d / "code.jsonl"))]}


class Recorder:
  """The GRPOStep reward_fn: the evaluator on well-formed texts, every call kept."""

  def __init__(self, evaluator: RewardEvaluator):
    self.evaluator, self.calls = evaluator, []

  def __call__(self, completions, examples):
    out = self.evaluator([well_formed(c, e) for c, e in zip(completions, examples)], examples)
    self.calls.append((list(completions), list(examples), out))
    return out


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
  # One dense layer: the rewards never see the architecture, and the sampler
  # then compiles in a few seconds instead of twenty.
  return ModelConfig.tiny(n_layers=1, n_dense_layers=1, mtp_depth=0)


@pytest.fixture(scope="module")
def params(cfg):
  return jax.device_put(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)),
                        jax.devices()[0])


def rollout(cfg, params, terms, examples):
  """GRPOStep's rollout and rewards for Q `examples`: (spec, recorded calls, step metrics).

  The update half of the step is left out: it compiles for a minute and never
  touches a reward.
  """
  spec = RewardSpec.create(terms, timeout_s=20.0, num_workers=2)
  with RewardEvaluator(spec) as evaluator:
    recorder = Recorder(evaluator)
    step = GRPOStep(cfg, GCFG, OCFG, recorder, decode=ids_text, eos_id=None, pad_id=PAD)
    _, rounds, _ = step._collect(params, iter(examples), jax.random.key(0))
  return spec, recorder.calls, step._rollout_metrics(rounds)


@pytest.fixture(scope="module")
def math_run(cfg, params, examples):
  return rollout(cfg, params, MATH_TERMS, examples["math"])


@pytest.fixture(scope="module")
def code_run(cfg, params, examples):
  return rollout(cfg, params, CODE_TERMS, examples["code"])


def test_every_registered_reward_is_covered():
  assert {t[0] for t in MATH_TERMS + CODE_TERMS} == set(REWARDS)


def test_rollout_gives_each_row_its_completion_tokens(cfg, examples, monkeypatch):
  # A canned sampler: rows that stop at EOS (id 3) and rows cut at N tokens.
  lengths = np.array([3, N, 1, 5, N, 2], np.int32)
  finished = np.array([1, 0, 1, 0, 0, 1], bool)
  tokens = np.where(np.arange(N) < lengths[:, None], 7, PAD).astype(np.int32)
  tokens[np.arange(Q * G), lengths - 1] = np.where(finished, 3, 7)
  mask = np.arange(N) < lengths[:, None]
  logp = np.zeros((Q * G, N), np.float32)
  canned = types.SimpleNamespace(tokens=tokens, mask=mask, finished=finished, lengths=lengths,
                                 logprobs=logp, model_logprobs=logp)
  monkeypatch.setattr(step_lib, "sample", lambda *args, **kwargs: canned)
  calls = []

  def reward_fn(completions, row_examples):
    calls.append((completions, row_examples))
    r = np.zeros(len(completions))
    return r, {"zero": r}, {}

  step = GRPOStep(cfg, GCFG, OCFG, reward_fn, decode=ids_text, eos_id=3, pad_id=PAD)
  step._rollout_round(None, iter(examples["math"]), jax.random.key(0))
  [(completions, row_examples)] = calls
  # EOS is not part of the completion: it is neither decoded nor counted.
  assert [e["completion_tokens"] for e in row_examples] == [2, 8, 0, 5, 8, 1]
  assert [len(c.split()) for c in completions] == [2, 8, 0, 5, 8, 1]
  for i, ex in enumerate(row_examples):
    assert {k: v for k, v in ex.items() if k != "completion_tokens"} == examples["math"][i // G]
  # One dict per row; the prompt's own example is not written to.
  assert len({id(e) for e in row_examples}) == Q * G
  assert all("completion_tokens" not in e for e in examples["math"])


@pytest.mark.parametrize("run", ["math_run", "code_run"])
def test_well_formed_completions_score_in_range_without_errors(run, request):
  spec, calls, metrics = request.getfixturevalue(run)
  [(completions, row_examples, (rewards, per_reward, evaluator_metrics))] = calls
  assert set(per_reward) == {t.name for t in spec.terms}
  errors = {k: v for k, v in metrics.items() if k.endswith(("/errors", "/timeouts")) and v}
  assert not errors, (errors, evaluator_metrics)
  assert all(f"reward/{t.name}/errors" in metrics for t in spec.terms)
  assert [e["completion_tokens"] for e in row_examples] == [len(c.split()) for c in completions]
  for term in spec.terms:
    lo, hi = term.bounds()
    values = per_reward[term.name]
    assert values.shape == (Q * G,)
    assert all(math.isfinite(v) and lo <= v <= hi for v in values), (term.name, values)
  np.testing.assert_allclose(rewards, sum(t.weight * per_reward[t.name] for t in spec.terms))
  # The "aha" count is taken on the completions the rewards saw.
  counts = [text_lib.reflective_words(c) for c in completions]
  assert metrics["reflect/words_per_response"] == pytest.approx(np.mean(counts))
  assert metrics["reflect/rate"] == pytest.approx(np.mean([n > 0 for n in counts]))
  # The reference answers are right, for every task (countdown included).
  key = "code" if run == "code_run" else "accuracy"
  np.testing.assert_array_equal(per_reward[key], 1.0)
  np.testing.assert_array_equal(per_reward["format"], 1.0)
  if run == "math_run":
    # N tokens: past overlong's max_len 6, at cosine_accuracy's max_len (a correct answer's 0.5).
    np.testing.assert_array_equal(per_reward["overlong"], -1.0)
    np.testing.assert_allclose(per_reward["cosine_accuracy"], 0.5)
