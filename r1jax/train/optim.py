"""The optimizer: AdamW with warmup + cosine decay, clipping, and frozen buffers.

The routers' correction biases live in the parameter tree (so checkpoints and
interop carry them) but are never moved by gradient: the optimizer zeroes their
updates and `r1jax.train.sft.apply_bias_update` moves them by the V3 sign rule.
Norm scales and biases get no weight decay.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


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

  def __post_init__(self):
    if self.learning_rate <= 0 or self.total_steps <= 0:
      raise ValueError(f"learning_rate and total_steps must be positive: {self}")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, total_steps="
                       f"{self.total_steps}]")
    if self.max_nonfinite_steps < 1:
      raise ValueError(f"max_nonfinite_steps={self.max_nonfinite_steps} must be at least 1")


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


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  lr = schedule(cfg)
  adam = lambda wd: optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd)
  labelled = optax.multi_transform(
      {"decay": adam(cfg.weight_decay), "no_decay": adam(0.0), "frozen": optax.set_to_zero()},
      lambda params: jax.tree_util.tree_map_with_path(_label, params))
  chain = [labelled]
  if cfg.grad_clip_norm:
    chain.insert(0, optax.clip_by_global_norm(cfg.grad_clip_norm))
  return optax.chain(*chain)
