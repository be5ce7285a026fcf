"""GRPO's loss: hand-computed advantages, the paper's formula in numpy, gradients, clipping, masks.

Every check here runs on small arrays with no model; the numpy reference is a
loop-by-loop transcription of the objective as the papers write it.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest

from r1jax.rl import grpo

_STATIC = ("eps_low", "eps_high", "beta", "kl_estimator", "aggregation", "max_len", "group_size")
# Jitted: one small compilation per shape and option set beats op-by-op dispatch.
loss_fn = jax.jit(grpo.grpo_loss, static_argnames=_STATIC)
advantages = jax.jit(grpo.group_advantages, static_argnames=("group_size", "scale", "eps"))
kl_per_token = jax.jit(grpo.kl_per_token, static_argnames=("estimator",))


@functools.partial(jax.jit, static_argnames=("opts",))
def _value_and_grad(logp, old, ref, adv, mask, opts=()):
  return jax.value_and_grad(lambda lp: grpo.grpo_loss(lp, old, ref, adv, mask, **dict(opts))[0])(
      logp)


def value_and_grad(logp, old, ref, adv, mask, **opts):
  """(loss, d loss / d logp), jitted per shape and option set."""
  return _value_and_grad(logp, old, ref, adv, mask, tuple(sorted(opts.items())))


# Three groups of G = 4: mixed, tied, spread.
REWARDS = np.array([1, 0, 0, 0, 2, 2, 2, 2, 0, 1, 2, 3], np.float64)


# ----------------------------------------------------------------------------
# Advantages.

def test_group_scale_by_hand():
  # Group 1: mean 1/4, sample std sqrt((0.75² + 3·0.25²)/3) = 1/2.
  # Group 3: mean 3/2, sample std sqrt(5/3).
  want = [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0] + [x / math.sqrt(5 / 3)
                                                for x in (-1.5, -0.5, 0.5, 1.5)]
  got = advantages(REWARDS, 4, scale="group", eps=0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # The default eps only nudges the scale.
  np.testing.assert_allclose(advantages(REWARDS, 4), want, rtol=1e-5)


def test_none_scale_is_centred_rewards():
  want = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -1.5, -0.5, 0.5, 1.5]
  np.testing.assert_allclose(advantages(REWARDS, 4, scale="none"), want, atol=1e-7)


def test_batch_scale_by_hand():
  # All 12 rewards: mean 5/4, Σ(r − mean)² = 49/4, sample std = sqrt(49/44) = 3.5/sqrt(11).
  centred = np.array([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -1.5, -0.5, 0.5, 1.5])
  want = centred * math.sqrt(11) / 3.5
  got = advantages(REWARDS, 4, scale="batch", eps=0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_tied_group_is_exactly_zero():
  # 0.1 · 3 / 3 != 0.1 in floating point; a tied group must still give 0, not residue / eps.
  got = np.asarray(advantages(np.full(4, 0.1), 4))
  assert (got == 0).all()
  assert float(grpo.zero_advantage_fraction(advantages(REWARDS, 4), 4)) == pytest.approx(1 / 3)


def test_advantage_errors():
  with pytest.raises(ValueError, match="unknown advantage scale 'std'"):
    advantages(REWARDS, 4, scale="std")
  with pytest.raises(ValueError, match="divide"):
    advantages(REWARDS, 5)
  with pytest.raises(ValueError, match=">= 2"):
    advantages(REWARDS, 1)


# ----------------------------------------------------------------------------
# The loss against the formula.

def _example(seed: int = 0, B: int = 4, T: int = 6):
  rng = np.random.default_rng(seed)
  logp = rng.uniform(-3, -0.2, (B, T))
  # Ratios spread over [0.6, 1.5], so both clip sides are hit.
  old = logp - np.log(rng.uniform(0.6, 1.5, (B, T)))
  ref = logp + rng.normal(0, 0.3, (B, T))
  adv = np.array([1.3, -0.7, 0.4, -1.1])[:B]
  lengths = np.array([6, 3, 5, 1])[:B]
  mask = np.arange(T)[None] < lengths[:, None]
  return logp, old, ref, adv, mask


def _reference_loss(logp, old, ref, adv, mask, *, eps_low, eps_high, beta, kl, agg, max_len):
  """The papers' objective, one token at a time, in float64; returns −J."""
  B, T = logp.shape
  per_seq, tokens = [], []
  for i in range(B):
    terms = []
    for t in range(T):
      if not mask[i, t]:
        continue
      rho = math.exp(logp[i, t] - old[i, t])
      surrogate = min(rho * adv[i], min(max(rho, 1 - eps_low), 1 + eps_high) * adv[i])
      x = ref[i, t] - logp[i, t]  # log(π_ref / π_θ)
      d_kl = {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - x - 1}[kl]
      terms.append(surrogate - beta * d_kl)
    per_seq.append(terms)
    tokens += terms
  if agg == "seq-mean-token-mean":  # R1: 1/G Σ_i 1/|o_i| Σ_t
    j = sum(sum(s) / len(s) for s in per_seq) / B
  elif agg == "token-mean":  # DAPO: 1/Σ|o_i| Σ_i Σ_t
    j = sum(tokens) / len(tokens)
  else:  # Dr. GRPO: 1/(G · max_len) Σ_i Σ_t
    j = sum(tokens) / (B * max_len)
  return -j


@pytest.mark.parametrize("kl", grpo.KL_ESTIMATORS)
@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_loss_matches_formula(agg, kl):
  logp, old, ref, adv, mask = _example()
  opts = dict(eps_low=0.2, eps_high=0.28, beta=0.04)
  f32 = lambda a: np.asarray(a, np.float32)
  loss, metrics = loss_fn(f32(logp), f32(old), f32(ref), f32(adv), mask, kl_estimator=kl,
                          aggregation=agg, max_len=8, **opts)
  want = _reference_loss(logp, old, ref, adv, mask, kl=kl, agg=agg, max_len=8, **opts)
  assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
  assert float(metrics["loss"]) == float(loss)
  # The KL metric is the token mean of the chosen estimator.
  x = (ref - logp)[mask]
  want_kl = {"k1": -x, "k2": 0.5 * x * x, "k3": np.exp(x) - x - 1}[kl].mean()
  assert float(metrics["kl"]) == pytest.approx(want_kl, rel=1e-5)


def test_ratio_and_advantage_metrics():
  logp, old, ref, adv, mask = _example()
  _, m = loss_fn(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28)
  rho = np.exp(logp - old)[mask]
  assert float(m["ratio_min"]) == pytest.approx(rho.min(), rel=1e-5)
  assert float(m["ratio_max"]) == pytest.approx(rho.max(), rel=1e-5)
  assert float(m["ratio_mean"]) == pytest.approx(rho.mean(), rel=1e-5)
  assert float(m["advantage_mean"]) == pytest.approx(adv.mean(), rel=1e-6)
  assert float(m["tokens"]) == mask.sum()
  a = np.broadcast_to(adv[:, None], mask.shape)[mask]
  assert float(m["clip_frac_low"]) == pytest.approx(np.mean((rho < 0.8) & (a < 0)))
  assert float(m["clip_frac_high"]) == pytest.approx(np.mean((rho > 1.28) & (a > 0)))
  assert 0 < float(m["clip_frac_low"]) and 0 < float(m["clip_frac_high"])


# ----------------------------------------------------------------------------
# Gradients and clipping.

def _grad_wrt_logp(ratio, adv, **kw):
  """d(loss)/d(logp) for one token per sequence at the given ratios."""
  old = np.zeros((len(ratio), 1), np.float32)
  logp = np.log(np.asarray(ratio, np.float32))[:, None]
  mask = np.ones((len(ratio), 1), bool)
  return np.asarray(value_and_grad(logp, old, None, np.asarray(adv, np.float32), mask,
                                   **kw)[1])[:, 0]


def test_positive_advantage_raises_logp():
  g = _grad_wrt_logp([1.0, 1.0, 1.0], [2.0, -2.0, 0.0])
  # Gradient descent moves logp by −g: up for A > 0, down for A < 0, not at all for A = 0.
  assert g[0] < 0 < g[1] and g[2] == 0


def test_clipped_side_has_zero_gradient():
  # Symmetric ε = 0.2: A > 0 past 1.2 and A < 0 below 0.8 are clipped ...
  g = _grad_wrt_logp([1.3, 0.7, 1.3, 0.7], [1.0, -1.0, -1.0, 1.0])
  assert g[0] == 0 and g[1] == 0
  # ... while the other side keeps the unclipped (pessimistic) gradient ρ·A.
  assert g[2] == pytest.approx(1.3 / 4, rel=1e-5) and g[3] == pytest.approx(-0.7 / 4, rel=1e-5)


def test_clip_higher_is_asymmetric():
  ratios, adv = [1.25, 0.78], [1.0, -1.0]
  sym = _grad_wrt_logp(ratios, adv, eps_low=0.2, eps_high=0.2)
  dapo = _grad_wrt_logp(ratios, adv, eps_low=0.2, eps_high=0.28)
  assert sym[0] == 0 and dapo[0] != 0  # 1.25 is inside the raised upper bound
  assert sym[1] == 0 and dapo[1] == 0  # the lower bound did not move


# ----------------------------------------------------------------------------
# Masks, options, errors.

def test_padding_contributes_nothing():
  logp, old, ref, adv, mask = _example()
  # Cut to 3 tokens vs the same rows padded with garbage to 6.
  short = dict(logp=logp[:, :3], old=old[:, :3], ref=ref[:, :3], mask=mask[:, :3])
  long_mask = mask & (np.arange(6) < 3)[None]
  lp = np.where(long_mask, logp, np.nan)
  o = np.where(long_mask, old, 1e4)
  r = np.where(long_mask, ref, -np.inf)
  for agg in ("seq-mean-token-mean", "token-mean"):
    want, g_want = value_and_grad(short["logp"], short["old"], short["ref"], adv, short["mask"],
                                  beta=0.1, aggregation=agg)
    got, g_got = value_and_grad(lp, o, r, adv, long_mask, beta=0.1, aggregation=agg)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    np.testing.assert_allclose(g_got[:, :3], g_want, rtol=1e-6)
    assert (np.asarray(g_got[:, 3:]) == 0).all()


def test_empty_sequence_is_left_out_of_the_sequence_mean():
  logp, old, ref, adv, mask = _example()
  empty = mask.copy()
  empty[3] = False
  got = loss_fn(logp, old, None, adv, empty)[0]
  want = loss_fn(logp[:3], old[:3], None, adv[:3], mask[:3])[0]
  assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_zero_advantage_group_fraction_metric():
  adv = advantages(REWARDS, 4)
  ones = np.ones((12, 2), bool)
  z = np.zeros((12, 2), np.float32)
  assert float(loss_fn(z, z, None, adv, ones, group_size=4)[1]["zero_adv_frac"]) == \
      pytest.approx(1 / 3)
  assert float(loss_fn(z, z, None, adv, ones)[1]["zero_adv_frac"]) == pytest.approx(4 / 12)


def test_tis_weights_scale_the_surrogate_and_entropy_is_reported():
  logp, old, ref, adv, mask = (np.asarray(a, np.float32) for a in _example())
  w = np.full(logp.shape, 0.5, np.float32)
  ent = np.arange(logp.size, dtype=np.float32).reshape(logp.shape)
  base, _ = loss_fn(logp, old, None, adv, mask.astype(bool))
  half, m = loss_fn(logp, old, None, adv, mask.astype(bool), tis_weights_BxT=w, entropy_BxT=ent)
  assert float(half) == pytest.approx(0.5 * float(base), rel=1e-6)
  assert float(m["tis_weight_mean"]) == pytest.approx(0.5)
  assert float(m["entropy"]) == pytest.approx(float(ent[mask.astype(bool)].mean()))


def test_k2_k3_are_nonnegative_and_zero_at_equality():
  x = np.linspace(-3, 3, 13, dtype=np.float32)
  for est in ("k2", "k3"):
    assert (np.asarray(kl_per_token(x, np.zeros_like(x), est)) >= 0).all()
    assert float(kl_per_token(np.ones(1), np.ones(1), est)[0]) == 0


def test_unknown_names_and_bad_options_are_errors():
  logp, old, ref, adv, mask = _example()
  with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; choose one of \['k1'"):
    grpo.grpo_loss(logp, old, ref, adv, mask, kl_estimator="k4")
  with pytest.raises(ValueError, match="unknown aggregation 'seq-sum'"):
    grpo.grpo_loss(logp, old, ref, adv, mask, aggregation="seq-sum")
  with pytest.raises(ValueError, match="needs max_len"):
    grpo.grpo_loss(logp, old, ref, adv, mask, aggregation="seq-mean-token-sum-norm")
  with pytest.raises(ValueError, match="reference log-probs"):
    grpo.grpo_loss(logp, old, None, adv, mask, beta=0.1)
  with pytest.raises(ValueError, match="advantages must have shape"):
    grpo.grpo_loss(logp, old, ref, adv[:2], mask)
