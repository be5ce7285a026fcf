"""Typed config helpers shared by experiment files.

Experiment files return an `ml_collections.ConfigDict` built from `base()`: every
key is declared here with its default, so an experiment that sets an unknown
key fails at load time (the dict is locked). Modules never see the ConfigDict:
`model_config`, `optim_config` turn its sections into frozen dataclasses.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from r1jax.model import ModelConfig
from r1jax.train.optim import OptimConfig

MODEL_PRESETS = {
    "tiny": ModelConfig.tiny,
    "deepseek_v3_671b": ModelConfig.deepseek_v3_671b,
}


def _fields(dc) -> dict:
  return {f.name: getattr(dc, f.name) for f in dataclasses.fields(dc)}


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.job = "sft"
  # model: a preset plus field overrides (any ModelConfig field).
  c.model_preset = "tiny"
  c.model = ml_collections.ConfigDict(_fields(ModelConfig.tiny()))
  c.optim = ml_collections.ConfigDict(_fields(OptimConfig()))
  c.mesh = (-1, 1, 1, 1)  # (data, fsdp, expert, tensor); -1 takes the remaining devices
  # data: `task` names an entry of r1jax.data.tasks.TASKS, which reads its own options here
  # (arithmetic: min/max_steps; countdown: min/max_numbers, max_value, max_target,
  # max_misses; both: zh_fraction).
  c.data = ml_collections.ConfigDict(dict(
      task="arithmetic", n_train=4096, n_eval=256, min_steps=1, max_steps=3, zh_fraction=0.25,
      min_numbers=3, max_numbers=4, max_value=50, max_target=100, max_misses=2,
      template="r1_zero", seq_len=160, vocab_size=512, tokenizer_path=""))
  c.train = ml_collections.ConfigDict(dict(
      steps=60, batch_size=32, log_every=10, eval_every=0, checkpoint_every=50))
  return c


def with_model_preset(c: ml_collections.ConfigDict, preset: str, **overrides) -> None:
  """Replaces c.model by a preset's fields (then `overrides`)."""
  if preset not in MODEL_PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}")
  c.model_preset = preset
  fields = _fields(MODEL_PRESETS[preset]())
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
  fields.update(overrides)
  for k, v in fields.items():
    c.model[k] = v


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  return ModelConfig(**c.model.to_dict())


def optim_config(c: ml_collections.ConfigDict) -> OptimConfig:
  return OptimConfig(**c.optim.to_dict())
