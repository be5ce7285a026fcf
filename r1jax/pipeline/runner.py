"""Runs an experiment's stages in order; finished stages are skipped, interrupted ones resume.

Each stage writes `workdir/<stage>/`; its last act is writing `outputs.json`
(atomically), so a stage is finished iff that file exists. A stage receives the
outputs of the stages it names (`init`, `teacher`, `data`), never reaches into
another stage's directory by itself.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import ml_collections

from r1jax import configs, storage
from r1jax.parallel import multihost
from r1jax.pipeline import validate as validate_lib

StageFn = Callable[..., dict]


def _registry() -> dict[str, StageFn]:
  from r1jax.eval.stage import eval_stage  # imported late: stages pull in JAX and the model
  from r1jax.pipeline import stages
  return {
      "pretrain": stages.pretrain,
      "sft": stages.sft,
      "grpo": stages.grpo,
      "rejection_sample": stages.rejection_sample,
      "distill": stages.distill,
      "eval": eval_stage,
  }


def _write_json(path: str, obj) -> None:
  storage.write_json(path, obj, indent=1, sort_keys=True)


def stage_outputs(workdir: str, name: str) -> dict | None:
  path = storage.join(workdir, name, "outputs.json")
  return storage.read_json(path) if storage.exists(path) else None


def check_vocab(name: str, cfg, tok) -> None:
  """A stage's model must have an embedding row for every piece of its tokenizer."""
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"stages.{name}: the model's vocab_size={cfg.vocab_size} is smaller than "
                     f"its tokenizer's {tok.vocab_size} pieces")


def run(c: ml_collections.ConfigDict, workdir: str, only: Sequence[str] | None = None) -> dict:
  """Runs `c.pipeline` (or the subset `only`, whose inputs must already be finished)."""
  validate_lib.validate(c, only=only)
  from r1jax.pipeline import context as context_lib
  from r1jax.pipeline import report
  workdir = str(storage.path(workdir))
  if jax.process_index() == 0:
    storage.makedirs(workdir)
  # What the stages share, prepared in plain sight: the data, then the tokenizer
  # (loaded from data.tokenizer_path, or the toy one trained once per workdir).
  train, held_out = context_lib.load_splits(c)
  tok = context_lib.prepare_tokenizer(c, workdir, train)
  ctx = context_lib.Context.create(c, workdir, tok, train, held_out)
  if ctx.is_main_process:  # what produced this workdir (the sweep's reuse reads it too)
    storage.write_text(storage.join(workdir, "config.json"),
                       c.to_json_best_effort(indent=1, sort_keys=True))
  registry = _registry()
  results: dict[str, dict] = {}
  for name in c.pipeline:
    done = stage_outputs(workdir, name)
    if done is not None:
      ctx.log(f"[{name}] finished earlier; skipping (delete {workdir}/{name} to redo it)")
      results[name] = done
      continue
    if only and name not in only:
      continue
    sc = c.stages[name]
    inputs = {}
    for ref in validate_lib.stage_refs(sc):
      if ref not in results:
        raise RuntimeError(f"stage {name!r} needs stage {ref!r}, which has not finished; run it "
                           f"first (--stages={ref},{name})")
      inputs[ref] = results[ref]
    stage_dir = storage.join(workdir, name)
    storage.makedirs(stage_dir)
    ctx.log(f"[{name}] {sc.kind} starts")
    t0 = time.time()
    # The ambient mesh is what turns on expert parallelism inside the model.
    # The tokenizer of the model the stage trains (a distill stage: its student's).
    stage_ctx = ctx.with_tokenizer(configs.stage_tokenizer(c, name))
    check_vocab(name, configs.stage_model(c, name), stage_ctx.tok)
    with jax.set_mesh(ctx.mesh):
      out = registry[sc.kind](stage_ctx, name, sc, inputs, stage_dir)
    out["wall_s"] = round(time.time() - t0, 2)
    out["kind"] = sc.kind
    if ctx.is_main_process:
      _write_json(storage.join(stage_dir, "outputs.json"), out)
    multihost.barrier(f"stage {name} done")  # no process runs ahead of the stage's files
    results[name] = out
  summary = {name: {k: v for k, v in out.items() if k not in ("checkpoint", "dataset")}
             for name, out in results.items()}
  if ctx.is_main_process:
    _write_json(storage.join(workdir, "summary.json"), summary)
    report.write(workdir, c, results, log=ctx.log)
  return results
