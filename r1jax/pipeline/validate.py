"""Checks an experiment config before anything compiles; each error is one line naming a key."""

from __future__ import annotations

from typing import Sequence

import ml_collections

STAGE_KINDS = ("pretrain", "sft", "grpo", "rejection_sample", "distill", "eval")
# Fields through which a stage names earlier stages.
REF_FIELDS = ("init", "teacher", "data")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def _field_refs(sc: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(field, stage name) for each of init / teacher / data that reads "stage:<name>"."""
  return [(f, sc[f][len("stage:"):]) for f in REF_FIELDS
          if f in sc and isinstance(sc[f], str) and sc[f].startswith("stage:")]


def stage_refs(sc: ml_collections.ConfigDict) -> list[str]:
  """Names of earlier stages this stage reads."""
  return [ref for _, ref in _field_refs(sc)]


def _check_mesh(c: ml_collections.ConfigDict, n_devices: int | None) -> None:
  import jax  # noqa: PLC0415 - only the device and process counts are needed

  from r1jax.parallel import mesh as mesh_lib
  n = n_devices or jax.device_count()
  try:
    mesh_lib.mesh_shape(tuple(c.mesh), n)
  except ValueError as e:
    where = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    raise ConfigError(f"mesh: {e.args[0].rstrip('.')}{where}") from None


def _missing(path: str) -> bool:
  """A local path that does not exist (remote ones are checked when read)."""
  from r1jax import storage  # noqa: PLC0415
  return not storage.is_remote(path) and not storage.exists(path)


def _check_tokenizer(c: ml_collections.ConfigDict) -> None:
  """A pretrained checkpoint needs its own tokenizer: a toy one trained here would
  give its ids other meanings. A named tokenizer or chat file must exist."""
  from r1jax import configs  # noqa: PLC0415
  for name in c.pipeline:
    sc = c.stages[name]
    for field in ("init", "teacher"):
      v = sc.get(field)
      if not (isinstance(v, str) and v.startswith("hf:")):
        continue
      own = "" if field == "teacher" else f" (nor stages.{name}.tokenizer_path)"
      path = (configs.teacher_tokenizer if field == "teacher" else configs.stage_tokenizer)(c, name)
      if not path:
        raise ConfigError(f"data.tokenizer_path: unset{own}, but stages.{name}.{field}={v!r} is "
                          "a pretrained checkpoint; set it to that model's tokenizer directory "
                          "(tokenizer.json) or .model file")
    data = sc.get("data")
    if isinstance(data, str) and data.startswith("chat:") and _missing(data[len("chat:"):]):
      raise ConfigError(f"stages.{name}.data: no chat file {data[len('chat:'):]!r}")
    if sc.get("tokenizer_path") and _missing(sc.tokenizer_path):
      raise ConfigError(f"stages.{name}.tokenizer_path: {sc.tokenizer_path!r} does not exist")
  path = c.data.tokenizer_path
  if path and _missing(path):
    raise ConfigError(f"data.tokenizer_path: {path!r} does not exist; name a sentencepiece "
                      ".model file or a Hugging Face tokenizer directory (tokenizer.json), or "
                      "leave it '' to train the toy tokenizer")


def validate(c: ml_collections.ConfigDict, only: Sequence[str] | None = None,
             n_devices: int | None = None) -> None:
  """Raises ConfigError; `n_devices` (default: the devices present) sizes the mesh."""
  from r1jax import configs  # the model and optimizer dataclasses validate themselves
  from r1jax.rewards.sandbox import SandboxUnavailable

  if not c.pipeline:
    raise ConfigError("pipeline: empty; list the stages to run, e.g. ('pretrain', 'grpo')")
  _check_mesh(c, n_devices)
  try:  # first: the stages' own models are built over it
    configs.model_config(c)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"model: {e}") from None
  seen: list[str] = []
  for name in c.pipeline:
    if name not in c.stages:
      raise ConfigError(f"pipeline: stage {name!r} has no entry in stages "
                        f"(defined: {sorted(c.stages.keys())})")
    if name in seen:
      raise ConfigError(f"pipeline: stage {name!r} is listed twice")
    sc = c.stages[name]
    if sc.kind not in STAGE_KINDS:
      raise ConfigError(f"stages.{name}.kind: {sc.kind!r} is not one of {list(STAGE_KINDS)}")
    for field, ref in _field_refs(sc):
      if ref not in seen:
        raise ConfigError(f"stages.{name}.{field}: {ref!r} is not an earlier stage "
                          f"(earlier: {seen})")
    try:
      configs.check_stage(c, name, n_devices)
    except (ValueError, TypeError, SandboxUnavailable) as e:
      raise ConfigError(f"stages.{name}: {e}") from None
    seen.append(name)
  if only:
    unknown = [s for s in only if s not in c.pipeline]
    if unknown:
      raise ConfigError(f"--stages: {unknown} not in pipeline {list(c.pipeline)}")
  _check_tokenizer(c)
