"""Numerics and compilation settings: bf16 trains like f32, remat changes no gradient.

Both on the tiny model cut to one dense and one MoE layer, no MTP.

Glossary: B batch, T tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import ModelConfig, abstract_params, init_params
from r1jax.train import optim, sft

B, T = 2, 16


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
  return ModelConfig.tiny(n_layers=2, mtp_depth=0)


@pytest.fixture(scope="module")
def params(cfg):
  return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def batch(cfg):
  tokens_BxT = jax.random.randint(jax.random.key(1), (B, T), 1, cfg.vocab_size)
  valid_BxT = jnp.ones((B, T), bool).at[1, -4:].set(False)
  return dict(tokens=tokens_BxT, valid=valid_BxT, loss_mask=valid_BxT)


def _loss_and_grads(cfg: ModelConfig, params, batch):
  fn = jax.jit(jax.value_and_grad(lambda p, b: sft.loss_fn(p, b, cfg), has_aux=True))
  (loss, _), grads = fn(params, batch)
  return float(loss), grads


@pytest.fixture(scope="module")
def f32_loss_and_grads(cfg, params, batch):
  return _loss_and_grads(cfg, params, batch)


def test_scan_layers_is_not_a_setting():
  # Layers are always scanned; a flag nothing reads would only mislead.
  assert "scan_layers" not in {f.name for f in dataclasses.fields(ModelConfig)}
  with pytest.raises(TypeError):
    ModelConfig.tiny(scan_layers=False)


def test_remat_gives_the_same_gradients(cfg, params, batch, f32_loss_and_grads):
  loss, grads = f32_loss_and_grads
  loss_r, grads_r = _loss_and_grads(cfg.replace(remat=True), params, batch)
  assert loss_r == pytest.approx(loss, abs=1e-6)
  flat, flat_r = jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_r)
  for (path, g), g_r in zip(flat, flat_r, strict=True):
    np.testing.assert_allclose(g_r, g, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_bf16_train_step(cfg, params, batch, f32_loss_and_grads):
  cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  # The f32 weights rounded to each parameter's bf16 dtype (router biases stay f32).
  params16 = jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract_params(cfg16))
  assert jax.tree.leaves(params16["lm_head"])[0].dtype == jnp.bfloat16
  optimizer = optim.make_optimizer(optim.OptimConfig(warmup_steps=1, total_steps=10))
  state = sft.init_state(params16, optimizer)
  state, m = jax.jit(sft.make_train_step(cfg16, optimizer))(state, batch)
  loss16 = float(m["loss"])
  # bf16 keeps 8 significant bits: the loss (~ln V) agrees to about 1%.
  assert np.isfinite(loss16)
  assert loss16 == pytest.approx(f32_loss_and_grads[0], rel=2e-2)
  assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params16), strict=True):
    assert a.dtype == b.dtype and bool(jnp.all(jnp.isfinite(a.astype(jnp.float32))))
  assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(state.params),
                                                   jax.tree.leaves(params16)))
  # The routers' bias rule ran (whole multiples of γ).
  units = np.asarray(state.params["moe_layers"]["moe"]["router"]["bias"]) / cfg.bias_update_rate
  assert np.abs(units).max() > 0.5
  np.testing.assert_allclose(units, np.round(units), atol=1e-3)
