"""Runs an experiment's stages in order; finished stages are skipped, interrupted ones resume.

Each stage writes `workdir/<stage>/`; its last act is writing `outputs.json`
(atomically), so a stage is finished iff that file exists. A stage receives the
outputs of the stages it names (`init`, `teacher`, `data`), never reaches into
another stage's directory by itself.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Sequence

import jax
import ml_collections

from r1jax.pipeline import validate as validate_lib

StageFn = Callable[..., dict]


def _registry() -> dict[str, StageFn]:
  from r1jax.pipeline import stages  # imported late: stages pull in JAX and the model
  return {
      "pretrain": stages.pretrain,
      "sft": stages.sft,
      "grpo": stages.grpo,
      "rejection_sample": stages.rejection_sample,
      "distill": stages.distill,
  }


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def stage_outputs(workdir: str, name: str) -> dict | None:
  path = os.path.join(workdir, name, "outputs.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run(c: ml_collections.ConfigDict, workdir: str, only: Sequence[str] | None = None) -> dict:
  """Runs `c.pipeline` (or the subset `only`, whose inputs must already be finished)."""
  validate_lib.validate(c, only=only)
  from r1jax.pipeline import context as context_lib
  from r1jax.pipeline import report
  os.makedirs(workdir, exist_ok=True)
  ctx = context_lib.Context.create(c, workdir)
  if ctx.is_main_process:  # what produced this workdir (the sweep's reuse reads it too)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=1, sort_keys=True))
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
    stage_dir = os.path.join(workdir, name)
    os.makedirs(stage_dir, exist_ok=True)
    ctx.log(f"[{name}] {sc.kind} starts")
    t0 = time.time()
    # The ambient mesh is what turns on expert parallelism inside the model.
    with jax.set_mesh(ctx.mesh):
      out = registry[sc.kind](ctx, name, sc, inputs, stage_dir)
    out["wall_s"] = round(time.time() - t0, 2)
    out["kind"] = sc.kind
    if ctx.is_main_process:
      _write_json(os.path.join(stage_dir, "outputs.json"), out)
    results[name] = out
  summary = {name: {k: v for k, v in out.items() if k not in ("checkpoint", "dataset")}
             for name, out in results.items()}
  if ctx.is_main_process:
    _write_json(os.path.join(workdir, "summary.json"), summary)
    report.write(workdir, c, results, log=ctx.log)
  return results
