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
from r1jax.model import head as head_lib
from r1jax.model.moe import update_router_bias
from r1jax.train import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def token_cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
  """(sum of masked token losses, number of masked tokens) from full logits.

  The reference form; `loss_fn` runs the head in chunks (head.shifted_nll)."""
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  nll_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  mask = mask_BxT.astype(jnp.float32)
  return jnp.sum(nll_BxT * mask), jnp.sum(mask)


def loss_fn(params, batch: dict, cfg: ModelConfig):
  """batch: tokens [B,T], loss_mask [B,T] (1 where token t is a target), valid [B,T].

  The main head's logits at position i target token i+1; MTP depth k's
  logits at position i target token i+k+1. Both count only masked targets.
  The head runs cfg.logits_chunk positions at a time: no [B,T,V] logits.
  """
  tokens_BxT = batch["tokens"]
  valid_BxT = batch["valid"].astype(bool)
  target_mask_BxT = batch["loss_mask"].astype(bool) & valid_BxT
  B, T = tokens_BxT.shape
  positions_BxT = batch.get("positions")
  if positions_BxT is None:
    positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  h_BxTxD, aux = Transformer(cfg).apply({"params": params}, tokens_BxT, positions_BxT,
                                        valid_BxT, return_aux=True, return_hidden=True)
  head = head_lib.head_weights(cfg, params)
  nll_sum, n_tok = head_lib.shifted_nll(h_BxTxD, head, tokens_BxT, target_mask_BxT, 1,
                                        chunk=cfg.logits_chunk)
  lm_loss = nll_sum / jnp.maximum(n_tok, 1.0)
  loss = lm_loss
  metrics = {"lm_loss": lm_loss, "tokens": n_tok}
  if "mtp_hidden" in aux:
    mtp_losses = []
    for k in range(1, cfg.mtp_depth + 1):
      s, n = head_lib.shifted_nll(aux["mtp_hidden"][k - 1], head, tokens_BxT, target_mask_BxT,
                                  k + 1, chunk=cfg.logits_chunk)
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

  With a float32 master (optim.MasterState) the update and the bias rule act on
  the master and the parameters are the master cast to their dtype.

  Returns (params, opt_state, metrics with max_vio, grad_norm, skipped_nonfinite)."""
  # One reduction, not one per leaf: a non-finite gradient makes the norm
  # non-finite (so does one above ~1e19, whose square overflows: refused too).
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optim.apply_updates(params, updates, new_opt_state)
  if "expert_load" in metrics:
    load_LxE = metrics.pop("expert_load")
    master = optim.master_of(new_opt_state)
    if master is None:
      new_params = apply_bias_update(new_params, load_LxE, cfg.bias_update_rate)
    else:  # the rule moves the float32 master, so a small γ is not rounded away
      master = apply_bias_update(master, load_LxE, cfg.bias_update_rate)
      new_opt_state = new_opt_state._replace(master=master)
      new_params = optim.cast_like(master, params)
    metrics["max_vio"] = max_violation(load_LxE)
  # An update that overflows (a huge learning rate) is refused the same way.
  finite = finite & all_finite(new_params)
  # A select, not lax.cond: XLA fuses it into the update, and a device-side branch
  # can cost a host round trip on GPU.
  keep = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(keep, new_params, params)
  opt_state = jax.tree.map(keep, new_opt_state, opt_state)
  metrics["grad_norm"] = grad_norm
  metrics["skipped_nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
  return params, opt_state, metrics


# ----------------------------------------------------------------------------
# Gradient accumulation: M micro-batches, float32 gradients summed by lax.scan,
# one optimizer update. Each micro-batch's loss is re-weighted so the sum is the
# whole batch's loss (token means divide by the whole batch's token count).

def check_micro_batches(batch_size: int, micro_batches: int, n_data_parallel: int) -> None:
  """Errors unless `micro_batches` splits `batch_size` into micro-batches that are
  multiples of the data-parallel devices (config validation and the trainer)."""
  if micro_batches < 1 or batch_size % micro_batches or (
      (batch_size // micro_batches) % n_data_parallel):
    raise ValueError(f"micro_batches={micro_batches} must divide batch_size={batch_size} into "
                     f"micro-batches that are multiples of the {n_data_parallel} "
                     "data-parallel devices")


def split_micro_batches(batch: dict, micro_batches: int, setting: str = "micro_batches") -> dict:
  """Each [B, ...] array as [M, B/M, ...]; micro-batch i holds rows i, i+M, i+2M, ...

  Strided, so under data parallelism every device keeps its own rows in every
  micro-batch (B/M must still be a multiple of the data-parallel devices)."""
  rows = {k: v.shape[0] for k, v in batch.items()}
  B = next(iter(rows.values()))
  if len(set(rows.values())) != 1:
    raise ValueError(f"batch arrays disagree on the number of rows: {rows}")
  if micro_batches < 1 or B % micro_batches:
    raise ValueError(f"{setting}={micro_batches} must divide the batch's {B} rows")
  M = micro_batches

  def split(x):
    x = x.reshape((B // M, M) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return {k: split(v) for k, v in batch.items()}


def accumulate_gradients(objective, params, micro_M: dict, weights_M: dict, rng=None):
  """Σ_i objective(params, micro_i, weights_i[, rng_i]) and its float32 gradient.

  objective returns (weighted loss, metrics); the metrics come back stacked [M, ...].
  """
  M = jax.tree.leaves(micro_M)[0].shape[0]
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

  def body(carry, xs):
    loss_sum, grad_sum = carry
    i, micro, w = xs
    args = () if rng is None else (jax.random.fold_in(rng, i),)
    (loss, metrics), grads = grad_fn(params, micro, w, *args)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    return (loss_sum + loss.astype(jnp.float32), grad_sum), metrics

  init = (jnp.zeros((), jnp.float32), zeros)
  (loss, grads), metrics_M = jax.lax.scan(body, init, (jnp.arange(M), micro_M, weights_M))
  return loss, grads, metrics_M


def combine_metrics(metrics_M: dict, rules: dict) -> dict:
  """Whole-batch metrics from stacked micro-batch ones. A rule is "sum", "min",
  "max", or a weight vector [M] (a weighted sum); other keys are averaged (equal rows)."""
  reduce = {"sum": jnp.sum, "min": jnp.min, "max": jnp.max}
  out = {}
  for k, v in metrics_M.items():
    rule = rules.get(k)
    if isinstance(rule, str):
      out[k] = reduce[rule](v, axis=0)
    elif rule is not None:
      out[k] = jnp.tensordot(rule.astype(jnp.float32), v.astype(jnp.float32), axes=1)
    else:
      out[k] = jnp.mean(v, axis=0)
  return out


def share(count_M: jax.Array) -> jax.Array:
  """Each micro-batch's share of a whole-batch count (all 0 when the count is 0)."""
  count_M = count_M.astype(jnp.float32)
  return count_M / jnp.maximum(jnp.sum(count_M), 1.0)


def _target_counts_M(micro_M: dict, shift: int) -> jax.Array:
  mask_MxbxT = micro_M["loss_mask"].astype(bool) & micro_M["valid"].astype(bool)
  return jnp.sum(mask_MxbxT[..., shift:], axis=(-2, -1)).astype(jnp.float32)


def sft_micro_weights(cfg: ModelConfig, micro_M: dict) -> dict:
  """Each micro-batch's weight for the token-mean terms: its share of the whole
  batch's target tokens (main head; MTP over all depths)."""
  weights = {"lm": share(_target_counts_M(micro_M, 1))}
  if cfg.mtp_depth:
    per_depth_KxM = jnp.stack([_target_counts_M(micro_M, k + 1)
                               for k in range(1, cfg.mtp_depth + 1)])
    weights["mtp_depth"] = jax.vmap(share)(per_depth_KxM).T  # [M, K]
    weights["mtp"] = share(per_depth_KxM.sum(0))
  return weights


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    micro_batches: int = 1):
  """train_step(state, batch) -> (state, metrics); pure, jit it with donated state.

  The step counter advances even when the update is refused (non-finite loss or
  gradient): the batch is consumed, so the step stays the data iterator's position
  and a resume continues on the batch after it.

  micro_batches > 1 splits the batch's rows (`split_micro_batches`) and sums
  float32 gradients over the chunks before one update; the loss is the whole
  batch's: lm_loss is weighted by each chunk's share of the target tokens, the
  MTP loss likewise (exactly per depth when loss_fn reports metrics["mtp_losses"]
  [K], else by the share over all depths: exact for depth 1), row means
  (the balance loss) by 1/M; expert loads are summed for the bias rule."""
  if micro_batches < 1:
    raise ValueError(f"micro_batches={micro_batches} must be at least 1")
  M = micro_batches

  def objective(params, micro: dict, w: dict):
    loss, metrics = loss_fn(params, micro, cfg)
    # Row-mean terms keep the 1/M weight; token means get their token share. The
    # token-mean metrics come back as their weighted shares (summed below).
    lm = w["lm"] * metrics["lm_loss"]
    obj = loss / M + lm - metrics["lm_loss"] / M
    metrics["lm_loss"] = lm
    if "mtp_losses" in metrics:
      mtp = jnp.mean(w["mtp_depth"] * metrics.pop("mtp_losses"))
    elif "mtp_loss" in metrics:
      mtp = w["mtp"] * metrics["mtp_loss"]
    if "mtp_loss" in metrics:
      obj = obj + cfg.mtp_loss_weight * (mtp - metrics["mtp_loss"] / M)
      metrics["mtp_loss"] = mtp
    return obj, metrics

  def train_step(state: TrainState, batch: dict):
    if M == 1:
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, cfg)
    else:
      micro_M = split_micro_batches(batch, M)
      loss, grads, metrics_M = accumulate_gradients(objective, state.params, micro_M,
                                                    sft_micro_weights(cfg, micro_M))
      rules = dict.fromkeys(("lm_loss", "mtp_loss", "tokens", "expert_load"), "sum")
      metrics = combine_metrics(metrics_M, rules)
      metrics["loss"] = loss
    params, opt_state, metrics = apply_gradients(cfg, optimizer, state.params, state.opt_state,
                                                 grads, loss, metrics)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step
