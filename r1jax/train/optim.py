"""The optimizer: AdamW with warmup + cosine decay, clipping, and frozen buffers.

The routers' correction biases live in the parameter tree (so checkpoints and
interop carry them) but are never moved by gradient: the optimizer zeroes their
updates and `r1jax.train.sft.apply_bias_update` moves them by the V3 sign rule.
Norm scales and biases get no weight decay.

Mixed precision (`master_dtype`): when the parameters are stored in a lower
precision than float32 (bf16 for the large presets), the optimizer state is a
`MasterState`: a float32 master copy of every parameter plus the AdamW state
built on it (float32 moments). Gradients are cast to float32, the update is
added to the master, and the new parameters are the master cast back to each
parameter's dtype (`apply_updates`), so an update far below the bf16 spacing
accumulates in the master instead of rounding away. Optimizer-state bytes:

  master: 4·N_all + moments: 2·4·(N_all − N_router_bias) + 2 AdamW step counts (2·4)

(N_all: every parameter; router biases have no moments). With float32
parameters there is no master (the state is exactly plain AdamW's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

MASTER_DTYPES = ("auto", "float32", "none")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 3e-4
  warmup_steps: int = 10
  total_steps: int = 1000
  end_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  # Updates with a non-finite loss or gradient are refused; this many in a row stop the run.
  max_nonfinite_steps: int = 5
  # "auto": a float32 master copy (and float32 moments) when any parameter is not
  # float32; "float32": always; "none": AdamW straight on the parameters, in their dtype.
  master_dtype: str = "auto"

  def __post_init__(self):
    if self.learning_rate <= 0 or self.total_steps <= 0:
      raise ValueError(f"learning_rate and total_steps must be positive: {self}")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, total_steps="
                       f"{self.total_steps}]")
    if self.max_nonfinite_steps < 1:
      raise ValueError(f"max_nonfinite_steps={self.max_nonfinite_steps} must be at least 1")
    if self.master_dtype not in MASTER_DTYPES:
      raise ValueError(f"master_dtype={self.master_dtype!r} must be one of {list(MASTER_DTYPES)}")


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def is_router_bias(path) -> bool:
  s = _path_str(path)
  return s.endswith("router/bias")


def _label(path, _) -> str:
  if is_router_bias(path):
    return "frozen"
  if _path_str(path).endswith("/scale"):  # RMSNorm gains
    return "no_decay"
  return "decay"


def schedule(cfg: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=max(cfg.warmup_steps, 1),
      decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.end_lr_fraction)


class MasterState(NamedTuple):
  """The optimizer state with a float32 master copy of the parameters."""
  master: Any
  inner: Any


def _wants_master(cfg: OptimConfig, params) -> bool:
  if cfg.master_dtype == "none":
    return False
  if cfg.master_dtype == "float32":
    return True
  return any(jnp.result_type(x) != jnp.float32 for x in jax.tree.leaves(params))


def _to_f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def with_master(cfg: OptimConfig, inner: optax.GradientTransformation
                ) -> optax.GradientTransformation:
  """`inner` run on a float32 master copy when `cfg.master_dtype` asks for one.

  As a plain optax transformation its updates are (new master cast to the
  parameter dtype) − params, which can round; `apply_updates` instead returns
  the cast master exactly. Without a master it is `inner` unchanged.
  """

  def init(params):
    if not _wants_master(cfg, params):
      return inner.init(params)
    master = _to_f32(params)
    return MasterState(master=master, inner=inner.init(master))

  def update(grads, state, params=None):
    if not isinstance(state, MasterState):
      return inner.update(grads, state, params)
    updates, inner_state = inner.update(_to_f32(grads), state.inner, state.master)
    master = optax.apply_updates(state.master, updates)
    new_state = MasterState(master=master, inner=inner_state)
    if params is None:
      return updates, new_state
    deltas = jax.tree.map(lambda m, p: m.astype(p.dtype) - p, master, params)
    return deltas, new_state

  return optax.GradientTransformation(init, update)


def master_of(opt_state):
  """The float32 master parameters, or None when the state keeps none."""
  return opt_state.master if isinstance(opt_state, MasterState) else None


def cast_like(master, params):
  """The compute parameters: the master cast to each parameter's dtype."""
  return jax.tree.map(lambda m, p: m.astype(p.dtype), master, params)


def apply_updates(params, updates, new_opt_state):
  """The new parameters after `optimizer.update`: the cast master when there is
  one (not params + a rounded update), else params + updates as in optax."""
  master = master_of(new_opt_state)
  if master is None:
    return optax.apply_updates(params, updates)
  return cast_like(master, params)


def state_bytes(opt_state) -> int:
  """Bytes held by an optimizer state (arrays or ShapeDtypeStructs)."""
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(opt_state))


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  lr = schedule(cfg)
  adam = lambda wd: optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd)
  labelled = optax.multi_transform(
      {"decay": adam(cfg.weight_decay), "no_decay": adam(0.0), "frozen": optax.set_to_zero()},
      lambda params: jax.tree_util.tree_map_with_path(_label, params))
  chain = [labelled]
  if cfg.grad_clip_norm:
    chain.insert(0, optax.clip_by_global_norm(cfg.grad_clip_norm))
  return with_master(cfg, optax.chain(*chain))
