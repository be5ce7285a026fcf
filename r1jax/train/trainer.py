"""The supervised loop shared by the pretrain, sft and distill stages.

Reads top to bottom: programs (cached per model/optimizer/mesh), state (fresh
or from given params, created sharded), checkpoint resume, loop, eval.
Resumable: rerunning into the same directory continues from the last
checkpoint on the exact next batch, and metrics.jsonl is cut back to it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from r1jax import storage
from r1jax.data import pipelines
from r1jax.model import ModelConfig, init_params, logical_axes
from r1jax.parallel import mesh as mesh_lib
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import optim, sft


class NonFiniteGuard:
  """Counts consecutive refused steps (metrics["skipped_nonfinite"] > 0); raises
  checkpoint.NonFiniteError, naming the stage and step, when `limit` are refused in a row."""

  def __init__(self, stage: str, limit: int):
    self.stage, self.limit, self.run = stage, limit, 0

  def __call__(self, step: int, skipped: float) -> None:
    self.run = self.run + 1 if skipped > 0 else 0
    if self.run >= self.limit:
      raise ckpt_lib.NonFiniteError(
          f"stage {self.stage}: stopped at step {step}: {self.run} step(s) in a row with a "
          "non-finite loss, gradient or update (refused; optim.max_nonfinite_steps="
          f"{self.limit}); lower the learning rate or check the data")


@functools.lru_cache(maxsize=8)
def _programs(cfg: ModelConfig, ocfg: optim.OptimConfig, mesh: Mesh):
  """Jitted pieces for one (model, optimizer, mesh); reused across stages and runs in
  one process (tests, notebooks, resumed stages) so each compiles once."""
  param_sharding = mesh_lib.logical_sharding(mesh, logical_axes(cfg))
  optimizer = optim.make_optimizer(ocfg)
  init = jax.jit(init_params, static_argnums=0, out_shardings=param_sharding)
  eval_loss = jax.jit(lambda p, b: sft.loss_fn(p, b, cfg)[1]["lm_loss"])
  return param_sharding, optimizer, init, eval_loss


@functools.lru_cache(maxsize=8)
def _step(cfg: ModelConfig, ocfg: optim.OptimConfig, treedef, shardings: tuple,
          micro_batches: int = 1):
  """The train step with its output state pinned to the input state's placement
  (left free, XLA may return the parameters replicated)."""
  state_sharding = jax.tree.unflatten(treedef, shardings)
  step = sft.make_train_step(cfg, optim.make_optimizer(ocfg), micro_batches)
  return jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, None))


def _new_state(params, optimizer, mesh: Mesh) -> sft.TrainState:
  # Eager optax init: zeros_like keeps every parameter's sharding for its moments,
  # so the optimizer state is sharded exactly like the parameters.
  step = jax.device_put(jnp.zeros((), jnp.int32), mesh_lib.replicated(mesh))
  return sft.TrainState(step=step, params=params, opt_state=optimizer.init(params))


def _pad_rows(arrays: dict, multiple: int) -> dict:
  """Appends all-padding rows (valid = loss_mask = 0) up to a multiple of `multiple`."""
  n = len(arrays["tokens"])
  extra = -n % multiple
  return {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)]) for k, v in
          arrays.items()}


def train_supervised(ctx, stage_dir: str, *, cfg: ModelConfig, params, rows: dict,
                     eval_rows: dict, ocfg: optim.OptimConfig, steps: int, batch_size: int,
                     seed: int, log_every: int, checkpoint_every: int, micro_batches: int = 1):
  """Trains on `rows` (tokens / loss_mask / valid, [N, T]); `params=None` starts fresh.

  Each step's batch runs as `micro_batches` chunks (gradients accumulated, one
  update). The host keeps the step counter and reads metrics back only at log
  steps, checkpoints and the end: a refused (non-finite) step is still logged and
  the stop rule still names the step where the limit was reached, but it is
  seen at the next of those points (at most log_every − 1 steps later).

  Returns (final params, summary dict with the held-out loss before and after).
  """
  if batch_size % ctx.n_data_parallel:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the "
                     f"{ctx.n_data_parallel} data-parallel devices of mesh {dict(ctx.mesh.shape)}")
  sft.check_micro_batches(batch_size, micro_batches, ctx.n_data_parallel)
  param_sharding, optimizer, init, eval_loss = _programs(cfg, ocfg, ctx.mesh)
  if params is None:
    params = init(cfg, jax.random.key(seed))
  else:
    params = jax.device_put(params, param_sharding)
  state = _new_state(params, optimizer, ctx.mesh)
  leaves, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, state))
  train_step = _step(cfg, ocfg, treedef, tuple(leaves), micro_batches)
  batches = pipelines.sft_batches(rows, batch_size, seed)
  eval_batch = ctx.put_batch(_pad_rows(eval_rows, ctx.n_data_parallel))
  initial_eval = float(eval_loss(state.params, eval_batch))
  ckpt = ckpt_lib.Checkpointer(storage.join(stage_dir, "checkpoints"), every=checkpoint_every)
  if ckpt.latest_step is not None:
    state, data_state = ckpt.restore(ckpt_lib.abstract_like(state))
    batches.restore(data_state)
    ctx.log(f"  resuming from step {int(state.step)}")
  step = int(state.step)  # the host counts from here: no device read per step
  writer = metrics_lib.MetricWriter(stage_dir, total_steps=steps, start_step=step,
                                    show=("loss", "lm_loss"))
  guard = NonFiniteGuard(storage.path(stage_dir).name, ocfg.max_nonfinite_steps)
  last = {}
  pending = []  # (step, metrics still on device), oldest first

  def read_pending():
    """One device read for the steps since the last one: logs the log steps and every
    refused step, and runs the stop rule over them in order."""
    nonlocal last
    flags = jax.device_get([m["skipped_nonfinite"] for _, m in pending])
    todo = list(zip(pending, flags))
    pending.clear()
    for (s, m), skipped in todo:
      # A refused step is always logged, whatever the cadence.
      if s % log_every == 0 or s == steps or skipped:
        last = writer.write(s, jax.device_get(m))
      guard(s, float(skipped))

  try:
    while step < steps:
      state, m = train_step(state, ctx.put_batch(next(batches)))
      step += 1
      pending.append((step, m))
      # Read before a checkpoint too: a run the stop rule ends writes none past it.
      if step % log_every == 0 or step == steps or ckpt.due(step):
        read_pending()
      if ckpt.save(step, state, batches.state(), force=step == steps):
        writer.flush()
  finally:  # a stopped run still leaves its metrics and finished checkpoints behind
    writer.close()
    ckpt.close()
  final_eval = float(eval_loss(state.params, eval_batch))
  summary = {"steps": step, "eval_loss_before": initial_eval,
             "eval_loss_after": final_eval, "final_loss": last.get("loss", float("nan")),
             "train_rows": int(len(rows["tokens"]))}
  # The router's balance at the end (V3's MaxVio_batch of the last logged step).
  summary.update({f"final_{k}": float(last[k]) for k in ("max_vio", "balance_loss")
                  if k in last})
  return state.params, summary
