"""The output head as pure functions, and log-probs computed chunk by chunk.

The training losses need, per position, the log-prob of one target token and
the entropy, never the whole [B, T, V] float32 logits (V = 129,280 for V3). So
`target_logprobs` runs the head over `chunk` positions at a time under
`jax.checkpoint`: the forward keeps only [B, T] results, and the backward
recomputes one chunk's logits at a time. Measured on XLA:CPU (V=8192, T=256),
the head's loss + gradient needs about
    2 f32 buffers of [B, chunk, V/tp]   (1 in a forward-only log-prob pass)
  + the weight gradient [D, V/tp] and a copy of h [B, T, D] (the scan's input)
instead of 5 f32 buffers of [B, T, V] with full logits.

Glossary: B batch, T positions, C positions per chunk, n chunks, D d_model,
V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig
from r1jax.model.layers import matmul_2d


@dataclasses.dataclass(frozen=True)
class HeadWeights:
  """The output projection: lm_head's kernel [D, V], or the embedding [V, D] when tied.

  Not a pytree: build it inside the traced function from the parameters."""
  w: jax.Array
  tied: bool
  dtype: Any  # compute dtype (cfg.dtype)


def head_weights(cfg: ModelConfig, params) -> HeadWeights:
  """The head's weights from a Transformer parameter tree (unboxed)."""
  if cfg.tie_embeddings:
    return HeadWeights(params["embed"]["embedding"], True, jnp.dtype(cfg.dtype))
  return HeadWeights(params["lm_head"]["kernel"], False, jnp.dtype(cfg.dtype))


def project(h_BxTxD: jax.Array, head: HeadWeights) -> jax.Array:
  """float32 logits [B, T, V] of final-normed hidden states (the model's own head)."""
  h = h_BxTxD.astype(head.dtype)
  w = head.w.astype(head.dtype)
  return matmul_2d(h, w, 1, w_in_first=not head.tied).astype(jnp.float32)


def truncate(scaled_NxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """The sampler's top-k/top-p cut (rollout's rule), imported late to avoid a cycle."""
  from r1jax.rl.rollout import _truncate
  return _truncate(scaled_NxV, top_k, top_p)


def logprobs_from_logits(scaled_BxTxV: jax.Array, targets_BxT: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """(log-softmax at the targets [B, T], entropy [B, T]) of float32 logits.

  Tokens at -inf (cut by top-k/top-p) add 0 to the entropy.
  """
  logz_BxT = jax.nn.logsumexp(scaled_BxTxV, axis=-1)
  picked_BxT = jnp.take_along_axis(scaled_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  logp_BxT = picked_BxT - logz_BxT
  # -Σ p·log p, not logz − Σ p·x: no cancellation between two large terms when
  # the distribution is peaked. Double where: a cut token's 0·(-inf) is 0 in
  # the backward as well.
  finite = jnp.isfinite(scaled_BxTxV)
  logp_BxTxV = jnp.where(finite, scaled_BxTxV - logz_BxT[..., None], 0.0)
  entropy_BxT = -jnp.sum(jnp.where(finite, jnp.exp(logp_BxTxV) * logp_BxTxV, 0.0), axis=-1)
  return logp_BxT, entropy_BxT


def target_logprobs(h_BxTxD: jax.Array, head: HeadWeights, targets_BxT: jax.Array, *,
                    chunk: int, temperature: float = 1.0, entropy: bool = True,
                    top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array | None]:
  """(log π(target) [B, T], entropy of π [B, T] or None when `entropy` is off)
  with π = softmax(cut(logits / temperature)).

  `cut` is the sampler's top-k/top-p (off by default). Computed `chunk`
  positions at a time, each chunk rematerialised in the backward, in float32;
  T need not be a multiple of `chunk`.
  """
  if chunk < 1:
    raise ValueError(f"logits_chunk must be >= 1, got {chunk}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
  B, T, D = h_BxTxD.shape
  C = min(chunk, T)
  n = -(-T // C)
  pad = n * C - T
  if pad:
    h_BxTxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  h_nxBxCxD = jnp.swapaxes(h_BxTxD.reshape(B, n, C, D), 0, 1)
  t_nxBxC = jnp.swapaxes(targets_BxT.reshape(B, n, C), 0, 1)

  @jax.checkpoint
  def one_chunk(w, h_BxCxD, t_BxC):
    scaled_BxCxV = project(h_BxCxD, dataclasses.replace(head, w=w)) / temperature
    if top_k or top_p < 1.0:
      V = scaled_BxCxV.shape[-1]
      scaled_BxCxV = truncate(scaled_BxCxV.reshape(B * C, V), top_k, top_p).reshape(B, C, V)
    logp_BxC, ent_BxC = logprobs_from_logits(scaled_BxCxV, t_BxC)
    return (logp_BxC, ent_BxC) if entropy else (logp_BxC,)

  def body(_, xs):
    return None, one_chunk(head.w, *xs)

  _, outs = jax.lax.scan(body, None, (h_nxBxCxD, t_nxBxC))
  unchunk = lambda a_nxBxC: jnp.swapaxes(a_nxBxC, 0, 1).reshape(B, n * C)[:, :T]
  return unchunk(outs[0]), unchunk(outs[1]) if entropy else None


def shifted_nll(h_BxTxD: jax.Array, head: HeadWeights, tokens_BxT: jax.Array,
                mask_BxT: jax.Array, shift: int, *, chunk: int) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(token i+shift) at position i over masked targets, their count).

  `mask_BxT` marks targets (token positions); positions whose target falls
  past the end count nothing.
  """
  B, T = tokens_BxT.shape
  pad_tok = jnp.zeros((B, shift), tokens_BxT.dtype)
  targets_BxT = jnp.concatenate([tokens_BxT[:, shift:], pad_tok], axis=1)
  counted_BxT = jnp.concatenate([mask_BxT[:, shift:].astype(bool), jnp.zeros((B, shift), bool)],
                                axis=1)
  logp_BxT, _ = target_logprobs(h_BxTxD, head, targets_BxT, chunk=chunk, entropy=False)
  nll_BxT = jnp.where(counted_BxT, -logp_BxT, 0.0)
  return jnp.sum(nll_BxT), jnp.sum(counted_BxT.astype(jnp.float32))
