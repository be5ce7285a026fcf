"""Supervised fine-tuning (and LM pre-training): the loss and the train step.

The loss is next-token cross-entropy on the tokens whose `loss_mask` is set
(the response only, for SFT), plus the MTP loss (V3 report eq. 24-25: λ times
the mean over depths) and the sequence-wise balance loss (α·Σ_i f_i P_i per MoE
layer). After each optimizer step the routers' correction biases move by the
sign rule using the step's expert loads (aux-loss-free balancing).

Glossary: B batch, T tokens, V vocab, L MoE layers, E experts, K MTP depth.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from r1jax.model import ModelConfig, Transformer
from r1jax.model.moe import update_router_bias


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def token_cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
  """(sum of masked token losses, number of masked tokens)."""
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  nll_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  mask = mask_BxT.astype(jnp.float32)
  return jnp.sum(nll_BxT * mask), jnp.sum(mask)


def loss_fn(params, batch: dict, cfg: ModelConfig):
  """batch: tokens [B,T], loss_mask [B,T] (1 where token t is a target), valid [B,T].

  The main head's logits at position i target token i+1; MTP depth k's
  logits at position i target token i+k+1. Both count only masked targets.
  """
  tokens_BxT = batch["tokens"]
  valid_BxT = batch["valid"].astype(bool)
  target_mask_BxT = batch["loss_mask"].astype(bool) & valid_BxT
  B, T = tokens_BxT.shape
  positions_BxT = batch.get("positions")
  if positions_BxT is None:
    positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  logits_BxTxV, aux = Transformer(cfg).apply({"params": params}, tokens_BxT, positions_BxT,
                                             valid_BxT, return_aux=True)
  nll_sum, n_tok = token_cross_entropy(logits_BxTxV[:, :-1], tokens_BxT[:, 1:],
                                       target_mask_BxT[:, 1:])
  lm_loss = nll_sum / jnp.maximum(n_tok, 1.0)
  loss = lm_loss
  metrics = {"lm_loss": lm_loss, "tokens": n_tok}
  if "mtp_logits" in aux:
    mtp_losses = []
    for k in range(1, cfg.mtp_depth + 1):
      s, n = token_cross_entropy(aux["mtp_logits"][k - 1][:, :-(k + 1)], tokens_BxT[:, k + 1:],
                                 target_mask_BxT[:, k + 1:])
      mtp_losses.append(s / jnp.maximum(n, 1.0))
    mtp_loss = jnp.mean(jnp.stack(mtp_losses))
    loss = loss + cfg.mtp_loss_weight * mtp_loss
    metrics["mtp_loss"] = mtp_loss
  if "balance" in aux:
    balance = jnp.sum(aux["balance"])
    load_LxE = aux["expert_load"]
    if "mtp_balance" in aux:
      # The MTP blocks' MoE layers count like the main stack's: in the loss, and
      # as extra rows of the load (one per depth) for the bias rule.
      metrics["mtp_balance_loss"] = jnp.sum(aux["mtp_balance"])
      balance = balance + metrics["mtp_balance_loss"]
      load_LxE = jnp.concatenate([load_LxE, aux["mtp_expert_load"]], axis=0)
    loss = loss + cfg.seq_aux_loss_alpha * balance
    metrics["balance_loss"] = balance
    metrics["expert_load"] = load_LxE
  metrics["loss"] = loss
  return loss, metrics


def apply_bias_update(params, expert_load_LxE, rate: float):
  """b += γ·sign(mean_load − load) for the MoE stack, then the MTP blocks.

  Rows of the load: the main stack's L_moe layers, then one per MTP depth
  when the loss ran MTP (RL does not: its MTP routers stay as they are).
  """
  if "moe_layers" not in params or not rate:
    return params
  router = params["moe_layers"]["moe"]["router"]
  n_main = router["bias"].shape[0]
  new_bias = jax.vmap(update_router_bias, in_axes=(0, 0, None))(
      router["bias"], expert_load_LxE[:n_main], rate)
  new_router = {**router, "bias": new_bias}
  moe = {**params["moe_layers"]["moe"], "router": new_router}
  params = {**params, "moe_layers": {**params["moe_layers"], "moe": moe}}
  for k in range(expert_load_LxE.shape[0] - n_main):
    mtp = params[f"mtp_{k}"]
    router = mtp["block"]["moe"]["router"]
    bias = update_router_bias(router["bias"], expert_load_LxE[n_main + k], rate)
    moe = {**mtp["block"]["moe"], "router": {**router, "bias": bias}}
    params = {**params, f"mtp_{k}": {**mtp, "block": {**mtp["block"], "moe": moe}}}
  return params


def max_violation(expert_load_LxE) -> jax.Array:
  """MaxVio (V3 report): max load / mean load − 1, averaged over layers."""
  load = expert_load_LxE.astype(jnp.float32)
  return jnp.mean(load.max(-1) / jnp.maximum(load.mean(-1), 1e-9) - 1.0)


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def all_finite(tree) -> jax.Array:
  """True iff every element of every floating leaf of `tree` is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def apply_gradients(cfg: ModelConfig, optimizer: optax.GradientTransformation, params,
                    opt_state, grads, loss, metrics: dict):
  """One optimizer update, then the routers' bias rule from the step's expert loads.

  A non-finite loss, gradient or updated parameter refuses the whole update: params
  (router biases included) and optimizer state come back unchanged and
  metrics["skipped_nonfinite"] is 1. Not optax.apply_if_finite: it checks only
  the gradients, changes the optimizer state's structure, and applies the update
  anyway after N refusals; here the caller counts refusals and stops the run.

  Returns (params, opt_state, metrics with max_vio, grad_norm, skipped_nonfinite)."""
  finite = jnp.isfinite(loss) & all_finite(grads)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if "expert_load" in metrics:
    load_LxE = metrics.pop("expert_load")
    new_params = apply_bias_update(new_params, load_LxE, cfg.bias_update_rate)
    metrics["max_vio"] = max_violation(load_LxE)
  # An update that overflows (a huge learning rate) is refused the same way.
  finite = finite & all_finite(new_params)
  # A select, not lax.cond: XLA fuses it into the update, and a device-side branch
  # can cost a host round trip on GPU.
  keep = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(keep, new_params, params)
  opt_state = jax.tree.map(keep, new_opt_state, opt_state)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["skipped_nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
  return params, opt_state, metrics


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation):
  """train_step(state, batch) -> (state, metrics); pure, jit it with donated state.

  The step counter advances even when the update is refused (non-finite loss or
  gradient): the batch is consumed, so the step stays the data iterator's position
  and a resume continues on the batch after it."""

  def train_step(state: TrainState, batch: dict):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, cfg)
    params, opt_state, metrics = apply_gradients(cfg, optimizer, state.params, state.opt_state,
                                                 grads, loss, metrics)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step
