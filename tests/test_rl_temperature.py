"""The trainer's log-probs follow the sampling temperature (and see top-k/top-p truncation).

π_old (recomputed), π_θ (the loss) and π_ref are softmax(logits / T) at the
sampler's T, so at the first update the ratio against the sampler's own
record is 1. With top-k/top-p, the trainer cuts its distribution the same way
for the mismatch metric, and reports the truncation gap apart.

Glossary: B completions, P prompt slots, N new tokens, L = P + N.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from r1jax.model import ModelConfig, init_params
from r1jax.rl.rollout import sample
from r1jax.rl.step import GRPOConfig, GRPOStep, reward_from_fn
from r1jax.rl.update import completion_layout, make_loss_fn
from r1jax.train.optim import OptimConfig

B, P, N = 4, 6, 6
PAD = 0
TEMPERATURE = 0.7
OCFG = OptimConfig(warmup_steps=1, total_steps=10)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
  return ModelConfig.tiny(n_layers=1, n_dense_layers=0, mtp_depth=0)


@pytest.fixture(scope="module")
def params(cfg):
  return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))


def _step(cfg, **sampling) -> GRPOStep:
  gcfg = GRPOConfig(group_size=2, prompts_per_step=B // 2, max_prompt_len=P, max_new_tokens=N,
                    n_minibatches=1, beta=0.01, temperature=TEMPERATURE, **sampling)
  return GRPOStep(cfg, gcfg, OCFG, reward_from_fn(lambda c, e: 0.0), decode=str, eos_id=None,
                  pad_id=PAD)


def _rollout(cfg, params, **sampling):
  """(the sampler's Rollout, the trainer's [B, L] layout of it)."""
  rng = np.random.default_rng(0)
  lengths_B = rng.integers(2, P + 1, B)
  prompts_BxP = np.full((B, P), PAD, np.int32)
  for b, n in enumerate(lengths_B):
    prompts_BxP[b, P - n:] = rng.integers(1, cfg.vocab_size, n)
  ro = jax.device_get(sample(cfg, params, prompts_BxP, lengths_B, max_new_tokens=N,
                             rng=jax.random.key(1), temperature=TEMPERATURE, eos_id=None,
                             pad_id=PAD, **sampling))
  tokens, positions, valid = completion_layout(prompts_BxP, lengths_B, ro.tokens, ro.mask)
  return ro, dict(tokens=tokens, positions=positions, valid=valid, mask=ro.mask)


def test_trainer_logprobs_are_the_samplers_at_its_temperature(cfg, params):
  step = _step(cfg)
  ro, batch = _rollout(cfg, params)
  out = step._logprob_fn(params, params, batch)
  old_BxN, ref_BxN = np.asarray(out[0]), np.asarray(out[1])
  m = ro.mask
  # Without truncation the sampler's distribution is softmax(logits / T) itself.
  np.testing.assert_allclose(old_BxN[m], ro.logprobs[m], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(ref_BxN, old_BxN)
  assert np.abs(old_BxN[m] - ro.model_logprobs[m]).max() > 1e-2  # T = 1 is another policy

  # The loss's π_θ is at the same temperature: against the sampler's record the
  # ratio starts at 1 (the step's own loss options carry T).
  loss_fn = make_loss_fn(cfg, **dict(step.gcfg.loss_options()))
  mb = dict(batch, old_logp=ro.logprobs, ref_logp=ro.logprobs,
            advantages=np.array([1.0, -1.0, 0.5, -0.5], np.float32))
  _, metrics = jax.jit(loss_fn)(params, mb, jax.random.key(0))
  assert abs(float(metrics["ratio_min"]) - 1) < 1e-4
  assert abs(float(metrics["ratio_max"]) - 1) < 1e-4
  assert abs(float(metrics["kl"])) < 1e-6


def test_mismatch_sees_top_k_top_p_truncation(cfg, params):
  sampling = dict(top_k=40, top_p=0.8)
  step = _step(cfg, **sampling)
  ro, batch = _rollout(cfg, params, **sampling)
  old, _, sampled = step._logprob_fn(params, None, batch)
  old_BxN, sampled_BxN, m = np.asarray(old), np.asarray(sampled), ro.mask
  # Cut the same way, the trainer's π_old is the distribution the sampler drew from.
  np.testing.assert_allclose(sampled_BxN[m], ro.logprobs[m], atol=1e-5, rtol=0)
  # Untruncated, π_old puts less mass on each kept token: the gap is −log(kept mass).
  gap = ro.logprobs[m] - old_BxN[m]
  assert gap.min() > -1e-5 and gap.max() > 1e-2
  metrics = step._mismatch(old_BxN, sampled_BxN, ro.logprobs, m)
  assert metrics["logp_mismatch/max"] <= 1e-5
  assert metrics["logp_mismatch/outside_frac"] == 0.0
  np.testing.assert_allclose(metrics["logp_truncation/mean"], gap.mean(), rtol=1e-5)

  # The step's batch records the sampler's own log-probs (temperature and cut).
  data, _, _ = step._collect(params, iter([{"prompt_ids": [5, 6, 7]}] * 8), jax.random.key(2))
  lay = completion_layout(data["prompts"], data["prompt_lengths"], data["tokens"], data["mask"])
  got = step._logprob_fn(params, None, dict(zip(("tokens", "positions", "valid"), lay),
                                            mask=data["mask"]))[2]
  np.testing.assert_allclose(np.asarray(got)[data["mask"]], data["sampler_logp"][data["mask"]],
                             atol=1e-5, rtol=0)
