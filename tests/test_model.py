"""Invariants of the DeepSeek-V3 model: causality, decode = training form, MTP."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import LatentCache, ModelConfig, Transformer, init_params, param_counts


def _tokens(cfg, shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


@pytest.mark.parametrize("experts", ["auto", "dense"])
def test_causality(tiny_cfg, tiny_params, experts):
  # Changing token t moves nothing before t. Bitwise with the dense expert path;
  # with the sorted one (the default), token t's new experts reshuffle the other
  # rows among the experts' blocks, and XLA:CPU's matmuls may round a row
  # differently by its position in a block, so earlier positions agree to float
  # rounding (a leak shows at the 1e-3 level of the change itself).
  cfg = tiny_cfg.replace(grouped_matmul=experts)
  forward = jax.jit(lambda p, tok: Transformer(cfg).apply({"params": p}, tok, return_aux=True))
  same = np.testing.assert_array_equal if experts == "dense" else functools.partial(
      np.testing.assert_allclose, atol=3e-6, rtol=0)
  tok = _tokens(tiny_cfg, (2, 12))
  t = 7
  changed = tok.at[:, t].set((tok[:, t] + 1) % tiny_cfg.vocab_size)
  a, aux_a = forward(tiny_params, tok)
  b, aux_b = forward(tiny_params, changed)
  same(a[:, :t], b[:, :t])
  assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-3  # the change is seen from t on
  # MTP depth 1 at position i reads token i+1: positions < t-1 must not move.
  same(aux_a["mtp_logits"][0, :, :t - 1], aux_b["mtp_logits"][0, :, :t - 1])
  assert np.abs(aux_a["mtp_logits"][0, :, t - 1] - aux_b["mtp_logits"][0, :, t - 1]).max() > 1e-3


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_decode_form_equals_training_form(tiny_cfg, q_lora_rank):
  cfg = tiny_cfg.replace(q_lora_rank=q_lora_rank)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(2))
  model = Transformer(cfg)
  decode = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method="decode"))
  B, T, P = 2, 12, 9
  tok = _tokens(cfg, (B, T))
  full = jax.jit(model.apply)({"params": params}, tok)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  slots = jnp.arange(T)[None].repeat(B, 0)
  cache = LatentCache.zeros(cfg, B, T)
  logits, cache = decode(params, tok[:, :P], pos[:, :P], cache, 0, slots < P)
  steps = [logits]
  for t in range(P, T):  # one compilation: `start` is traced
    logits, cache = decode(params, tok[:, t:t + 1], pos[:, t:t + 1], cache, t, slots <= t)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5, rtol=0)
  # Only the latents are cached: (C + R) numbers per token per layer.
  assert cache.nbytes == cfg.n_layers * B * T * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_left_padding_matches_unpadded(tiny_cfg, tiny_params, tiny_forward):
  """A left-padded row with shifted positions and a validity mask gives the same logits."""
  tok = _tokens(tiny_cfg, (2, 12))
  alone, _ = tiny_forward(tiny_params, tok)
  pad = 5
  padded = jnp.concatenate([jnp.zeros((2, pad), tok.dtype), tok[:, :12 - pad]], 1)
  pos = jnp.broadcast_to(jnp.maximum(jnp.arange(12) - pad, 0), (2, 12))
  valid = jnp.broadcast_to(jnp.arange(12) >= pad, (2, 12))
  out, _ = tiny_forward(tiny_params, padded, pos, valid)
  np.testing.assert_allclose(out[:, pad:], alone[:, :12 - pad], atol=2e-5, rtol=0)


def test_expert_load_counts_valid_tokens(tiny_cfg, tiny_params, tiny_forward):
  tok = _tokens(tiny_cfg, (2, 12))
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  valid = jnp.arange(12)[None].repeat(2, 0) < jnp.array([[12], [6]])
  _, aux = tiny_forward(tiny_params, tok, pos, valid)
  np.testing.assert_allclose(aux["expert_load"].sum(-1), 18 * tiny_cfg.n_activated_experts)
  assert aux["balance"].shape == (tiny_cfg.n_moe_layers,)


def test_671b_parameter_count():
  counts = param_counts(ModelConfig.deepseek_v3_671b())
  # The official config counts 671,026,404,352 (router correction biases apart).
  assert counts["total"] == 671_026_404_352
  assert abs(counts["activated"] / 37e9 - 1) < 0.02
  assert abs(counts["activated_no_embed"] / 35.7e9 - 1) < 0.01
  assert abs(counts["mtp"] / 11.6e9 - 1) < 0.01
  assert counts["router_bias"] == (58 + 1) * 256


def test_tiny_config_validation():
  with pytest.raises(ValueError, match="n_expert_groups"):
    ModelConfig.tiny(n_routed_experts=6, n_expert_groups=4)
  with pytest.raises(ValueError, match="n_dense_layers"):
    ModelConfig.tiny(n_dense_layers=5)


@pytest.mark.parametrize("x_shape,w_shape,n_in,w_in_first", [
    ((2, 3, 8), (8, 5), 1, True),          # [B, T, D] · [D, F]
    ((2, 3, 4, 6), (4, 6, 7), 2, True),    # heads in: [B, T, H, V] · [H, V, D]
    ((2, 3, 8), (8, 4, 6), 1, True),       # heads out: [B, T, D] · [D, H, E]
    ((2, 3, 8), (9, 8), 1, False),         # tied head: [B, T, D] · [V, D]ᵀ
    ((0, 3, 8), (8, 5), 1, True),          # an empty batch
])
def test_matmul_2d_equals_tensordot_values_and_gradients(x_shape, w_shape, n_in, w_in_first):
  from r1jax.model.layers import matmul_2d
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape)
  ref = lambda x, w: (jnp.tensordot(x, w, n_in) if w_in_first  # noqa: E731
                      else jnp.tensordot(x, w, ((x.ndim - 1,), (1,))))
  ours = lambda x, w: matmul_2d(x, w, n_in, w_in_first)  # noqa: E731
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  assert ours(x, w).shape == ref(x, w).shape
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  for g_ours, g_ref in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)
