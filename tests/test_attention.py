"""Attention kernels against the materialised reference: values, gradients, memory."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from r1jax.model import LatentCache, ModelConfig, Transformer, init_params
from r1jax.model.attention import attend, choose_attention
from r1jax.model.attention_kernels import dot_product_attention, splash


def _inputs(B, T, S, H, parts, V, Gv, seed=0):
  """q parts [B,T,H,E], k parts [B,S,G,E] for parts = ((E, G), ...), v [B,S,Gv,V]."""
  r = np.random.RandomState(seed)
  qs = tuple(jnp.asarray(r.randn(B, T, H, E), jnp.float32) for E, _ in parts)
  ks = tuple(jnp.asarray(r.randn(B, S, G, E), jnp.float32) for E, G in parts)
  return qs, ks, jnp.asarray(r.randn(B, S, Gv, V), jnp.float32)


def _left_padded(pads, S):
  return jnp.asarray(np.arange(S)[None] >= np.asarray(pads)[:, None])


def _run(fn, qs, ks, v, rows_BxT):
  """(output, grads w.r.t. (qs, ks, v)) of a fixed random projection of rows_BxT."""
  def loss(qs, ks, v):
    out = fn(qs, ks, v)
    w = jax.random.normal(jax.random.key(7), out.shape)
    return jnp.sum(jnp.where(rows_BxT[:, :, None, None], out * w, 0.0)), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(qs, ks, v)
  return out, grads


def _assert_parity(got, want, rows_BxT, atol=1e-5):
  out, grads = got
  out_ref, grads_ref = want
  assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  rows = np.asarray(rows_BxT)
  np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(out_ref)[rows], atol=atol, rtol=0)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, atol=atol, rtol=0)


# (B, T, S, start, block): the training form, then decode (T=1 step, T=3 chunk) at start > 0.
CASES = {
    "train": (8, 13, 13, 0, 4),
    "decode_step": (3, 1, 11, 7, 4),
    "decode_chunk": (3, 3, 11, 5, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_kernels_match_reference(case):
  """Blocked kernel and the cuDNN wrapper (run with implementation="xla") against the
  reference: outputs at valid query rows, all gradients, ragged left padding."""
  B, T, S, start, block = CASES[case]
  H = 2
  # Training: per-head k_nope part + shared k_pe part, per-head v. Decode: all shared.
  parts, Gv = ((((5, H), (3, 1)), H) if case == "train" else (((6, 1), (3, 1)), 1))
  qs, ks, v = _inputs(B, T, S, H, parts, 4, Gv)
  pads = np.array([0, 3, 6, 9, 12, 13, 2, 1][:B])  # "train": rows 2-5 start fully masked
  valid_BxS = _left_padded(pads, S) & (jnp.arange(S) < start + T)[None]
  rows_BxT = (start + jnp.arange(T))[None] >= jnp.asarray(pads)[:, None]
  attend_with = lambda impl: lambda qs, ks, v: attend(  # noqa: E731
      qs, ks, v, start, valid_BxS, scale=0.3, impl=impl, block=block)
  want = _run(attend_with("reference"), qs, ks, v, rows_BxT)
  if case == "train":  # the blocked kernel under a batch-sharded jit
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))  # as r1jax's meshes
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
    qs, ks, v = jax.tree.map(put, (qs, ks, v))
  # The blocked loss reads every row: a fully masked row must output 0 and pass back
  # exactly no gradient, so its gradients still equal the reference's over valid rows.
  out, grads = got = _run(attend_with("blocked"), qs, ks, v, jnp.ones_like(rows_BxT))
  _assert_parity(got, want, rows_BxT)
  np.testing.assert_array_equal(np.asarray(out)[~np.asarray(rows_BxT)], 0.0)
  if case == "train":
    assert out.sharding.spec[0] == "data"
  xla = _run(lambda qs, ks, v: dot_product_attention(
      qs, ks, v, start, valid_BxS, scale=0.3, implementation="xla"), qs, ks, v, rows_BxT)
  _assert_parity(xla, want, rows_BxT)


@pytest.mark.parametrize("case", ["train", "decode_chunk"])
def test_grouped_kv_heads_equal_repeated_heads(case):
  """GQA: 2 key/value heads serving 4 query heads (head h reads kv head h // 2)
  equal the same attention with each kv head repeated to its query heads, in
  every CPU-runnable kernel, outputs and gradients (the kv gradient summed over
  its group)."""
  B, T, S, start, block = CASES[case]
  H, G = 4, 2
  qs, ks, v = _inputs(B, T, S, H, ((6, G),), 5, G, seed=3)
  valid_BxS = _left_padded([0, 3, 1, 2, 0, 4, 2, 1][:B], S) & (jnp.arange(S) < start + T)[None]
  rows_BxT = jnp.ones((B, T), bool) & valid_BxS[:, start:start + T]
  rep = lambda x: jnp.repeat(x, H // G, axis=2)  # noqa: E731
  want = _run(lambda qs, ks, v: attend(qs, tuple(map(rep, ks)), rep(v), start, valid_BxS,
                                       scale=0.3, impl="reference"), qs, ks, v, rows_BxT)
  for impl in ("reference", "blocked"):
    got = _run(lambda qs, ks, v: attend(qs, ks, v, start, valid_BxS, scale=0.3, impl=impl,
                                        block=block), qs, ks, v, rows_BxT)
    _assert_parity(got, want, rows_BxT)
  xla = _run(lambda qs, ks, v: dot_product_attention(
      qs, ks, v, start, valid_BxS, scale=0.3, implementation="xla"), qs, ks, v, rows_BxT)
  _assert_parity(xla, want, rows_BxT)


@pytest.mark.parametrize("parts,Gv", [(((5, 4), (3, 1)), 4), (((6, 2),), 2)])
def test_causal_chunks_equal_full_scores(monkeypatch, parts, Gv):
  """The reference kernel's training form runs in query chunks (each scoring only
  the keys up to its last row) with a written-out backward: outputs and gradients
  equal the full masked T×T scores, for MLA's parts (per-head + shared key) and
  GQA's grouped heads, with left padding and a length no chunk divides."""
  from r1jax.model import attention
  monkeypatch.setattr(attention, "_CAUSAL_CHUNK", 8)
  B, T, H = 4, 29, 4
  qs, ks, v = _inputs(B, T, T, H, parts, 5, Gv, seed=5)
  pads = np.array([0, 3, 11, 28])
  valid_BxS = _left_padded(pads, T)
  rows_BxT = valid_BxS
  full = lambda qs, ks, v: attention._reference(qs, ks, v, 0, valid_BxS, 0.3)  # noqa: E731
  chunked = lambda qs, ks, v: attend(qs, ks, v, 0, valid_BxS, scale=0.3,  # noqa: E731
                                     impl="reference")
  jaxpr = str(jax.make_jaxpr(chunked)(qs, ks, v))
  assert "custom_vjp_call" in jaxpr and f"{T},{T}" not in jaxpr.replace(" ", "")
  _assert_parity(_run(chunked, qs, ks, v, rows_BxT), _run(full, qs, ks, v, rows_BxT), rows_BxT)


def test_blocked_backward_holds_no_score_matrix():
  """At T = S = 1024 nothing in the blocked gradient's program is T×S; the materialised
  reference's is, and the reference kernel's causal chunks hold [B,H,64,T] at most
  (their saved probabilities still add up to more than T×T floats)."""
  B, T, H, block = 1, 1024, 2, 128
  qs, ks, v = _inputs(B, T, T, H, ((8, H), (4, 1)), 8, H)
  valid_BxS = jnp.ones((B, T), bool)

  def grad_fn(impl):
    loss = lambda qs, ks, v: attend(qs, ks, v, 0, valid_BxS, scale=0.3, impl=impl,  # noqa: E731
                                    block=block).sum()
    return jax.grad(loss, (0, 1, 2))

  def largest(jaxpr):
    sizes = [np.prod(a.aval.shape, dtype=np.int64) for e in jaxpr.eqns for a in e.outvars
             if hasattr(a.aval, "shape")]
    subs = [largest(s.jaxpr if hasattr(s, "jaxpr") else s)
            for e in jaxpr.eqns for s in jax.extend.core.jaxprs_in_params(e.params)]
    return max(sizes + subs + [0])

  from r1jax.model import attention
  full = lambda qs, ks, v: attention._reference(qs, ks, v, 0, valid_BxS, 0.3).sum()  # noqa: E731
  assert largest(jax.make_jaxpr(grad_fn("blocked"))(qs, ks, v).jaxpr) < T * T
  assert largest(jax.make_jaxpr(jax.grad(full, (0, 1, 2)))(qs, ks, v).jaxpr) >= B * H * T * T
  assert largest(jax.make_jaxpr(grad_fn("reference"))(qs, ks, v).jaxpr) == B * H * 64 * T
  temp = {impl: jax.jit(grad_fn(impl)).lower(qs, ks, v).compile().memory_analysis()
          .temp_size_in_bytes for impl in ("blocked", "reference")}
  assert temp["blocked"] < T * T * 4 <= temp["reference"], temp


def test_splash_interpret_matches_reference():
  """TPU splash attention's Pallas kernel in interpret mode on CPU (T padded to 128)."""
  B, T, H = 2, 20, 2
  qs, ks, v = _inputs(B, T, T, H, ((5, H), (3, 1)), 4, H, seed=4)
  valid_BxS = _left_padded([0, 7], T)
  got = _run(lambda qs, ks, v: splash(qs, ks, v, valid_BxS, scale=0.3, interpret=True),
             qs, ks, v, valid_BxS)
  want = _run(lambda qs, ks, v: attend(qs, ks, v, 0, valid_BxS, scale=0.3, impl="reference"),
              qs, ks, v, valid_BxS)
  _assert_parity(got, want, valid_BxS)


def test_choose_attention_rule():
  kw = dict(B=8, T=256, S=256, H=8, E=24, V=16, static_start=True)
  assert choose_attention("auto", dtype="float32", backend="cpu", **kw) == "reference"
  assert choose_attention("auto", dtype="float32", backend="cpu",
                          **{**kw, "T": 4096, "S": 4096}) == "blocked"
  assert choose_attention("auto", dtype="float32", backend="cpu",
                          **{**kw, "B": 1, "T": 1, "S": 16384}) == "blocked"
  assert choose_attention("auto", dtype="bfloat16", backend="gpu", **kw) == "cudnn"
  assert choose_attention("auto", dtype="float32", backend="gpu", **kw) == "blocked"
  # V3's decode form: one shared head of C + R = 576 dims is past cuDNN's limit.
  decode = {**kw, "T": 1, "E": 576, "V": 512, "static_start": False}
  assert choose_attention("cudnn", dtype="bfloat16", backend="gpu", **decode) == "blocked"
  assert choose_attention("auto", dtype="bfloat16", backend="tpu", **kw) == "splash"
  assert choose_attention("splash", dtype="bfloat16", backend="tpu", **decode) == "blocked"


def test_bad_attention_settings_fail_in_one_line():
  for bad in (dict(attention="flash"), dict(attention_block=0)):
    with pytest.raises(ValueError, match="attention") as e:
      ModelConfig.tiny(**bad)
    assert "\n" not in str(e.value)
  for impl, backend, dtype in (("cudnn", "cpu", "bfloat16"), ("splash", "gpu", "bfloat16"),
                               ("cudnn", "gpu", "float32"), ("bogus", "cpu", "float32")):
    with pytest.raises(ValueError, match="attention") as e:
      choose_attention(impl, B=1, T=4, S=4, H=1, E=8, V=8, dtype=dtype,
                       static_start=True, backend=backend)
    assert "\n" not in str(e.value)


def test_transformer_blocked_matches_reference():
  """Tiny V3 (a scanned MoE block, remat'd in the blocked run): logits and parameter
  gradients at valid positions; then the blocked decode form, two 4-token chunks
  through the latent cache, against the reference training form."""
  B, T, block = 3, 11, 4
  cfgs = {a: ModelConfig.tiny(attention=a, attention_block=block, remat=a == "blocked",
                              n_layers=1, n_dense_layers=0, mtp_depth=0)  # one MoE block
          for a in ("reference", "blocked")}
  params = jax.jit(init_params, static_argnums=0)(cfgs["reference"], jax.random.key(0))
  tok = jax.random.randint(jax.random.key(1), (B, T), 0, 512)
  pads = jnp.asarray([0, 2, 5])
  valid = jnp.arange(T)[None] >= pads[:, None]
  pos = jnp.maximum(jnp.arange(T)[None] - pads[:, None], 0)
  rows = np.asarray(valid)

  def loss(p, cfg):
    logits = Transformer(cfg).apply({"params": p}, tok, pos, valid)
    w = jax.random.normal(jax.random.key(2), logits.shape)
    return jnp.sum(jnp.where(valid[..., None], logits * w, 0.0)), logits

  out = {a: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, c)
         for a, c in cfgs.items()}
  (_, logits), grads = out["blocked"]
  (_, logits_ref), grads_ref = out["reference"]
  assert np.isfinite(logits).all()
  np.testing.assert_allclose(np.asarray(logits)[rows], np.asarray(logits_ref)[rows], atol=1e-5)
  # Parameter gradients sum over all positions: compare relative to each one's scale.
  errs = jax.tree.map(lambda a, b: float(np.abs(a - b).max() / max(1.0, np.abs(b).max())),
                      grads, grads_ref)
  assert max(jax.tree.leaves(errs)) < 1e-5, errs

  # Decode: slots [0, 4) then [4, 8) of a 12-slot cache (one program: start is traced).
  S, C = 12, 4
  slots = jnp.arange(S)[None]
  dec = jax.jit(lambda p, *args: Transformer(cfgs["blocked"]).apply(
      {"params": p}, *args, method="decode"))
  cache, chunks = LatentCache.zeros(cfgs["blocked"], B, S), []
  for start in (0, C):
    end = start + C
    step, cache = dec(params, tok[:, start:end], pos[:, start:end], cache, start,
                      (slots < end) & (slots >= pads[:, None]))
    chunks.append(step)
  got, dec_rows = np.concatenate(chunks, 1), rows[:, :2 * C]
  assert np.isfinite(got).all()
  # The absorbed form reassociates W_uk/W_uv products: test_model's tolerance.
  np.testing.assert_allclose(got[dec_rows], np.asarray(logits_ref)[:, :2 * C][dec_rows], atol=2e-5)
