"""The MTP module's MoE is balanced like the main stack's, and depth k chains depth k−1's block.

DeepSeek-V3 §2.2: module k projects [RMSNorm(h^{k-1}); RMSNorm(Emb(t_{i+k}))]
and runs one block; h^{k-1} is the previous module's block output (before the
norm that feeds the shared head). Depth 1 takes the main model's output.

Glossary: B batch, T tokens, D d_model, E routed experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import ModelConfig, Transformer, init_params
from r1jax.model.layers import Linear, RMSNorm
from r1jax.model.transformer import Block
from r1jax.train import sft

B, T = 2, 12
CFG = ModelConfig.tiny(mtp_depth=2, n_layers=1, n_dense_layers=0, seq_aux_loss_alpha=0.01)


@pytest.fixture(scope="module")
def params():
  return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


def _batch(cfg: ModelConfig, seed: int = 0) -> dict:
  tokens_BxT = jax.random.randint(jax.random.key(seed), (B, T), 1, cfg.vocab_size)
  valid_BxT = jnp.ones((B, T), bool).at[1, -3:].set(False)
  return dict(tokens=tokens_BxT, valid=valid_BxT, loss_mask=valid_BxT)


def test_mtp_router_bias_moves_and_its_balance_loss_counts(params):
  cfg = CFG.replace(mtp_depth=1)
  params = {k: v for k, v in params.items() if k != "mtp_1"}
  batch = _batch(cfg)

  # The train step's two halves (r1jax/train/sft.py): the loss, then after the
  # optimizer the bias rule reading the loss's expert loads.
  @jax.jit
  def loss_and_aux(params, batch):
    _, aux = Transformer(cfg).apply({"params": params}, batch["tokens"], None, batch["valid"],
                                    return_aux=True)
    return sft.loss_fn(params, batch, cfg), aux

  (loss, m), aux = loss_and_aux(params, batch)
  assert float(jnp.sum(aux["mtp_balance"])) > 0
  # The MTP block's balance loss enters the loss beside the main layers'.
  want = float(jnp.sum(aux["balance"]) + jnp.sum(aux["mtp_balance"]))
  np.testing.assert_allclose(float(m["balance_loss"]), want, rtol=1e-5)
  np.testing.assert_allclose(
      float(loss), float(m["lm_loss"] + cfg.mtp_loss_weight * m["mtp_loss"])
      + cfg.seq_aux_loss_alpha * want, rtol=1e-6)

  # Both the main and the MTP routers' biases move by the sign rule, each by its own load.
  new = sft.apply_bias_update(params, m["expert_load"], cfg.bias_update_rate)
  for bias_E, load_E in ((new["moe_layers"]["moe"]["router"]["bias"][0], aux["expert_load"][0]),
                         (new["mtp_0"]["block"]["moe"]["router"]["bias"],
                          aux["mtp_expert_load"][0])):
    units_E = np.asarray(bias_E) / cfg.bias_update_rate
    load_E = np.asarray(load_E, np.float64)
    assert np.abs(units_E).max() > 0.5
    np.testing.assert_allclose(units_E, np.sign(load_E.mean() - load_E), atol=1e-4)


def test_second_mtp_depth_takes_the_first_blocks_output(params):
  cfg = CFG
  # Norm gains of 1 (their init) make RMSNorm(RMSNorm(h)) = RMSNorm(h), which
  # would hide which representation is chained: give them random gains.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * jax.random.uniform(jax.random.key(len(path)), x.shape, x.dtype, 0.5, 1.5)
      if jax.tree_util.keystr(path).endswith("['scale']") else x, params)
  tokens_BxT = _batch(cfg)["tokens"]
  valid_BxT = jnp.ones((B, T), bool)
  pos_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  model = Transformer(cfg)
  dt = jnp.float32
  norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dt, dt)
  proj = Linear((2 * cfg.d_model,), (cfg.d_model,), ("mtp_embed", "embed"), dt, dt)
  block = Block(cfg, moe=True)

  @jax.jit
  def both(params, tokens_BxT):
    """(the model's MTP logits [2, B, T, V], the same composed by hand from the
    modules' pieces, V3 eq. 21-23)."""
    _, aux = model.apply({"params": params}, tokens_BxT, pos_BxT, valid_BxT, return_aux=True)
    h_BxTxD = model.apply({"params": params}, tokens_BxT, method=lambda m, t: m.final_norm(
        m._stacks(m.embed(t), pos_BxT, valid_BxT, None, None)[0]))
    want = []
    for k in (1, 2):
      p = params[f"mtp_{k - 1}"]
      shifted_BxT = jnp.concatenate([tokens_BxT[:, k:], jnp.zeros((B, k), tokens_BxT.dtype)], 1)
      ok_BxT = valid_BxT & (jnp.arange(T) < T - k)[None]
      x_BxTxD = proj.apply({"params": p["eh_proj"]}, jnp.concatenate(
          [norm.apply({"params": p["enorm"]}, params["embed"]["embedding"][shifted_BxT]),
           norm.apply({"params": p["hnorm"]}, h_BxTxD)], -1))
      h_BxTxD = block.apply({"params": p["block"]}, x_BxTxD, None, pos_BxT, ok_BxT, None)[0]
      want.append(model.apply({"params": params}, norm.apply({"params": p["norm"]}, h_BxTxD),
                              method="head"))
    return aux["mtp_logits"], jnp.stack(want)

  got_KxBxTxV, want_KxBxTxV = both(params, tokens_BxT)
  np.testing.assert_allclose(got_KxBxTxV, want_KxBxTxV, atol=2e-5, rtol=1e-5)
