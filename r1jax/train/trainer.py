"""The SFT job: data → tokenizer → sharded state → jitted steps → checkpoints.

Reads top to bottom: mesh, input, model, shard, update, checkpoint, loop, eval.
Resumable: rerunning with the same workdir continues from the last checkpoint
on the exact next batch, and `metrics.jsonl` is cut back to that step.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax import configs
from r1jax.data import pipelines, tasks
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import init_params, logical_axes
from r1jax.parallel import mesh as mesh_lib
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import optim, sft


def _examples(c: ml_collections.ConfigDict) -> tuple[list[dict], list[dict]]:
  """(train, held-out) examples of the configured task; its options are `c.data` keys."""
  task = tasks.get(c.data.task)
  options = {k: c.data[k] for k in task.options}
  return tasks.make_splits(c.data.task, n_train=c.data.n_train, n_eval=c.data.n_eval,
                           seed=c.seed, **options)


def _trim_metrics(path: str, last_step: int) -> None:
  """Drops logged lines past the checkpoint we resume from (they will be redone)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(keep)


def _pad_rows(arrays: dict, multiple: int) -> dict:
  """Appends all-padding rows (valid = loss_mask = 0) up to a multiple of `multiple`."""
  n = len(arrays["tokens"])
  extra = -n % multiple
  return {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)]) for k, v in
          arrays.items()}


@functools.lru_cache(maxsize=8)
def _programs(cfg, ocfg: optim.OptimConfig, mesh):
  """Jitted init / step / eval for one (model, optimizer, mesh); reused across runs in
  one process (tests, notebooks, resumed stages) so each compiles once."""
  param_sharding = mesh_lib.logical_sharding(mesh, logical_axes(cfg))
  optimizer = optim.make_optimizer(ocfg)
  init = jax.jit(lambda rng: sft.init_state(init_params(cfg, rng), optimizer),
                 out_shardings=sft.TrainState(step=mesh_lib.replicated(mesh),
                                              params=param_sharding,
                                              opt_state=None))
  step = jax.jit(sft.make_train_step(cfg, optimizer), donate_argnums=0)
  eval_loss = jax.jit(lambda p, b: sft.loss_fn(p, b, cfg)[1]["lm_loss"])
  return init, step, eval_loss


def train_sft(c: ml_collections.ConfigDict, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  # Mesh.
  mesh = mesh_lib.make_mesh(tuple(c.mesh))
  # Input.
  train_ex, eval_ex = _examples(c)
  train_pairs = pipelines.sft_pairs(train_ex, c.data.template)
  tok_path = c.data.tokenizer_path or os.path.join(workdir, "tokenizer.model")
  tok = tokenizer_lib.train_or_load(tok_path, [p + r for p, r in train_pairs], c.data.vocab_size)
  train_rows, dropped = pipelines.encode_rows(tok, train_pairs, c.data.seq_len)
  eval_rows, _ = pipelines.encode_rows(tok, pipelines.sft_pairs(eval_ex, c.data.template),
                                       c.data.seq_len)
  if dropped:
    print(f"[data] dropped {dropped} training rows longer than seq_len={c.data.seq_len}")
  batches = pipelines.sft_batches(train_rows, c.train.batch_size, c.seed)
  # Model.
  cfg = configs.model_config(c)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size="
                     f"{cfg.vocab_size}; raise model.vocab_size")
  # Shard: the state is created already sharded, never whole on one device.
  init, train_step, eval_loss = _programs(cfg, configs.optim_config(c), mesh)
  state = init(jax.random.key(c.seed))
  data_sharding = mesh_lib.batch_sharding(mesh)
  n_data = int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH]))
  if c.train.batch_size % n_data:
    raise ValueError(f"train.batch_size={c.train.batch_size} must be a multiple of the "
                     f"{n_data} data-parallel devices of mesh {dict(mesh.shape)}")
  put = lambda b: jax.device_put({k: jnp.asarray(v) for k, v in b.items()}, data_sharding)
  eval_batch = put(_pad_rows(eval_rows, n_data))
  # Checkpoint.
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               every=c.train.checkpoint_every)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if ckpt.latest_step is not None:
    state, data_state = ckpt.restore(ckpt_lib.abstract_like(state))
    batches.restore(data_state)
    _trim_metrics(metrics_path, int(state.step))
    print(f"[resume] from step {int(state.step)}")
  initial_eval = float(eval_loss(state.params, eval_batch))
  # Loop.
  history = []
  t0 = time.time()
  with open(metrics_path, "a") as log:
    while int(state.step) < c.train.steps:
      state, m = train_step(state, put(next(batches)))
      step = int(state.step)
      if step % c.train.log_every == 0 or step == c.train.steps:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        m.update(step=step, seconds=round(time.time() - t0, 2))
        history.append(m)
        log.write(json.dumps(m) + "\n")
        log.flush()
        print(f"step {step:5d}  loss {m['loss']:.4f}  lm {m['lm_loss']:.4f}"
              + (f"  mtp {m['mtp_loss']:.4f}" if "mtp_loss" in m else "")
              + (f"  maxvio {m['max_vio']:.3f}" if "max_vio" in m else ""), flush=True)
      ckpt.save(step, state, batches.state(), force=step == c.train.steps)
  ckpt.close()
  # Eval.
  final_eval = float(eval_loss(state.params, eval_batch))
  summary = {"eval_lm_loss_start": initial_eval, "eval_lm_loss_end": final_eval,
             "steps": int(state.step), "train_rows": int(len(train_rows["tokens"])),
             "tokenizer_vocab": tok.vocab_size, "devices": int(np.prod(mesh.devices.shape))}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"held-out response loss: {initial_eval:.4f} -> {final_eval:.4f}")
  return summary
