"""The GRPO step on the tiny model: log-probs vs the sampler, learning, dynamic sampling, sharding.

Every step test shares one (Q, G, P, N) bucket and one loss/optimizer setting,
so the rollout, log-prob and update programs compile once (the sharded test
compiles its own). The learnable reward counts completion tokens with an id
below half the vocabulary: about 1/2 at initialisation, 1 when learnt.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from r1jax.model import logical_axes
from r1jax.parallel.mesh import logical_sharding, make_mesh
from r1jax.rl import grpo
from r1jax.rl.step import GRPOConfig, GRPOStep, reward_from_fn
from r1jax.rl.update import completion_layout, training_arrays
from r1jax.train.optim import OptimConfig

G, Q, P, N = 4, 4, 8, 8
PAD = 0
GCFG = GRPOConfig(group_size=G, prompts_per_step=Q, max_prompt_len=P, max_new_tokens=N,
                  num_iterations=2, n_minibatches=2, beta=0.01, ref_reset_every=8, tis_cap=2.0)
# A high learning rate: the test has a dozen steps, not thousands.
OCFG = OptimConfig(learning_rate=3e-2, warmup_steps=1, total_steps=100, weight_decay=0.0)


def ids_text(ids: list[int]) -> str:
  return " ".join(map(str, ids))


def low_id_fraction(completion: str, example) -> float:
  ids = [int(t) for t in completion.split()]
  return float(np.mean([t < 256 for t in ids])) if ids else 0.0


def examples(seed: int):
  """Endless random prompts of 3..8 tokens (no pad id inside)."""
  rng = np.random.default_rng(seed)
  while True:
    yield {"prompt_ids": rng.integers(1, 512, rng.integers(3, P + 1)).tolist(), "answer": ""}


def make_step(cfg, gcfg=GCFG, reward=low_id_fraction, **kw) -> GRPOStep:
  return GRPOStep(cfg, gcfg, OCFG, reward_from_fn(reward, "low_ids"), decode=ids_text,
                  eos_id=kw.pop("eos_id", None), pad_id=PAD, **kw)


@pytest.fixture(scope="module")
def grpo_step(tiny_cfg) -> GRPOStep:
  return make_step(tiny_cfg)


@pytest.fixture(scope="module")
def params(tiny_params):
  # Committed to a device like the step's own state, so the sampler and the
  # log-prob program compile once for both.
  return jax.device_put(tiny_params, jax.devices()[0])


# ----------------------------------------------------------------------------
# Host-side pieces.

def test_completion_layout_and_loss_mask():
  prompts = np.array([[0, 0, 5, 6], [7, 8, 9, 10]], np.int32)
  tokens = np.array([[11, 3, 0], [12, 13, 14]], np.int32)  # row 0 stopped at EOS = 3
  mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  tok, pos, valid = completion_layout(prompts, np.array([2, 4]), tokens, mask)
  np.testing.assert_array_equal(tok[0], [0, 0, 5, 6, 11, 3, 0])
  np.testing.assert_array_equal(pos, [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]])
  np.testing.assert_array_equal(valid, [[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
  batch = dict(prompts=prompts, prompt_lengths=np.array([2, 4]), tokens=tokens, mask=mask,
               finished=np.array([True, False]))
  kept = training_arrays(batch, np.array([1.0, -1.0]), mask_truncated=False)
  np.testing.assert_array_equal(kept["mask"], mask)
  dropped = training_arrays(batch, np.array([1.0, -1.0]), mask_truncated=True)
  np.testing.assert_array_equal(dropped["mask"], [[1, 1, 0], [0, 0, 0]])  # row 1 never ended
  np.testing.assert_array_equal(dropped["valid"], valid)  # it still runs through the model


def test_config_errors(tiny_cfg):
  with pytest.raises(ValueError, match="unknown KL estimator 'kl'"):
    GRPOConfig(kl_estimator="kl")
  with pytest.raises(ValueError, match="unknown aggregation"):
    GRPOConfig(aggregation="sum")
  with pytest.raises(ValueError, match="unknown advantage scale"):
    GRPOConfig(advantage_scale="rank")
  with pytest.raises(ValueError, match="n_minibatches=3 must divide"):
    GRPOConfig(group_size=4, prompts_per_step=4, n_minibatches=3)
  with pytest.raises(ValueError, match="temperature"):
    GRPOConfig(temperature=0.0)
  with pytest.raises(ValueError, match="mask_truncated needs an eos_id"):
    make_step(tiny_cfg, dataclasses.replace(GCFG, mask_truncated=True))
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
    make_step(tiny_cfg, dataclasses.replace(GCFG, max_new_tokens=tiny_cfg.max_seq_len))
  with pytest.raises(ValueError, match="not divisible by the 8 data-parallel devices"):
    make_step(tiny_cfg, dataclasses.replace(GCFG, n_minibatches=4), mesh=make_mesh((8, 1, 1, 1)))


def test_bad_examples_are_errors(grpo_step, params):
  long = iter([{"prompt_ids": list(range(1, P + 2))}] * Q)
  with pytest.raises(ValueError, match="max_prompt_len=8"):
    grpo_step._collect(params, long, jax.random.key(0))
  with pytest.raises(ValueError, match="no `encode`"):
    grpo_step._collect(params, iter([{"prompt": "2+2"}] * Q), jax.random.key(0))
  with pytest.raises(ValueError, match="ran out"):
    grpo_step._collect(params, iter([{"prompt_ids": [1]}]), jax.random.key(0))


# ----------------------------------------------------------------------------
# On the tiny model.

def test_trainer_logprobs_match_the_sampler(grpo_step, params):
  """The teacher-forced recomputation of π_old equals the sampler's record (f32)."""
  batch, _, _ = grpo_step._collect(params, examples(1), jax.random.key(3))
  data = training_arrays(batch, np.zeros(Q * G), mask_truncated=False)
  b = GCFG.minibatch_size
  for k in range(GCFG.n_minibatches):
    rows = slice(k * b, (k + 1) * b)
    chunk = {key: data[key][rows] for key in ("tokens", "positions", "valid", "mask")}
    old, ref, _ = grpo_step._logprob_fn(params, params, chunk)
    m = batch["mask"][rows]
    np.testing.assert_allclose(np.asarray(old)[m], batch["sampler_logp"][rows][m], atol=1e-4,
                               rtol=0)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(old))


def test_grpo_steps_raise_the_reward(tiny_cfg, grpo_step, params):
  state = grpo_step.init_state(params)
  data, rng = examples(0), jax.random.key(1)
  curve, history = [], []
  for _ in range(12):
    state, m = grpo_step(state, data, rng)
    curve.append(m["reward/mean"])
    history.append(m)
  print("reward curve:", np.round(curve, 3).tolist())
  assert np.mean(curve[-3:]) > np.mean(curve[:3]) + 0.2, curve
  assert int(state.step) == 12
  m = history[0]
  for key in ("reward/low_ids/mean", "reward/low_ids/std", "response_len/mean",
              "response_len/max", "truncation_rate", "entropy", "kl", "clip_frac_low",
              "clip_frac_high", "ratio_min", "ratio_mean", "ratio_max", "advantage_mean",
              "zero_adv_group_frac", "logp_mismatch/mean", "rollout_tokens_per_s",
              "train_tokens_per_s", "time/rollout_s", "time/reward_s", "time/train_s",
              "grad_norm", "max_vio", "lr"):
    assert np.isfinite(m[key]), key
  assert m["truncation_rate"] == 1.0  # no EOS: every completion runs to N
  # π_old is the current policy: the first minibatch starts at ratio 1, and the
  # recomputation matches the sampler to f32 rounding.
  assert all(h["logp_mismatch/max"] <= 1e-4 for h in history)
  # So truncated importance sampling weighs every token ~1 and caps none.
  assert all(abs(h["tis_weight_mean"] - 1) < 1e-4 and h["tis/capped_frac"] == 0 for h in history)
  # 4 updates per step, reference reset every 8 updates: after steps 2, 4, ...
  assert [i + 1 for i, h in enumerate(history) if "ref_reset" in h] == [2, 4, 6, 8, 10, 12]
  # The routers' bias moved by the sign rule only (whole multiples of γ).
  bias = np.asarray(state.params["moe_layers"]["moe"]["router"]["bias"])
  units = bias / tiny_cfg.bias_update_rate
  assert np.abs(units).max() > 0
  np.testing.assert_allclose(units, np.round(units), atol=1e-3)


def first_token_low(completion: str, example) -> float:
  # Binary and rare (~1/4 at initialisation): about a third of the groups of 4 tie at 0.
  return float(completion.split()[0] in {str(i) for i in range(64)})


def test_dynamic_sampling_keeps_only_informative_groups(tiny_cfg, params):
  gcfg = dataclasses.replace(GCFG, dynamic_sampling=True, max_retries=8)
  step = make_step(tiny_cfg, gcfg, first_token_low)
  state, m = step(step.init_state(params), examples(2), jax.random.key(4))
  assert m["zero_adv_group_frac/sampled"] > 0  # there was something to drop
  assert m["dynamic/rounds"] > 1
  assert m["dynamic/informative_groups"] == Q
  assert m["zero_adv_group_frac"] == 0.0  # the trained batch holds no tied group


def test_retry_cap_tops_up_with_tied_groups(tiny_cfg, params):
  gcfg = dataclasses.replace(GCFG, dynamic_sampling=True, max_retries=2)
  step = make_step(tiny_cfg, gcfg, lambda c, e: 0.0)
  batch, rounds, stats = step._collect(params, examples(3), jax.random.key(5))
  assert len(rounds) == 3 and stats["dynamic/informative_groups"] == 0
  assert batch["tokens"].shape == (Q * G, N)  # the shape, hence the compiled step, is kept
  adv = grpo.group_advantages(batch["rewards"], G)
  assert float(grpo.zero_advantage_fraction(adv, G)) == 1.0


def test_sharded_step_matches_single_device(tiny_cfg, grpo_step, params):
  mesh = make_mesh((2, 2, 2, 1))  # batch over data×fsdp×expert; params by their logical axes
  sharded = make_step(tiny_cfg, mesh=mesh)
  state, m = sharded(sharded.init_state(params), examples(6), jax.random.key(7))
  _, want = grpo_step(grpo_step.init_state(params), examples(6), jax.random.key(7))
  assert m["reward/mean"] == want["reward/mean"]  # the same completions were sampled
  for key in ("loss", "kl", "entropy", "ratio_mean", "grad_norm"):
    assert m[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), key
  expected = logical_sharding(mesh, logical_axes(tiny_cfg))
  for got, spec in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
    assert got.sharding.is_equivalent_to(spec, got.ndim)
  assert len(state.params["embed"]["embedding"].sharding.device_set) == 8
