"""The backend attention kernels behind `attention.attend`: cuDNN (through
`jax.nn.dot_product_attention`, on GPU) and Pallas TPU splash attention, each
fed the MLA/GQA parts concatenated and padded to the head dims they need.
`attention.choose_attention` decides when they run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from r1jax.model.attention import round_up, attention_mask


def _concat_heads(parts, G):
  """One [.., G, ΣE] array from parts, each part's heads repeated to G (a part
  with fewer heads serves consecutive groups of G/its heads, as in `_qk`)."""
  return jnp.concatenate([jnp.repeat(p, G // p.shape[2], axis=2) for p in parts], axis=-1)


def _pad_last(x, n):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def dot_product_attention(q_parts, k_parts, v_BxSxGxV, q_start, valid_BxS, *, scale,
                          implementation: str = "cudnn"):
  """`jax.nn.dot_product_attention` on the concatenated parts.

  It needs one head dim for q, k and v: all are zero-padded to max(E, V)
  rounded up to 8 (zeros add nothing to a score) and the output sliced back.
  Left padding and the decode offset go in as a boolean [B,1,T,S] mask (cuDNN
  turns it into a bias of that size in the compute dtype: per layer, transient).
  implementation="xla" runs the same wrapper anywhere (the CPU parity test).
  """
  G = max(k.shape[2] for k in k_parts)
  q = jnp.concatenate(q_parts, axis=-1)
  k = _concat_heads(k_parts, G)
  V, T = v_BxSxGxV.shape[3], q.shape[1]
  D = round_up(max(q.shape[-1], V), 8)
  v = jnp.broadcast_to(v_BxSxGxV, v_BxSxGxV.shape[:2] + (G, V))
  mask_Bx1xTxS = attention_mask(q_start + jnp.arange(T), valid_BxS)
  out = jax.nn.dot_product_attention(
      _pad_last(q, D), _pad_last(k, D), _pad_last(v, D), mask=mask_Bx1xTxS,
      scale=scale, implementation=implementation)
  return out[..., :V]


_SPLASH_BLOCK = 128  # the kernel's lane width: sequence blocks are multiples of it


@functools.lru_cache(maxsize=32)
def _splash_kernel(H: int, L: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b = min(512, L)
  while L % b:
    b //= 2
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sm.MultiHeadMask([sm.CausalMask((L, L)) for _ in range(H)])
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def splash(q_parts, k_parts, v_BxSxGxV, valid_BxS, *, scale, interpret: bool = False):
  """TPU splash attention for the training form (query slot t = key slot t).

  Padding goes in as segment ids (valid 1, pad 0: a pad query sees pad keys,
  itself at least, so no row is empty); the sequence is padded to a multiple of
  128 with a third segment; head dims are zero-padded to multiples of 128.
  interpret=True runs the Pallas kernel on CPU (slow: tests only).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  B, T, H = q_parts[0].shape[:3]
  V = v_BxSxGxV.shape[3]
  L = round_up(T, _SPLASH_BLOCK)
  D, Dv = round_up(sum(q.shape[-1] for q in q_parts), 128), round_up(V, 128)
  seq = lambda x: jnp.pad(x, [(0, 0), (0, L - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
  q_BxHxLxD = jnp.swapaxes(_pad_last(seq(jnp.concatenate(q_parts, -1) * scale), D), 1, 2)
  k_BxHxLxD = jnp.swapaxes(_pad_last(seq(_concat_heads(k_parts, H)), D), 1, 2)
  v = jnp.repeat(v_BxSxGxV, H // v_BxSxGxV.shape[2], axis=2)
  v_BxHxLxV = jnp.swapaxes(_pad_last(seq(v), Dv), 1, 2)
  seg_BxL = jnp.pad(valid_BxS.astype(jnp.int32), [(0, 0), (0, L - T)], constant_values=2)
  kernel = _splash_kernel(H, L, interpret)
  one = lambda q, k, v, s: kernel(q, k, v, sk.SegmentIds(q=s, kv=s))  # noqa: E731
  out_BxHxLxV = jax.vmap(one)(q_BxHxLxD, k_BxHxLxD, v_BxHxLxV, seg_BxL)
  return jnp.swapaxes(out_BxHxLxV, 1, 2)[:, :T, :, :V].astype(v_BxSxGxV.dtype)
