"""The chunked output head equals the full-logits computation, values and gradients,
and its compiled loss holds no [B, T, V] float32 buffer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import LatentCache, ModelConfig, Transformer, init_params
from r1jax.model import head as head_lib
from r1jax.rl import grpo, update
from r1jax.rl.rollout import _truncate, model_decode_fn
from r1jax.train import sft

# Dense (MoE compiles slowly on XLA:CPU and does not touch the head); chunk 5
# divides no T below.
CFG = ModelConfig.tiny(n_layers=1, n_dense_layers=1, mtp_depth=2, logits_chunk=5)


def _max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def params():
  return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(3))


def _full_nll(logits_BxTxV, targets_BxT, mask_BxT):
  return sft.token_cross_entropy(logits_BxTxV, targets_BxT, mask_BxT)


@pytest.mark.parametrize("tied", [False, True])
def test_head_matches_full_logits(tied):
  """target_logprobs vs log-softmax of full logits: temperature, top-k/top-p, tied weights."""
  B, T, D, V = 2, 13, 16, 64
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k1, (B, T, D))
  w = jax.random.normal(k2, (V, D) if tied else (D, V))
  targets = jax.random.randint(k3, (B, T), 0, V)
  temp = 0.7

  def chunked(h, w, **cut):
    return head_lib.target_logprobs(h, head_lib.HeadWeights(w, tied, jnp.float32), targets,
                                    chunk=4, temperature=temp, **cut)

  def full(h, w, top_k=0, top_p=1.0):
    logits = head_lib.project(h, head_lib.HeadWeights(w, tied, jnp.float32)) / temp
    logits = _truncate(logits.reshape(B * T, V), top_k, top_p).reshape(B, T, V)
    return update.token_logprobs(logits, targets)

  objective = lambda f: lambda h, w: sum(jnp.sum(x * c) for x, c in zip(f(h, w), (1.0, 0.3)))
  np.testing.assert_allclose(chunked(h, w), full(h, w), atol=1e-5, rtol=0)
  grads = jax.grad(objective(chunked), (0, 1))(h, w)
  want = jax.grad(objective(full), (0, 1))(h, w)
  assert _max_diff(grads, want) < 1e-5
  # Under the sampler's cut: cut tokens add 0 to the entropy, and their logp is -inf.
  cut = dict(top_k=9, top_p=0.8)
  got, want = chunked(h, w, **cut), full(h, w, **cut)
  np.testing.assert_array_equal(np.isfinite(got[0]), np.isfinite(want[0]))
  assert not np.all(np.isfinite(got[0]))  # some targets were cut
  np.testing.assert_allclose(np.where(np.isfinite(got[0]), got[0], 0),
                             np.where(np.isfinite(want[0]), want[0], 0), atol=1e-5, rtol=0)
  np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=0)


def _sft_reference(params, batch, cfg):
  """sft.loss_fn as it was: full [B,T,V] logits for the main head and each MTP depth."""
  tokens, mask = batch["tokens"], batch["loss_mask"] & batch["valid"]
  logits, aux = Transformer(cfg).apply({"params": params}, tokens, None, batch["valid"],
                                       return_aux=True)
  s, n = _full_nll(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
  loss = s / n
  mtp = [_full_nll(aux["mtp_logits"][k - 1][:, :-(k + 1)], tokens[:, k + 1:], mask[:, k + 1:])
         for k in range(1, cfg.mtp_depth + 1)]
  loss += cfg.mtp_loss_weight * jnp.mean(jnp.stack([s / n for s, n in mtp]))
  return loss


def test_sft_loss_with_mtp_matches_full_logits(params):
  cfg = CFG.replace(remat=True)  # the MTP blocks are rematerialised too
  B, T = 2, 13
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  valid = jnp.arange(T)[None].repeat(B, 0) < jnp.array([[T], [T - 3]])
  batch = dict(tokens=tokens, valid=valid, loss_mask=jnp.arange(T)[None].repeat(B, 0) >= 2)
  got_fn = jax.value_and_grad(lambda p: sft.loss_fn(p, batch, cfg)[0])
  want_fn = jax.value_and_grad(lambda p: _sft_reference(p, batch, cfg))
  (loss, grads), (want, want_grads) = jax.jit(lambda p: (got_fn(p), want_fn(p)))(params)
  assert abs(float(loss) - float(want)) < 1e-5
  assert _max_diff(grads, want_grads) < 1e-5
  assert float(jnp.max(jnp.abs(grads["mtp_1"]["eh_proj"]["kernel"]))) > 0  # depth 2 trains


def test_mtp_block_is_rematerialised_under_remat():
  def n_checkpoints(depth):
    cfg = CFG.replace(remat=True, mtp_depth=depth)
    p = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tok = jnp.zeros((1, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: Transformer(cfg).apply({"params": p}, tok, return_aux=True))(p)
    return len(re.findall(r"\b(?:remat2|checkpoint)\[", str(jaxpr)))

  assert n_checkpoints(2) - n_checkpoints(0) == 2


def _grpo_batch(cfg, B=2, Pn=4, N=7):
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, cfg.vocab_size, (B, Pn))
  tokens = rng.integers(0, cfg.vocab_size, (B, N))
  arrays = update.training_arrays(
      dict(prompts=prompts, prompt_lengths=np.array([Pn, 2]), tokens=tokens,
           mask=np.arange(N)[None] < np.array([[N], [4]]), finished=np.ones(B, bool)),
      rng.normal(size=B).astype(np.float32), mask_truncated=False)
  batch = {k: jnp.asarray(v) for k, v in arrays.items()}
  batch["old_logp"] = jnp.asarray(rng.normal(-4.0, 0.3, (B, N)), jnp.float32)
  batch["ref_logp"] = jnp.asarray(rng.normal(-4.0, 0.3, (B, N)), jnp.float32)
  return batch


def test_grpo_loss_and_logprobs_match_full_logits(params):
  cfg, temp = CFG.replace(mtp_depth=0), 0.7
  batch = _grpo_batch(cfg)
  N = batch["mask"].shape[1]
  args = (batch["tokens"], batch["positions"], batch["valid"])
  opts = dict(beta=0.04, eps_low=0.2, eps_high=0.28)

  def reference(p):
    logits, aux = update.completion_logits(cfg, p, *args, completion_len=N, temperature=temp)
    logp, ent = update.token_logprobs(logits, batch["tokens"][:, -N:])
    loss, m = grpo.grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"],
                             batch["mask"], entropy_BxT=ent, **opts)
    return loss, m["entropy"]

  loss_fn = update.make_loss_fn(cfg, temperature=temp, **opts)
  got_fn = jax.value_and_grad(lambda p: loss_fn(p, batch, None), has_aux=True)
  want_fn = jax.value_and_grad(reference, has_aux=True)
  ((loss, metrics), grads), ((want, want_ent), want_grads) = jax.jit(
      lambda p: (got_fn(p), want_fn(p)))(params)
  assert abs(float(loss) - float(want)) < 1e-5
  assert _max_diff(grads, want_grads) < 1e-5
  assert abs(float(metrics["entropy"]) - float(want_ent)) < 1e-5

  # logprob_fn: π_old, π_ref and the truncated (sampler's) log-probs.
  top_k, top_p = 50, 0.9
  old, ref, sampled = jax.jit(update.make_logprob_fn(cfg, temp, top_p, top_k))(
      params, params, batch)
  logits = update.completion_logits(cfg, params, *args, completion_len=N, temperature=temp)[0]
  tokens_BxN = batch["tokens"][:, -N:]
  want_old = update.token_logprobs(logits, tokens_BxN)[0]
  cut = _truncate(logits.reshape(-1, logits.shape[-1]), top_k, top_p).reshape(logits.shape)
  want_sampled = update.token_logprobs(cut, tokens_BxN)[0]
  np.testing.assert_allclose(old, want_old, atol=1e-5, rtol=0)
  np.testing.assert_allclose(ref, want_old, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.isfinite(sampled), np.isfinite(want_sampled))
  assert not np.all(np.isfinite(sampled))  # random tokens fall outside the nucleus
  fin = np.isfinite(want_sampled)
  np.testing.assert_allclose(np.asarray(sampled)[fin], np.asarray(want_sampled)[fin], atol=1e-5)


def test_prefill_computes_only_the_last_logits(params):
  cfg = CFG
  B, Pn = 2, 6
  tok = jax.random.randint(jax.random.key(4), (B, Pn), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(Pn), (B, Pn))
  valid = jnp.arange(Pn + 2)[None].repeat(B, 0) < Pn
  model = Transformer(cfg)

  @jax.jit
  def both(p):
    cache = LatentCache.zeros(cfg, B, Pn + 2)
    full, c_full = model.apply({"params": p}, tok, pos, cache, 0, valid, method="decode")
    last, c_last = model_decode_fn(cfg, p)(cache, tok, pos, 0, valid)
    return full, last, c_full, c_last

  full, last, c_full, c_last = both(params)
  assert last.shape == (B, 1, cfg.vocab_size)
  np.testing.assert_allclose(last, full[:, -1:], atol=1e-5, rtol=0)
  assert _max_diff(c_full, c_last) == 0.0


def test_chunked_loss_holds_no_BxTxV_buffer():
  """Compiled memory of the head's loss + gradient at V=8192, T=256: full vs chunks of 32."""
  B, T, D, V = 2, 256, 32, 8192
  h = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
  w = jax.ShapeDtypeStruct((D, V), jnp.float32)
  tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
  mask = jax.ShapeDtypeStruct((B, T), bool)

  def chunked(h, w, tok, mask):
    return head_lib.shifted_nll(h, head_lib.HeadWeights(w, False, jnp.float32), tok, mask, 1,
                                chunk=32)[0]

  def full(h, w, tok, mask):
    logits = head_lib.project(h, head_lib.HeadWeights(w, False, jnp.float32))
    return _full_nll(logits[:, :-1], tok[:, 1:], mask[:, 1:])[0]

  def temp_bytes(f):
    compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(h, w, tok, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  bxtxv = B * T * V * 4
  full_b, chunked_b = temp_bytes(full), temp_bytes(chunked)
  assert full_b >= bxtxv
  assert chunked_b < bxtxv / 2, (chunked_b, full_b)
