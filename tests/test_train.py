"""Training: SFT steps lower the loss, the router bias moves only by its rule, resume is exact."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.train import optim, sft


@pytest.fixture(scope="module")
def pattern_batch(tiny_cfg):
  # Every row counts upward from a random start: easy to learn, impossible without training.
  starts = np.arange(8)[:, None] * 37
  tokens = (starts + np.arange(24)[None]) % (tiny_cfg.vocab_size - 4) + 4
  loss_mask = np.ones_like(tokens)
  loss_mask[:, :4] = 0  # the first tokens are a "prompt"
  return {"tokens": jnp.asarray(tokens, jnp.int32), "loss_mask": jnp.asarray(loss_mask),
          "valid": jnp.ones_like(jnp.asarray(tokens))}


def test_sft_steps_lower_the_loss_and_move_bias_by_rule(tiny_cfg, tiny_params, pattern_batch):
  opt = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=20))
  step = jax.jit(sft.make_train_step(tiny_cfg, opt))
  state = sft.init_state(tiny_params, opt)
  losses = []
  for _ in range(12):
    state, m = step(state, pattern_batch)
    losses.append(float(m["lm_loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  assert np.isfinite(losses).all()
  # The correction bias moved, and only in whole steps of γ (sign rule, no gradient).
  bias = np.asarray(state.params["moe_layers"]["moe"]["router"]["bias"])
  units = bias / tiny_cfg.bias_update_rate
  assert np.abs(bias).max() > 0
  np.testing.assert_allclose(units, np.round(units), atol=1e-3)


def test_router_bias_gets_no_gradient(tiny_cfg, tiny_params, pattern_batch):
  grads = jax.grad(lambda p: sft.loss_fn(p, pattern_batch, tiny_cfg)[0])(tiny_params)
  assert float(jnp.abs(grads["moe_layers"]["moe"]["router"]["bias"]).max()) == 0.0
  assert float(jnp.abs(grads["moe_layers"]["moe"]["router"]["kernel"]).max()) > 0.0
  labels = jax.tree_util.tree_map_with_path(optim._label, tiny_params)
  assert labels["moe_layers"]["moe"]["router"]["bias"] == "frozen"
  assert labels["final_norm"]["scale"] == "no_decay"
  assert labels["embed"]["embedding"] == "decay"
