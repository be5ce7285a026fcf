"""GRPO's loss as pure functions of arrays: advantages, clipped surrogate, KL, aggregation.

No model inside: the step (r1jax/rl/step.py) computes log-probs and hands them
here. The objective of DeepSeek-R1 (Methods, eq. 1-3), per question with G
sampled outputs o_i:

  J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it·A_i, clip(ρ_it, 1−ε, 1+ε)·A_i) − β·D_KL,it ]
  ρ_it = π_θ(o_it) / π_old(o_it),   A_i = (r_i − mean(r)) / std(r)
  D_KL,it = π_ref/π_θ − log(π_ref/π_θ) − 1                (the "k3" estimator)

and the published variants, each chosen by name:
  clip-higher (DAPO): ε_low < ε_high;
  aggregation: "seq-mean-token-mean" (the paper), "token-mean" (DAPO: every
      token of the batch weighs the same), "seq-mean-token-sum-norm" (Dr. GRPO:
      token sums divided by a constant max_len, no 1/|o_i|);
  advantage scale: "group" (the paper), "batch" (group mean, batch std),
      "none" (Dr. GRPO: no std division);
  KL estimator: k1, k2, k3 (Schulman's names; verl's kl_loss_type).

Glossary: B sequences (completions), T completion tokens, G completions per
prompt (group size), Q = B / G prompts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def _check_name(kind: str, name: str, known: tuple[str, ...]) -> None:
  if name not in known:
    raise ValueError(f"unknown {kind} {name!r}; choose one of {list(known)}")


# ----------------------------------------------------------------------------
# Advantages.

def group_advantages(rewards_B: jax.Array, group_size: int, *, scale: str = "group",
                     eps: float = 1e-6) -> jax.Array:
  """Per-completion advantages A_i = (r_i − mean_g) / (std + eps), float32 [B].

  Rows are grouped contiguously: rows [q·G, (q+1)·G) are the G completions of
  prompt q. std is the *sample* standard deviation (ddof=1), as in TRL and
  verl (`torch.std`); the paper writes std({r_1..r_G}) without saying which.
  "group": std within the group (the paper); "batch": std of all B rewards;
  "none": no division (Dr. GRPO). A group whose rewards are all equal gets
  exactly 0 (not a rounding residue over eps), so it adds nothing to the loss.
  """
  _check_name("advantage scale", scale, ADVANTAGE_SCALES)
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  if rewards_B.ndim != 1:
    raise ValueError(f"rewards must be a vector [B], got shape {rewards_B.shape}")
  B = rewards_B.shape[0]
  if group_size < 2 or B % group_size:
    raise ValueError(f"group_size={group_size} must be >= 2 and divide the {B} rewards "
                     "(rows of one prompt are contiguous)")
  r_QxG = rewards_B.reshape(B // group_size, group_size)
  centred_QxG = r_QxG - r_QxG.mean(-1, keepdims=True)
  if scale == "group":
    adv_QxG = centred_QxG / (jnp.std(r_QxG, axis=-1, ddof=1, keepdims=True) + eps)
  elif scale == "batch":
    adv_QxG = centred_QxG / (jnp.std(rewards_B, ddof=1) + eps)
  else:
    adv_QxG = centred_QxG
  tied_Qx1 = (r_QxG.max(-1) == r_QxG.min(-1))[:, None]
  return jnp.where(tied_Qx1, 0.0, adv_QxG).reshape(B)


def zero_advantage_fraction(advantages_B: jax.Array, group_size: int) -> jax.Array:
  """Fraction of groups whose advantages are all zero (they teach nothing)."""
  adv_QxG = jnp.asarray(advantages_B).reshape(-1, group_size)
  return jnp.mean(jnp.all(adv_QxG == 0, axis=-1).astype(jnp.float32))


# ----------------------------------------------------------------------------
# Per-token terms.

def kl_per_token(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, estimator: str = "k3"
                 ) -> jax.Array:
  """Estimates of KL(π_θ ‖ π_ref) from the sampled token's log-probs.

  k1 = log π_θ − log π_ref; k2 = ½(log π_θ − log π_ref)²;
  k3 = π_ref/π_θ − log(π_ref/π_θ) − 1 (the paper's form; unbiased and ≥ 0).
  """
  _check_name("KL estimator", estimator, KL_ESTIMATORS)
  log_ref_over_pi_BxT = ref_logp_BxT - logp_BxT
  if estimator == "k1":
    return -log_ref_over_pi_BxT
  if estimator == "k2":
    return 0.5 * jnp.square(log_ref_over_pi_BxT)
  return jnp.exp(log_ref_over_pi_BxT) - log_ref_over_pi_BxT - 1.0


def _masked_mean(x_BxT: jax.Array, m_BxT: jax.Array) -> jax.Array:
  return jnp.sum(x_BxT * m_BxT) / jnp.maximum(jnp.sum(m_BxT), 1.0)


def aggregate(per_token_BxT: jax.Array, mask_BxT: jax.Array, aggregation: str,
              max_len: int | None = None) -> jax.Array:
  """Reduces per-token values to one number by the named rule.

  "seq-mean-token-mean": mean over sequences of each one's token mean; a
      sequence with no unmasked token (e.g. a masked truncation) is left out
      of the sequence count rather than counted as a zero.
  "token-mean": mean over every unmasked token of the batch (DAPO eq. 8).
  "seq-mean-token-sum-norm": Σ tokens / (B · max_len), a constant normaliser
      (Dr. GRPO), so a token's weight does not depend on its sequence's length.
  """
  _check_name("aggregation", aggregation, AGGREGATIONS)
  m_BxT = mask_BxT.astype(jnp.float32)
  x_BxT = jnp.where(mask_BxT, per_token_BxT, 0.0)
  if aggregation == "token-mean":
    return _masked_mean(x_BxT, m_BxT)
  if aggregation == "seq-mean-token-sum-norm":
    if max_len is None or max_len < 1:
      raise ValueError("aggregation 'seq-mean-token-sum-norm' (Dr. GRPO) needs max_len >= 1, "
                       "the constant normaliser (usually the generation budget)")
    return jnp.sum(x_BxT) / (x_BxT.shape[0] * max_len)
  n_B = m_BxT.sum(-1)
  seq_B = x_BxT.sum(-1) / jnp.maximum(n_B, 1.0)
  has_B = (n_B > 0).astype(jnp.float32)
  return jnp.sum(seq_B * has_B) / jnp.maximum(jnp.sum(has_B), 1.0)


# ----------------------------------------------------------------------------
# The loss.

def grpo_loss(logp_BxT: jax.Array, old_logp_BxT: jax.Array, ref_logp_BxT: jax.Array | None,
              advantages_B: jax.Array, mask_BxT: jax.Array, *, eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.0, kl_estimator: str = "k3",
              aggregation: str = "seq-mean-token-mean", max_len: int | None = None,
              tis_weights_BxT: jax.Array | None = None, entropy_BxT: jax.Array | None = None,
              group_size: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The negated GRPO objective (minimise it) and its metrics.

  Log-probs are of the sampled tokens: `logp` under π_θ (differentiated),
  `old_logp` under π_old (the policy that sampled), `ref_logp` under π_ref
  (may be None when beta == 0). Masked positions may hold anything: they are
  replaced before any exp, so padding cannot produce inf or NaN.
  `tis_weights` (truncated importance sampling, treated as constants) scale
  the surrogate per token; `entropy` is only reported. With `group_size`,
  the zero-advantage metric counts groups, otherwise single sequences.
  """
  _check_name("KL estimator", kl_estimator, KL_ESTIMATORS)
  _check_name("aggregation", aggregation, AGGREGATIONS)
  if eps_low < 0 or eps_high < 0 or beta < 0:
    raise ValueError(f"eps_low={eps_low}, eps_high={eps_high} and beta={beta} must be >= 0")
  if beta > 0 and ref_logp_BxT is None:
    raise ValueError(f"beta={beta} > 0 needs the reference log-probs; pass ref_logp or set beta=0")
  if logp_BxT.shape != old_logp_BxT.shape or logp_BxT.shape != mask_BxT.shape:
    raise ValueError(f"logp {logp_BxT.shape}, old_logp {old_logp_BxT.shape} and mask "
                     f"{mask_BxT.shape} must have the same [B, T] shape")
  if advantages_B.shape != logp_BxT.shape[:1]:
    raise ValueError(f"advantages must have shape [{logp_BxT.shape[0]}], got {advantages_B.shape}")
  if aggregation == "seq-mean-token-sum-norm" and (max_len is None or max_len < 1):
    raise ValueError("aggregation 'seq-mean-token-sum-norm' (Dr. GRPO) needs max_len >= 1")
  mask_BxT = mask_BxT.astype(bool)
  m_BxT = mask_BxT.astype(jnp.float32)
  A_Bx1 = advantages_B.astype(jnp.float32)[:, None]

  log_ratio_BxT = jnp.where(mask_BxT, logp_BxT - old_logp_BxT, 0.0)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  clipped_BxT = jnp.clip(ratio_BxT, 1.0 - eps_low, 1.0 + eps_high)
  # The pessimistic bound (PPO): past the clip on the side the advantage
  # favours, the minimum is the constant branch and the gradient is zero.
  surrogate_BxT = jnp.minimum(ratio_BxT * A_Bx1, clipped_BxT * A_Bx1)
  if tis_weights_BxT is not None:
    surrogate_BxT = surrogate_BxT * jax.lax.stop_gradient(tis_weights_BxT)
  objective_BxT = surrogate_BxT
  metrics = {}
  if ref_logp_BxT is not None:
    kl_BxT = kl_per_token(jnp.where(mask_BxT, logp_BxT, 0.0),
                          jnp.where(mask_BxT, ref_logp_BxT, 0.0), kl_estimator)
    metrics["kl"] = _masked_mean(kl_BxT, m_BxT)
    if beta > 0:
      objective_BxT = objective_BxT - beta * kl_BxT
  loss = -aggregate(objective_BxT, mask_BxT, aggregation, max_len)

  # TRL's definition: a token is clipped where the clip removes its gradient.
  low_BxT = (ratio_BxT < 1.0 - eps_low) & (A_Bx1 < 0)
  high_BxT = (ratio_BxT > 1.0 + eps_high) & (A_Bx1 > 0)
  any_token = jnp.sum(m_BxT) > 0
  metrics.update(
      loss=loss,
      clip_frac_low=_masked_mean(low_BxT.astype(jnp.float32), m_BxT),
      clip_frac_high=_masked_mean(high_BxT.astype(jnp.float32), m_BxT),
      ratio_mean=_masked_mean(ratio_BxT, m_BxT),
      ratio_min=jnp.where(any_token, jnp.min(jnp.where(mask_BxT, ratio_BxT, jnp.inf)), 1.0),
      ratio_max=jnp.where(any_token, jnp.max(jnp.where(mask_BxT, ratio_BxT, -jnp.inf)), 1.0),
      advantage_mean=jnp.mean(A_Bx1),
      zero_adv_frac=zero_advantage_fraction(A_Bx1[:, 0], group_size or 1),
      tokens=jnp.sum(m_BxT))
  if entropy_BxT is not None:
    metrics["entropy"] = _masked_mean(jax.lax.stop_gradient(entropy_BxT), m_BxT)
  if tis_weights_BxT is not None:
    metrics["tis_weight_mean"] = _masked_mean(tis_weights_BxT, m_BxT)
  return loss, metrics
