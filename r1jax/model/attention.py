"""Masked softmax attention, one entry point for both MLA forms, four kernels.

`attend(q_parts, k_parts, v, q_start, valid)` computes, per head h,
  out[b,t,h] = Σ_s softmax_s(scale · Σ_i q_i[b,t,h]·k_i[b,s,g]) · v[b,s,g]
over key slots s ≤ q_start + t with valid[b,s]. A score is a sum of parts so the
MLA forms need no concatenated copy: training uses (q_nope·k_nope per head) +
(q_pe·k_pe shared); decode uses (q_lat·c_kv) + (q_pe·k_pe), both shared by all
heads (multi-query attention). Each key part and v has G heads, G dividing H:
1 (shared), H, or GQA's kv heads (key head g serves query heads g·H/G ..
(g+1)·H/G - 1, the Hugging Face layout), never repeated to H in memory.

Kernels (`choose_attention` picks one):
  reference  materialised [B,H,T,S] f32 scores (the parity reference); the
             training form past 64 rows in causal query chunks with a
             written-out backward (`_causal_blocks`).
  blocked    pure-JAX flash attention: online softmax over key blocks, query
             blocks too, custom VJP saving only the output and log-sum-exp; the
             backward recomputes scores block by block. Never holds T×S.
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")` (GPU).
  splash     Pallas TPU splash attention (training form only); both in attention_kernels.py.

Fully masked query rows (left padding) give zero in "blocked", a uniform
average in "reference"/"cudnn": callers must ignore pad rows either way.

Glossary: B batch, T query tokens, S key slots, H query heads, G key/value
heads (dividing H), R = H/G, E a query/key part's head dim, V value head dim.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "reference", "blocked", "cudnn", "splash")
_MASKED = -1e30  # finite so fully masked rows (padding queries) give no NaN
# On XLA:CPU the reference kernel is faster at small shapes (measurements in
# choose_attention's docstring); past these it is not chosen.
_CPU_REFERENCE_MAX_SCORE_BYTES = 64 * 2**20
_CPU_REFERENCE_MAX_KEYS = 4096
# Query rows per chunk of the reference kernel's training form (`_causal_blocks`).
_CAUSAL_CHUNK = 64


def attention_mask(q_slot_T: jnp.ndarray, valid_BxS: jnp.ndarray) -> jnp.ndarray:
  """[B, 1, T, S] boolean: key slot s is visible to query slot t iff s ≤ t and s is valid."""
  S = valid_BxS.shape[1]
  causal_TxS = jnp.arange(S)[None, :] <= q_slot_T[:, None]
  return causal_TxS[None, None] & valid_BxS[:, None, None, :].astype(bool)


# --- Kernel choice -----------------------------------------------------------

def _cudnn_head_dim_max() -> int:
  cc = getattr(jax.devices()[0], "compute_capability", "0.0")
  return 256 if tuple(int(x) for x in cc.split(".")) >= (9, 0) else 128


def choose_attention(impl: str, *, B: int, T: int, S: int, H: int, E: int, V: int,
                     dtype, static_start: bool, backend: str | None = None) -> str:
  """The kernel that runs attention of this shape; the only place that decides.

  E is the summed query/key head dim, `static_start` whether query slots are
  0..T-1 with T == S (the training form). Explicit "cudnn"/"splash" need their
  backend (else a ValueError); where their shape limits fail (e.g. the decode
  form's C+R = 576 > 256 head dim for cuDNN, a traced decode offset for splash)
  that call runs "blocked", so one config serves training and decode.

  "auto": GPU -> cudnn when bf16/fp16 and max(E, V) ≤ 256 (Hopper; 128 before),
  else blocked. TPU -> splash in the training form, else blocked. CPU ->
  reference while its f32 scores B·H·T·S·4 ≤ 64 MiB and S ≤ 4096, else blocked
  (memory stays bounded). XLA:CPU, f32, B=8, block 512, fwd+bwd [fwd]:
  T=256 H=4: reference 292 ms [116], blocked 456 [234]; T=256 H=8: 1030 [554]
  vs 1692 [777]; T=1024 H=4 (128 MiB of scores): 10.0 s [5.3] vs 10.1 s [2.9].
  Decode T=1, H=4: S=1024 0.65 vs 1.49 ms; S=4096 4.7 vs 5.5; S=16384 28.9 vs 20.1.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {impl!r}")
  backend = backend or jax.default_backend()
  if impl in ("reference", "blocked"):
    return impl
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if impl == "cudnn":
    if backend != "gpu":
      raise ValueError(f"attention='cudnn' needs a GPU backend, this run has {backend!r}")
    if not half:
      raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16, got {dtype}")
  if impl == "splash" and backend != "tpu":
    raise ValueError(f"attention='splash' needs a TPU backend, this run has {backend!r}")
  cudnn_ok = (backend == "gpu" and half
              and round_up(max(E, V), 8) <= _cudnn_head_dim_max())
  splash_ok = backend == "tpu" and static_start and T == S
  if impl == "cudnn":
    return "cudnn" if cudnn_ok else "blocked"
  if impl == "splash":
    return "splash" if splash_ok else "blocked"
  # auto
  if cudnn_ok:
    return "cudnn"
  if splash_ok:
    return "splash"
  if (backend == "cpu" and B * H * T * S * 4 <= _CPU_REFERENCE_MAX_SCORE_BYTES
      and S <= _CPU_REFERENCE_MAX_KEYS):
    return "reference"
  return "blocked"


def attend(q_parts: Sequence[jnp.ndarray], k_parts: Sequence[jnp.ndarray],
           v_BxSxGxV: jnp.ndarray, q_start, valid_BxS: jnp.ndarray, *,
           scale: float, impl: str = "reference", block: int = 512) -> jnp.ndarray:
  """Masked attention -> [B,T,H,V] in the inputs' dtype (compute dtype).

  q_parts: [B,T,H,E_i]; k_parts: [B,S,G_i,E_i] with G_i ∈ {1, H}; query slot t
  is q_start + t (q_start: int, or a traced scalar in decode); valid_BxS marks
  filled key slots. Softmax runs in f32, matmuls take the inputs' dtype.
  """
  q_parts, k_parts = tuple(q_parts), tuple(k_parts)
  B, T, H = q_parts[0].shape[:3]
  S, V = v_BxSxGxV.shape[1], v_BxSxGxV.shape[3]
  E = sum(q.shape[-1] for q in q_parts)
  static_start = isinstance(q_start, (int, np.integer)) and int(q_start) == 0
  kernel = choose_attention(impl, B=B, T=T, S=S, H=H, E=E, V=V,
                            dtype=q_parts[0].dtype, static_start=static_start)
  if kernel == "reference" and static_start and T == S and T > _CAUSAL_CHUNK:
    q_BxTxHxE, k_BxSxGxE = _joined(q_parts, k_parts, scale)
    return _causal_blocks(q_BxTxHxE, k_BxSxGxE, v_BxSxGxV, valid_BxS.astype(bool),
                          _CAUSAL_CHUNK)
  if kernel == "reference" and static_start and len(q_parts) > 1:
    return _reference_joined(q_parts, k_parts, v_BxSxGxV, valid_BxS, scale)
  if kernel == "reference":
    return _reference(q_parts, k_parts, v_BxSxGxV, q_start, valid_BxS, scale)
  if kernel == "blocked":
    bq, bk = min(block, T), min(block, S)
    return _flash(scale, bq, bk, q_parts, k_parts, v_BxSxGxV,
                  jnp.asarray(q_start, jnp.int32), valid_BxS.astype(bool))
  from r1jax.model import attention_kernels  # GPU / TPU kernels, imported when chosen
  if kernel == "cudnn":
    return attention_kernels.dot_product_attention(q_parts, k_parts, v_BxSxGxV, q_start,
                                                   valid_BxS, scale=scale, implementation="cudnn")
  return attention_kernels.splash(q_parts, k_parts, v_BxSxGxV, valid_BxS, scale=scale)


# --- Shared pieces -------------------------------------------------------------

def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _qk(q_BxTxHxE, k_BxSxGxE, f32: bool):
  """[B,H,T,S] dot products of one part; key head g serves query heads
  g·H/G .. (g+1)·H/G - 1 (a G=1 key is shared by all heads)."""
  kw = dict(preferred_element_type=jnp.float32) if f32 else {}
  B, T, H, E = q_BxTxHxE.shape
  G = k_BxSxGxE.shape[2]
  if G == 1:
    return jnp.einsum("bthe,bse->bhts", q_BxTxHxE, k_BxSxGxE[:, :, 0], **kw)
  if G == H:
    return jnp.einsum("bthe,bshe->bhts", q_BxTxHxE, k_BxSxGxE, **kw)
  q_BxTxGxRxE = q_BxTxHxE.reshape(B, T, G, H // G, E)
  s = jnp.einsum("btgre,bsge->bgrts", q_BxTxGxRxE, k_BxSxGxE, **kw)
  return s.reshape(B, H, T, s.shape[-1])


def _pv(p_BxHxTxS, v_BxSxGxV, f32: bool):
  """[B,T,H,V] probability-weighted values (heads grouped as in `_qk`)."""
  kw = dict(preferred_element_type=jnp.float32) if f32 else {}
  B, H, T, S = p_BxHxTxS.shape
  G = v_BxSxGxV.shape[2]
  if G == 1 and T == 1:
    return jnp.einsum("bhs,bsv->bhv", p_BxHxTxS[:, :, 0], v_BxSxGxV[:, :, 0], **kw)[:, None]
  if G == 1:
    return jnp.einsum("bhts,bsv->bthv", p_BxHxTxS, v_BxSxGxV[:, :, 0], **kw)
  if G == H:
    return jnp.einsum("bhts,bshv->bthv", p_BxHxTxS, v_BxSxGxV, **kw)
  out = jnp.einsum("bgrts,bsgv->btgrv", p_BxHxTxS.reshape(B, G, H // G, T, S), v_BxSxGxV, **kw)
  return out.reshape(B, T, H, v_BxSxGxV.shape[3])


def _ptx(p_BxHxTxS, x_BxTxHxE, G: int):
  """[B,S,G,E] f32: Σ_t p[b,h,t,s]·x[b,t,h,e] summed over each key head's group
  of query heads (the key and value gradients of the flash backward)."""
  kw = dict(preferred_element_type=jnp.float32)
  B, H, T, S = p_BxHxTxS.shape
  if G == 1:
    return jnp.einsum("bhts,bthe->bse", p_BxHxTxS, x_BxTxHxE, **kw)[:, :, None]
  if G == H:
    return jnp.einsum("bhts,bthe->bshe", p_BxHxTxS, x_BxTxHxE, **kw)
  return jnp.einsum("bgrts,btgre->bsge", p_BxHxTxS.reshape(B, G, H // G, T, S),
                    x_BxTxHxE.reshape(B, T, G, H // G, x_BxTxHxE.shape[3]), **kw)


def _one_query_scores(q_parts, k_parts):
  """[B,H,1,S] scores of one query token against keys shared by all heads (G=1:
  MLA's latent decode). Computed as [S,E]·[E,H] per row and transposed after a
  barrier: XLA:CPU runs the [H,E]·[S,E]ᵀ form (which it folds a plain transpose
  back into) 1.6-2.2x slower. bench.peer decode attention per layer, 4 heads,
  batch x slots 8 x 160 / 64 x 160 / 64 x 1024: 84 / 774 / 5990 -> 66 / 566 / 3898 µs."""
  s_BxSxH = sum(jnp.einsum("bse,bhe->bsh", k[:, :, 0], q[:, 0]) for q, k in zip(q_parts, k_parts))
  return jnp.swapaxes(jax.lax.optimization_barrier(s_BxSxH), 1, 2)[:, :, None]


def _reference(q_parts, k_parts, v_BxSxGxV, q_start, valid_BxS, scale):
  T = q_parts[0].shape[1]
  if T == 1 and all(k.shape[2] == 1 for k in k_parts):
    scores_BxHxTxS = _one_query_scores(q_parts, k_parts)
  else:
    scores_BxHxTxS = sum(_qk(q, k, f32=False) for q, k in zip(q_parts, k_parts))
  return _softmax_pv(scores_BxHxTxS.astype(jnp.float32) * scale, q_start + jnp.arange(T),
                     valid_BxS, v_BxSxGxV)


def _softmax_pv(scores_BxHxTxS, q_slot_T, valid_BxS, v_BxSxGxV):
  """Masked f32 softmax of scaled scores, then the weighted sum of v."""
  scores = jnp.where(attention_mask(q_slot_T, valid_BxS), scores_BxHxTxS, _MASKED)
  probs_BxHxTxS = jax.nn.softmax(scores, axis=-1)
  return _pv(probs_BxHxTxS.astype(v_BxSxGxV.dtype), v_BxSxGxV, f32=False)


def _joined(q_parts, k_parts, scale):
  """(scaled q [B,T,H,ΣE], k [B,S,G,ΣE]): the parts joined along the head dim, a
  part with fewer key heads than the others broadcast to theirs (MLA: 1 and H)."""
  dt = q_parts[0].dtype
  q = jnp.concatenate(q_parts, -1) if len(q_parts) > 1 else q_parts[0]
  q_BxTxHxE = (q.astype(jnp.float32) * scale).astype(dt)
  if len(k_parts) == 1:
    return q_BxTxHxE, k_parts[0]
  G = max(k.shape[2] for k in k_parts)
  return q_BxTxHxE, jnp.concatenate(
      [jnp.broadcast_to(k, k.shape[:2] + (G, k.shape[3])) for k in k_parts], -1)


def _reference_joined(q_parts, k_parts, v_BxSxGxV, valid_BxS, scale):
  """`_reference` at query slots 0..T-1 as one score matmul over `_joined` parts.
  Joining copies the keys; on XLA:CPU (bench.peer shapes, training form,
  fwd+bwd) it measured 43 ms against 65-80 ms for two score matmuls and a
  scaled sum."""
  q_BxTxHxE, k_BxSxGxE = _joined(q_parts, k_parts, scale)
  scores_BxHxTxS = _qk(q_BxTxHxE, k_BxSxGxE, f32=False)
  return _softmax_pv(scores_BxHxTxS.astype(jnp.float32), jnp.arange(q_BxTxHxE.shape[1]),
                     valid_BxS, v_BxSxGxV)


# --- Blocked (flash) kernel ------------------------------------------------------
# Blocks of size bq/bk need not divide T/S: the last block starts at n - b and
# overlaps its predecessor; its repeated key columns are masked and, in the
# backward, its repeated query rows too, so nothing is counted twice and no
# input is padded (a padded copy of a decode cache would cost a full cache copy).

def _block_mask(slot_q, slot_k, ok_BxK):
  """[B,1,bq,bk]: causal within the block pair, and the key column usable."""
  return (slot_k[None, None, None, :] <= slot_q[None, None, :, None]) & ok_BxK[:, None, None, :]


def _key_block(k_parts, v, valid, j, bk):
  S = v.shape[1]
  k0 = jnp.minimum(j * bk, S - bk)
  slot_k = k0 + jnp.arange(bk)
  k_j = tuple(jax.lax.dynamic_slice_in_dim(k, k0, bk, 1) for k in k_parts)
  v_j = jax.lax.dynamic_slice_in_dim(v, k0, bk, 1)
  ok_BxK = jax.lax.dynamic_slice_in_dim(valid, k0, bk, 1) & (slot_k >= j * bk)[None]
  return k0, slot_k, k_j, v_j, ok_BxK


def _loop(lower: int, upper: int, body, init):
  """fori_loop as a while loop. With static bounds fori_loop becomes a scan, and
  differentiating an enclosing scan (the layer stack) then splits it into
  loop-invariant and varying parts, stacking an [nq, nk, B, H, bq, bk] tile of the
  invariant part (the masks) per block pair: the T×S buffer this kernel avoids.
  A while loop is not split. Nothing differentiates these loops (custom_vjp)."""
  def step(c):
    i, carry = c
    return i + 1, body(i, carry)
  return jax.lax.while_loop(lambda c: c[0] < upper, step, (jnp.int32(lower), init))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(scale, bq, bk, q_parts, k_parts, v, q_start, valid):
  return _flash_fwd(scale, bq, bk, q_parts, k_parts, v, q_start, valid)[0]


def _flash_fwd(scale, bq, bk, q_parts, k_parts, v, q_start, valid):
  B, T, H = q_parts[0].shape[:3]
  S, Vd = v.shape[1], v.shape[3]
  dt = v.dtype
  nq, nk = -(-T // bq), -(-S // bk)

  def q_step(i, carry):
    out_BxTxHxV, lse_BxHxT = carry
    q0 = jnp.minimum(i * bq, T - bq)
    q_i = tuple(jax.lax.dynamic_slice_in_dim(q, q0, bq, 1) for q in q_parts)
    slot_q = q_start + q0 + jnp.arange(bq)

    def k_step(j, c):
      def update(c):
        m, l, acc = c
        _, slot_k, k_j, v_j, ok = _key_block(k_parts, v, valid, j, bk)
        mask = _block_mask(slot_q, slot_k, ok)
        s = sum(_qk(q, k, f32=True) for q, k in zip(q_i, k_j)) * scale
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _MASKED), axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = l * alpha + p.sum(-1)
        acc = acc * jnp.swapaxes(alpha, 1, 2)[..., None] + _pv(p.astype(dt), v_j, f32=True)
        return m_new, l, acc
      # Key blocks wholly after the query block's last slot hold nothing visible.
      return jax.lax.cond(j * bk > slot_q[-1], lambda c: c, update, c)

    init = (jnp.full((B, H, bq), _MASKED, jnp.float32), jnp.zeros((B, H, bq), jnp.float32),
            jnp.zeros((B, bq, H, Vd), jnp.float32))
    m, l, acc = _loop(0, nk, k_step, init)
    l_safe = jnp.where(l > 0, l, 1.0)
    o = acc / jnp.swapaxes(l_safe, 1, 2)[..., None]  # fully masked rows: acc = 0 -> 0
    lse = jnp.where(l > 0, m + jnp.log(l_safe), 0.0)
    out_BxTxHxV = jax.lax.dynamic_update_slice_in_dim(out_BxTxHxV, o.astype(dt), q0, 1)
    lse_BxHxT = jax.lax.dynamic_update_slice_in_dim(lse_BxHxT, lse, q0, 2)
    return out_BxTxHxV, lse_BxHxT

  out, lse = _loop(
      0, nq, q_step, (jnp.zeros((B, T, H, Vd), dt), jnp.zeros((B, H, T), jnp.float32)))
  return out, (q_parts, k_parts, v, q_start, valid, out, lse)


def _add_at(full, part, start, axis):
  cur = jax.lax.dynamic_slice_in_dim(full, start, part.shape[axis], axis)
  return jax.lax.dynamic_update_slice_in_dim(full, cur + part, start, axis)


def _flash_bwd(scale, bq, bk, res, dout_BxTxHxV):
  q_parts, k_parts, v, q_start, valid, out, lse_BxHxT = res
  T, S = q_parts[0].shape[1], v.shape[1]
  dt = v.dtype
  nq, nk = -(-T // bq), -(-S // bk)
  # FlashAttention-2's D = rowsum(dO ∘ O): ds = p · (dp - D).
  d_BxHxT = jnp.einsum("bthv,bthv->bht", dout_BxTxHxV.astype(jnp.float32),
                       out.astype(jnp.float32))
  f32zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731

  def k_step(j, carry):
    dqs, dks, dv = carry
    k0, slot_k, k_j, v_j, ok = _key_block(k_parts, v, valid, j, bk)

    def q_step(i, c):
      q0 = jnp.minimum(i * bq, T - bq)
      slot_q = q_start + q0 + jnp.arange(bq)

      def update(c):
        dqs, dks_j, dv_j = c
        q_i = tuple(jax.lax.dynamic_slice_in_dim(q, q0, bq, 1) for q in q_parts)
        do_i = jax.lax.dynamic_slice_in_dim(dout_BxTxHxV, q0, bq, 1)
        lse_i = jax.lax.dynamic_slice_in_dim(lse_BxHxT, q0, bq, 2)
        d_i = jax.lax.dynamic_slice_in_dim(d_BxHxT, q0, bq, 2)
        fresh_row = (q0 + jnp.arange(bq)) >= i * bq  # the overlap was done by block i-1
        mask = _block_mask(slot_q, slot_k, ok) & fresh_row[None, None, :, None]
        s = sum(_qk(q, k, f32=True) for q, k in zip(q_i, k_j)) * scale
        p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
        dp = _qk(do_i, v_j, f32=True)
        dv_j = dv_j + _ptx(p.astype(dt), do_i, v_j.shape[2])
        ds = (p * (dp - d_i[..., None]) * scale).astype(dt)
        new_dks, new_dqs = [], []
        for q, k, dk, dq in zip(q_i, k_j, dks_j, dqs):
          new_dks.append(dk + _ptx(ds, q, k.shape[2]))
          new_dqs.append(_add_at(dq, _pv(ds, k, f32=True), q0, 1))
        return tuple(new_dqs), tuple(new_dks), dv_j

      return jax.lax.cond(j * bk > slot_q[-1], lambda c: c, update, c)

    init = (dqs, tuple(f32zeros(k) for k in k_j), f32zeros(v_j))
    dqs, dks_j, dv_j = _loop(0, nq, q_step, init)
    # Repeated columns of an overlapping last block were masked: their rows add 0.
    dks = tuple(_add_at(dk, dk_j, k0, 1) for dk, dk_j in zip(dks, dks_j))
    return dqs, dks, _add_at(dv, dv_j, k0, 1)

  init = (tuple(f32zeros(q) for q in q_parts), tuple(f32zeros(k) for k in k_parts), f32zeros(v))
  dqs, dks, dv = _loop(0, nk, k_step, init)
  cast = lambda gs, xs: tuple(g.astype(x.dtype) for g, x in zip(gs, xs))  # noqa: E731
  return cast(dqs, q_parts), cast(dks, k_parts), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- Causal blocks (XLA:CPU training form) ----------------------------------------
# The training form (query slot t = key slot t, T = S) in query chunks of
# `chunk` rows: chunk i scores only the keys [0, (i+1)·chunk), so the masked upper
# triangle is never computed (T=256 in 4 chunks: 62.5% of the score work). The
# backward is written out (FlashAttention's dS = P ∘ (dP − rowsum(dO ∘ O))) from
# each chunk's saved probabilities, instead of autodiff through the softmax.
# bench.peer train step, same process: 450 ms with full joined scores, 428 ms
# in chunks of 64 rows, 441 ms in chunks of 128.

def _chunk_bounds(T: int, chunk: int) -> list[tuple[int, int]]:
  return [(lo, min(lo + chunk, T)) for lo in range(0, T, chunk)]


def _chunk_probs(q_BxCxHxE, k_BxSxGxE, valid_BxS, lo: int, hi: int):
  """f32 probabilities [B,H,C,hi] of query rows [lo, hi) over key slots [0, hi)."""
  s = _qk(q_BxCxHxE, k_BxSxGxE[:, :hi], f32=True)
  scores = jnp.where(attention_mask(jnp.arange(lo, hi), valid_BxS[:, :hi]), s, _MASKED)
  return jax.nn.softmax(scores, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_blocks(q_BxTxHxE, k_BxSxGxE, v_BxSxGxV, valid_BxS, chunk: int):
  """Causal attention of pre-scaled q in query chunks -> [B,T,H,V]."""
  return _causal_blocks_fwd(q_BxTxHxE, k_BxSxGxE, v_BxSxGxV, valid_BxS, chunk)[0]


def _causal_blocks_fwd(q_BxTxHxE, k_BxSxGxE, v_BxSxGxV, valid_BxS, chunk):
  dt = v_BxSxGxV.dtype
  outs, probs = [], []
  for lo, hi in _chunk_bounds(q_BxTxHxE.shape[1], chunk):
    p = _chunk_probs(q_BxTxHxE[:, lo:hi], k_BxSxGxE, valid_BxS, lo, hi)
    probs.append(p.astype(dt))
    outs.append(_pv(probs[-1], v_BxSxGxV[:, :hi], f32=False))
  out = jnp.concatenate(outs, axis=1)
  return out, (q_BxTxHxE, k_BxSxGxE, v_BxSxGxV, valid_BxS, out, tuple(probs))


def _causal_blocks_bwd(chunk, res, dout_BxTxHxV):
  q, k, v, valid, out, probs = res
  G, dt = k.shape[2], v.dtype
  # D = rowsum(dO ∘ O) per query row and head.
  d_BxHxT = jnp.einsum("bthv,bthv->bht", dout_BxTxHxV.astype(jnp.float32),
                       out.astype(jnp.float32))
  dq_parts = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for (lo, hi), p in zip(_chunk_bounds(q.shape[1], chunk), probs):
    do = dout_BxTxHxV[:, lo:hi]
    dp = _qk(do, v[:, :hi], f32=True)
    ds = (p.astype(jnp.float32) * (dp - d_BxHxT[:, :, lo:hi, None])).astype(dt)
    dq_parts.append(_pv(ds, k[:, :hi], f32=True))
    dk = dk.at[:, :hi].add(_ptx(ds, q[:, lo:hi], G))
    dv = dv.at[:, :hi].add(_ptx(p, do, G))
  dq = jnp.concatenate(dq_parts, axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(dt), None


_causal_blocks.defvjp(_causal_blocks_fwd, _causal_blocks_bwd)
