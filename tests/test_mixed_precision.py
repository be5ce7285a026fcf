"""Mixed precision: bf16 parameters train through a float32 master copy; float32
parameters keep plain AdamW (same state, same numbers)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import ModelConfig, init_params
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import optim, sft

# lr 1e-6 on weights of 1.0: a 1e-6-relative step, far below bf16's spacing (2^-8 under 1).
TINY_LR = optim.OptimConfig(learning_rate=1e-6, warmup_steps=1, total_steps=100_000,
                            end_lr_fraction=1.0, weight_decay=0.0)


def _run(ocfg, params, n_steps: int):
  """n_steps of the optimizer on a constant gradient; returns (params, opt_state)."""
  opt = optim.make_optimizer(ocfg)
  grads = jax.tree.map(jnp.ones_like, params)

  def body(_, carry):
    p, s = carry
    updates, s = opt.update(grads, s, p)
    return optim.apply_updates(p, updates, s), s

  return jax.jit(lambda p: jax.lax.fori_loop(0, n_steps, body, (p, opt.init(p))))(params)


def test_a_tiny_relative_update_survives_on_bf16_weights():
  params = {"w": jnp.ones((16,), jnp.bfloat16)}
  plain = dataclasses.replace(TINY_LR, master_dtype="none")
  # Step 0 has lr 0 (the warmup's start); step 1 moves by 1e-6.
  p, s = _run(plain, params, 2)
  assert not isinstance(s, optim.MasterState)
  assert s[1].inner_states["decay"].inner_state[0].mu["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(p["w"]), np.asarray(params["w"]))  # rounded away
  p, s = _run(TINY_LR, params, 2)
  assert isinstance(s, optim.MasterState) and s.master["w"].dtype == jnp.float32
  assert p["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(p["w"]), np.asarray(params["w"]))
  np.testing.assert_allclose(np.asarray(s.master["w"]), 1.0 - 1e-6, rtol=0, atol=1e-7)
  # ~1950 steps of 1e-6 reach bf16's half spacing under 1.0: the weights move.
  p, s = _run(TINY_LR, params, 2500)
  # (each f32 step rounds 1e-6 to 17 ulps of 2^-24: 1.3 % drift, not 1e-6 lost)
  np.testing.assert_allclose(np.asarray(s.master["w"]), 1.0 - 2499e-6, rtol=0, atol=5e-5)
  np.testing.assert_array_equal(np.asarray(p["w"], np.float32), 1.0 - 2.0 ** -8)
  # The compute weights are the master rounded, not params + a rounded update.
  np.testing.assert_array_equal(np.asarray(p["w"]), np.asarray(s.master["w"].astype(jnp.bfloat16)))
  p, _ = _run(plain, params, 2500)
  np.testing.assert_array_equal(np.asarray(p["w"]), np.asarray(params["w"]))


@pytest.fixture(scope="module")
def bf16_model():
  cfg = ModelConfig.tiny(param_dtype="bfloat16", dtype="bfloat16", bias_update_rate=1e-3)
  return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))


def _n_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def test_optimizer_state_bytes_match_the_documented_formula(tiny_cfg, tiny_params, bf16_model):
  cfg, params = bf16_model
  n_all = _n_params(params)
  n_bias = sum(int(x.size) for p, x in jax.tree_util.tree_leaves_with_path(params)
               if optim.is_router_bias(p))
  assert n_bias > 0
  opt = optim.make_optimizer(optim.OptimConfig())
  state = jax.eval_shape(opt.init, params)
  # master 4 B per parameter + f32 mu, nu per trained parameter + 4 int32 step counts
  # (AdamW's and its learning-rate schedule's, for the decay and no-decay groups).
  assert optim.state_bytes(state) == 4 * n_all + 8 * (n_all - n_bias) + 16
  assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.float32)}
  # float32 parameters: no master, exactly plain AdamW's 8 B per trained parameter.
  state32 = jax.eval_shape(opt.init, tiny_params)
  assert not isinstance(state32, optim.MasterState)
  assert optim.state_bytes(state32) == 8 * (n_all - n_bias) + 16
  assert _n_params(tiny_params) == n_all


def test_float32_parameters_train_exactly_as_plain_adamw(tiny_cfg, tiny_params):
  batch = {"tokens": jnp.arange(48, dtype=jnp.int32).reshape(2, 24) + 4,
           "loss_mask": jnp.ones((2, 24), jnp.int32), "valid": jnp.ones((2, 24), jnp.int32)}
  ocfg = optim.OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=20)
  out = []
  for master in ("auto", "none"):
    opt = optim.make_optimizer(dataclasses.replace(ocfg, master_dtype=master))
    step = jax.jit(sft.make_train_step(tiny_cfg, opt))
    state = sft.init_state(tiny_params, opt)
    for _ in range(2):
      state, _ = step(state, batch)
    out.append(state)
  assert (jax.tree.structure(out[0].opt_state) == jax.tree.structure(out[1].opt_state))
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_training_moves_the_master_and_router_bias_and_checkpoints(bf16_model, tmp_path):
  cfg, params = bf16_model
  # Biases far from 0, where bf16 cannot hold a ±γ = 1e-3 step: only the master can.
  bias = params["moe_layers"]["moe"]["router"]["bias"]
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, 1.0) if optim.is_router_bias(p) else x, params)
  opt = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, warmup_steps=1,
                                               total_steps=20))
  batch = {"tokens": (jnp.arange(64, dtype=jnp.int32).reshape(4, 16) * 7) % 500 + 4,
           "loss_mask": jnp.ones((4, 16), jnp.int32), "valid": jnp.ones((4, 16), jnp.int32)}
  state = sft.init_state(params, opt)
  step = jax.jit(sft.make_train_step(cfg, opt))
  for _ in range(2):
    state, m = step(state, batch)
  assert float(m["skipped_nonfinite"]) == 0
  assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype, state.params, params))
  master_bias = state.opt_state.master["moe_layers"]["moe"]["router"]["bias"]
  units = (np.asarray(master_bias) - 1.0) / cfg.bias_update_rate
  assert np.abs(units).max() > 0.5  # the sign rule moved the master by whole γ steps
  np.testing.assert_allclose(units, np.round(units), atol=1e-2)
  np.testing.assert_array_equal(np.asarray(state.params["moe_layers"]["moe"]["router"]["bias"],
                                           np.float32), np.asarray(master_bias.astype(bias.dtype),
                                                                   np.float32))
  for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.opt_state.master)):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(p.dtype)))
  # The whole state (master included) survives a checkpoint round trip.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), every=1)
  ckpt.save(2, state, {"pos": 2}, force=True)
  ckpt.wait()
  restored, data = ckpt.restore(ckpt_lib.abstract_like(state))
  ckpt.close()
  assert data == {"pos": 2}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
