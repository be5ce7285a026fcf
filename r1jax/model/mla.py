"""Multi-head Latent Attention (DeepSeek-V2/V3), in two forms of one function.

Query:  q = W_uq · RMSNorm(W_dq · x)   (or W_q · x when q_lora_rank = 0),
        split per head into q_nope [dn] and q_pe [dr].
Key/value latent: [c_kv, k_pe] = W_dkv · x; c_kv = RMSNorm(c_kv); k_pe is one
        rotary key shared by all heads.
Training form: [k_nope, v] = W_ukv · c_kv per head; ordinary attention over
        k = [k_nope, k_pe], q = [q_nope, q_pe].
Decode form: only c_kv and k_pe are cached (C + dr numbers per token per layer).
        W_uk is absorbed into the query (q_lat = q_nope · W_uk, scored against
        c_kv directly) and W_uv into the output (attend over c_kv, then W_uv).

Both forms call `attention.attend` (kernel chosen by cfg.attention).

Glossary: B batch, T query tokens, S key slots, D d_model, H heads,
C kv_lora_rank, Q q_lora_rank, K qk_nope_head_dim, R qk_rope_head_dim,
V v_head_dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.model.attention import attend
from r1jax.model.config import ModelConfig
from r1jax.model.layers import Linear, RMSNorm, dtypes
from r1jax.model.rope import apply_rope


class MLA(nn.Module):
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    dt, pdt = dtypes(c)
    kw = dict(dtype=dt, param_dtype=pdt)
    H, K, R, V = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    if c.q_lora_rank:
      self.wq_a = Linear((c.d_model,), (c.q_lora_rank,), ("embed", "q_lora"), **kw)
      self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, **kw)
      self.wq_b = Linear((c.q_lora_rank,), (H, K + R), ("q_lora", "heads", "head_dim"), **kw)
    else:
      self.wq = Linear((c.d_model,), (H, K + R), ("embed", "heads", "head_dim"), **kw)
    self.wkv_a = Linear((c.d_model,), (c.kv_lora_rank + R,), ("embed", "kv_lora"), **kw)
    self.kv_norm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps, **kw)
    self.wkv_b = Linear((c.kv_lora_rank,), (H, K + V), ("kv_lora", "heads", "head_dim"), **kw)
    self.wo = Linear((H, V), (c.d_model,), ("heads", "head_dim", "embed"), **kw)

  def _query(self, x_BxTxD, pos_BxT):
    c = self.cfg
    if c.q_lora_rank:
      q_BxTxHxE = self.wq_b(self.q_norm(self.wq_a(x_BxTxD)))
    else:
      q_BxTxHxE = self.wq(x_BxTxD)
    q_nope_BxTxHxK = q_BxTxHxE[..., :c.qk_nope_head_dim]
    q_pe_BxTxHxR = apply_rope(q_BxTxHxE[..., c.qk_nope_head_dim:], pos_BxT, c)
    return q_nope_BxTxHxK, q_pe_BxTxHxR

  def latents(self, x_BxTxD, pos_BxT):
    """The per-token cache entries: normalised c_kv [B,T,C] and rotated k_pe [B,T,R]."""
    c = self.cfg
    kv_BxTxF = self.wkv_a(x_BxTxD)
    c_kv_BxTxC = self.kv_norm(kv_BxTxF[..., :c.kv_lora_rank])
    k_pe_BxTxR = apply_rope(kv_BxTxF[..., None, c.kv_lora_rank:], pos_BxT, c)[:, :, 0]
    return c_kv_BxTxC, k_pe_BxTxR

  def _attend(self, q_parts, k_parts, v_BxSxGxV, start, valid_BxS):
    c = self.cfg
    return attend(q_parts, k_parts, v_BxSxGxV, start, valid_BxS, scale=c.softmax_scale,
                  impl=c.attention, block=c.attention_block)

  def __call__(self, x_BxTxD, pos_BxT, valid_BxT):
    """Training form: expands per-head keys and values from the latent."""
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    q_nope, q_pe = self._query(x_BxTxD, pos_BxT)
    c_kv_BxTxC, k_pe_BxTxR = self.latents(x_BxTxD, pos_BxT)
    kv_BxTxHxF = self.wkv_b(c_kv_BxTxC)
    k_nope_BxTxHxK = kv_BxTxHxF[..., :c.qk_nope_head_dim]
    v_BxTxHxV = kv_BxTxHxF[..., c.qk_nope_head_dim:]
    # k_pe is one key for all heads: a G=1 part, never broadcast to H.
    out_BxTxHxV = self._attend((q_nope.astype(dt), q_pe.astype(dt)),
                               (k_nope_BxTxHxK.astype(dt), k_pe_BxTxR[:, :, None].astype(dt)),
                               v_BxTxHxV.astype(dt), 0, valid_BxT)
    return self.wo(out_BxTxHxV)

  def decode(self, x_BxTxD, pos_BxT, cache, start, valid_BxS):
    """Absorbed form over a latent cache.

    Writes this chunk's latents into `cache = (c_kv [B,S,C], k_pe [B,S,R])` at
    slots [start, start+T) and attends over every valid slot ≤ the query's slot.
    `valid_BxS` must already mark the new slots. Returns (output, this chunk's
    latents (c_kv [B,T,C], k_pe [B,T,R])): the caller writes them into the
    stacked cache once per layer stack (in place on a donated cache; a cache
    returned per layer would be a second copy of the whole cache).
    """
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    q_nope, q_pe = self._query(x_BxTxD, pos_BxT)
    c_kv_new, k_pe_new = self.latents(x_BxTxD, pos_BxT)
    cache_c_kv, cache_k_pe = cache
    cache_c_kv = jax.lax.dynamic_update_slice_in_dim(
        cache_c_kv, c_kv_new.astype(cache_c_kv.dtype), start, axis=1)
    cache_k_pe = jax.lax.dynamic_update_slice_in_dim(
        cache_k_pe, k_pe_new.astype(cache_k_pe.dtype), start, axis=1)
    w_ukv_CxHxF = self.wkv_b.kernel.astype(dt)
    w_uk_CxHxK = w_ukv_CxHxF[..., :c.qk_nope_head_dim]
    w_uv_CxHxV = w_ukv_CxHxF[..., c.qk_nope_head_dim:]
    q_lat_BxTxHxC = jnp.einsum("bthk,chk->bthc", q_nope, w_uk_CxHxK)
    c_kv_BxSxC = cache_c_kv.astype(dt)
    # Multi-query attention: c_kv and k_pe are one key (and c_kv the value) for all heads.
    c_kv_BxSx1xC = c_kv_BxSxC[:, :, None]
    out_lat_BxTxHxC = self._attend((q_lat_BxTxHxC, q_pe.astype(dt)),
                                   (c_kv_BxSx1xC, cache_k_pe[:, :, None].astype(dt)),
                                   c_kv_BxSx1xC, start, valid_BxS)
    out_BxTxHxV = jnp.einsum("bthc,chv->bthv", out_lat_BxTxHxC, w_uv_CxHxV)
    return self.wo(out_BxTxHxV), (c_kv_new.astype(cache_c_kv.dtype),
                                  k_pe_new.astype(cache_k_pe.dtype))
