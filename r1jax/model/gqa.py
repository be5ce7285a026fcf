"""Grouped-query attention (Qwen2/Qwen2.5, Llama-3): the dense students' attention.

q = W_q·x (+ b_q), k = W_k·x (+ b_k), v = W_v·x (+ b_v) with H query heads and
G key/value heads of head_dim each; query head h reads key/value head
h // (H/G), as Hugging Face's `repeat_kv` arranges them. RoPE rotates whole
q and k heads (`cfg.rope_dim = head_dim`); the output projection has no bias.
Biases on q/k/v exist when `cfg.qkv_bias` (Qwen2).

Same interface as `MLA`, so `Block` takes either: the training form
`__call__(x, pos, valid)` and `decode(x, pos, cache, start, valid)`, whose cache
is per layer (k [B,S,G,Dh], v [B,S,G,Dh]): 2·G·Dh numbers per token per layer,
never repeated to H.

Glossary: B batch, T query tokens, S key slots, D d_model, H query heads,
G kv heads, K head_dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.model.attention import attend
from r1jax.model.config import ModelConfig
from r1jax.model.layers import Linear, dtypes
from r1jax.model.rope import apply_rope


class GQA(nn.Module):
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    dt, pdt = dtypes(c)
    kw = dict(dtype=dt, param_dtype=pdt)
    H, G, K = c.n_heads, c.n_kv_heads, c.head_dim
    self.wq = Linear((c.d_model,), (H, K), ("embed", "heads", "head_dim"),
                     use_bias=c.qkv_bias, **kw)
    self.wk = Linear((c.d_model,), (G, K), ("embed", "kv_heads", "head_dim"),
                     use_bias=c.qkv_bias, **kw)
    self.wv = Linear((c.d_model,), (G, K), ("embed", "kv_heads", "head_dim"),
                     use_bias=c.qkv_bias, **kw)
    self.wo = Linear((H, K), (c.d_model,), ("heads", "head_dim", "embed"), **kw)

  def _qkv(self, x_BxTxD, pos_BxT):
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    q_BxTxHxK = apply_rope(self.wq(x_BxTxD), pos_BxT, c).astype(dt)
    k_BxTxGxK = apply_rope(self.wk(x_BxTxD), pos_BxT, c).astype(dt)
    return q_BxTxHxK, k_BxTxGxK, self.wv(x_BxTxD).astype(dt)

  def _attend(self, q, k, v, start, valid_BxS):
    c = self.cfg
    return attend((q,), (k,), v, start, valid_BxS, scale=c.softmax_scale,
                  impl=c.attention, block=c.attention_block)

  def __call__(self, x_BxTxD, pos_BxT, valid_BxT):
    """Training form."""
    q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = self._qkv(x_BxTxD, pos_BxT)
    return self.wo(self._attend(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, 0, valid_BxT))

  def decode(self, x_BxTxD, pos_BxT, cache, start, valid_BxS):
    """Over a k/v cache: writes this chunk's rotated keys and values at slots
    [start, start+T) of `cache = (k [B,S,G,K], v [B,S,G,K])`, attends over every
    valid slot ≤ the query's, and returns (output, this chunk's (k, v)) for the
    caller to write into the stacked cache, as `MLA.decode` does."""
    q_BxTxHxK, k_new, v_new = self._qkv(x_BxTxD, pos_BxT)
    cache_k, cache_v = cache
    k_new, v_new = k_new.astype(cache_k.dtype), v_new.astype(cache_v.dtype)
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k_new, start, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v_new, start, axis=1)
    dt = q_BxTxHxK.dtype
    out_BxTxHxK = self._attend(q_BxTxHxK, cache_k.astype(dt), cache_v.astype(dt), start,
                               valid_BxS)
    return self.wo(out_BxTxHxK), (k_new, v_new)
