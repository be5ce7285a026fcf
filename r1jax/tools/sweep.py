"""Runs every arm of an ablation file, one after another, or submits them to a pod.

  python -m r1jax.tools.sweep --ablation=experiments/ablations/group_size.py \
      --workdir=/tmp/abl [--variants=G4,G16] [--smoke]
  python -m r1jax.tools.sweep --ablation=experiments/ablations/kl_beta.py \
      --workdir=gs://bucket/abl --submit=tpu_pod [--dry_run] -- --tpu=... --zone=...

An ablation file holds `VARIANTS` (arm names, the reference arm first) and a
`get_config("<arm>[,smoke]")`, and may name extra numbers to compare in
`METRICS` (e.g. "held_out/mixed/zh" of its eval stages). Arm `a` runs in `<workdir>/<ablation>/<a>`.
Locally, a stage whose settings (and everything upstream of it: seed, data,
model, mesh) equal those of an arm that already finished it is copied from that
arm instead of being trained again, so the GRPO ablations pretrain their base
model once. At the end `<workdir>/<ablation>/sweep.json` holds each arm's
summary and a table of the headline numbers is printed; `--reuse_from` offers
the finished stages of other runs (read from their `config.json`) the same way.
`notebooks/results.ipynb` plots the arms against each other. With `--submit`,
each arm becomes one `launch/<launcher>.py --config=<file>:<arm> --workdir=…`
command (arguments after `--` go to the launcher), run in turn or, with
--dry_run, printed.

`--seeds=N` runs every arm with N run seeds (the experiment's seed and the next
N−1; a seed moves the task's split, the initialisation and every sample) in
`<workdir>/<ablation>/<arm>/seed<k>`. Stages shared by arms are shared per seed.
sweep.json then holds each number's mean, std and count per arm, every seed's
numbers, and each arm's difference from the reference arm with its standard
error; the table prints mean ± std and marks differences beyond 2 standard
errors with †.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

_ABLATION = flags.DEFINE_string("ablation", None, "An ablation file (experiments/ablations/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory; each arm gets a subfolder.")
_VARIANTS = flags.DEFINE_list("variants", None, "Arms to run (default: all, in file order).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Shrink every arm to a couple of steps.")
_SUBMIT = flags.DEFINE_enum("submit", None, ["local", "tpu_pod", "slurm"],
                            "Run each arm through launch/<launcher>.py instead of in-process.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Run every arm with this many run seeds (the "
                              "experiment's seed and the next ones); sweep.json and the table "
                              "then give mean ± std per number.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "With --submit: print the commands only.")
_REUSE_FROM = flags.DEFINE_list("reuse_from", [], "Earlier workdirs whose finished stages the "
                                "arms may copy where the settings are equal (e.g. the main "
                                "job's, for its pretrained base).")
flags.mark_flags_as_required(["ablation", "workdir"])

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The headline numbers of the printed table, where a stage reports them.
COLUMNS = ("accuracy_before", "accuracy_after", "format_after", "language_after",
           "response_len_after", "held_out/pass@1", "held_out/cons@8", "final_max_vio",
           "final_loss", "wall_s")


def arm_arg(variant: str, smoke: bool) -> str:
  return f"{variant},smoke" if smoke else variant


def _plain(v):
  """A config value as JSON would hold it (tuples become lists), for comparing."""
  return json.loads(v.to_json_best_effort() if hasattr(v, "to_json_best_effort")
                    else json.dumps(v))


def _same_globals(a, b) -> bool:
  keys = set(a.keys()) | set(b.keys())
  return all(k in a and k in b and _plain(a[k]) == _plain(b[k])
             for k in keys if k not in ("pipeline", "stages"))


def reusable(c, name: str, other, finished: set[str]) -> bool:
  """Whether stage `name` of config `c` would compute exactly what `other` computed."""
  from r1jax.pipeline import validate
  if name not in other.stages or name not in finished or not _same_globals(c, other):
    return False
  if _plain(c.stages[name]) != _plain(other.stages[name]):
    return False
  return all(reusable(c, ref, other, finished) for ref in validate.stage_refs(c.stages[name]))


def copy_stage(src_workdir: str, dst_workdir: str, name: str) -> None:
  """Copies a finished stage, pointing the paths in its outputs at the copy
  (either workdir may be a bucket URL)."""
  from r1jax import storage
  src, dst = storage.join(src_workdir, name), storage.join(dst_workdir, name)
  storage.copy_tree(src, dst)
  for extra in ("tokenizer.model",):
    there, here = storage.join(src_workdir, extra), storage.join(dst_workdir, extra)
    if storage.exists(there) and not storage.exists(here):
      storage.write_bytes(here, storage.read_bytes(there))
  path = storage.join(dst, "outputs.json")
  outputs = storage.read_json(path)
  for k, v in outputs.items():
    if isinstance(v, str) and v.startswith(src + "/"):
      outputs[k] = dst + v[len(src):]
  outputs["reused_from"] = src
  storage.write_text(path, json.dumps(outputs, indent=1, sort_keys=True))


def _fill(old: dict, defaults: dict) -> dict:
  for k, v in defaults.items():
    if k not in old:
      old[k] = v
    elif isinstance(v, dict) and isinstance(old[k], dict):
      _fill(old[k], v)
  return old


def with_defaults(old: dict) -> dict:
  """An earlier run's config.json with each key it predates set to today's default
  (configs.base() for globals, the stage kind's template for stages). New keys
  default to the old behaviour, so a run made before a key existed stays reusable."""
  from r1jax import configs
  _fill(old, {k: v for k, v in _plain(configs.base()).items() if k != "stages"})
  for sc in old.get("stages", {}).values():
    template = getattr(configs, f"{sc.get('kind')}_stage", None)
    if template is not None:
      _fill(sc, _plain(template()))
  return old


def earlier_run(workdir: str):
  """(config, workdir, finished stages) of a finished or partial run, from its config.json."""
  import ml_collections
  from r1jax.pipeline import runner
  from r1jax import storage
  saved = storage.read_json(storage.join(workdir, "config.json"))
  c = ml_collections.ConfigDict(with_defaults(saved))
  c.pipeline = tuple(c.pipeline)
  return c, workdir, {s for s in c.pipeline if runner.stage_outputs(workdir, s) is not None}


def reuse_finished(c, workdir: str, done: list, log: str = "", stages=None) -> None:
  """Copies into `workdir` each stage of `c` (or of `stages`) that an earlier run in
  `done` ((config, workdir, finished stages) triples) computed with the same settings."""
  from r1jax.pipeline import runner
  for name in c.pipeline:
    if (stages is not None and name not in stages
        or runner.stage_outputs(workdir, name) is not None):
      continue
    for other, other_wd, finished in done:
      if reusable(c, name, other, finished):
        print(f"[sweep] {log}stage {name} reused from {other_wd}", flush=True)
        copy_stage(other_wd, workdir, name)
        break


def seed_list(c, n: int) -> list[int]:
  """The run seeds of `n` repeats: the experiment's seed, then the next n−1."""
  return [int(c.seed) + i for i in range(n)]


def arm_dir(root: str, variant: str, seed: int, n_seeds: int) -> str:
  """`<root>/<arm>`, or `<root>/<arm>/seed<k>` when every arm runs several seeds."""
  wd = os.path.join(root, variant)
  return os.path.join(wd, f"seed{seed}") if n_seeds > 1 else wd


def _numbers(results: dict) -> dict:
  return {name: {k: val for k, val in out.items() if k not in ("checkpoint", "dataset",
                                                                 "model", "student")}
          for name, out in results.items()}


def run_local(module, path: str, variants: list[str], root: str, smoke: bool,
              reuse_from: tuple[str, ...] = (), n_seeds: int = 1) -> dict:
  """Runs every arm (× `n_seeds` run seeds) in this process; returns
  {arm: {seed: {stage: numbers}}}. Seeds go round the arms, so a stage that two
  arms share (the pretraining of one seed) is computed once and copied."""
  from r1jax.pipeline import runner
  # (config, workdir, finished stages) of the runs an arm may copy from.
  done: list[tuple[object, str, set[str]]] = [earlier_run(w) for w in reuse_from]
  runs: dict = {v: {} for v in variants}
  for seed in seed_list(module.get_config(arm_arg(variants[0], smoke)), n_seeds):
    for v in variants:
      arg = arm_arg(v, smoke)
      c = module.get_config(arg)
      with c.unlocked():
        c.seed = seed
      c.lock()
      wd = arm_dir(root, v, seed, n_seeds)
      reuse_finished(c, wd, done, log=f"{v} seed {seed}: ")
      print(f"[sweep] {v} seed {seed}: {path}:{arg} -> {wd}", flush=True)
      results = runner.run(c, wd)
      done.append((c, wd, set(results)))
      runs[v][seed] = _numbers(results)
  return runs


def statistics(runs: dict) -> dict:
  """{arm: {stage: {metric: {"mean", "std", "n"}}}} over each arm's seeds: every
  number logged in all of them (std with n−1; 0 for one seed)."""
  out = {}
  for arm, by_seed in runs.items():
    seeds = list(by_seed.values())
    out[arm] = {}
    for stage in seeds[0]:
      metrics = {}
      for k, v in seeds[0][stage].items():
        vals = [s.get(stage, {}).get(k) for s in seeds]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
          a = np.asarray(vals, np.float64)
          metrics[k] = {"mean": float(a.mean()), "n": len(a),
                        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}
      out[arm][stage] = metrics
  return out


def differences(stats: dict, reference: str, columns=None) -> list[dict]:
  """Each arm's headline numbers against the reference arm's, stage by stage:
  the difference of means, its standard error (Welch: √(s_a²/n_a + s_r²/n_r)),
  and whether it exceeds 2 standard errors (only with ≥ 2 seeds on both sides)."""
  rows = []
  for arm, stages in stats.items():
    if arm == reference:
      continue
    for stage, metrics in stages.items():
      for k in columns or COLUMNS:
        a, r = metrics.get(k), stats[reference].get(stage, {}).get(k)
        if a is None or r is None or k == "wall_s":
          continue
        se = float(np.sqrt(a["std"] ** 2 / a["n"] + r["std"] ** 2 / r["n"]))
        diff = a["mean"] - r["mean"]
        rows.append({"arm": arm, "stage": stage, "metric": k, "diff": diff, "se": se,
                     "exceeds_2se": bool(min(a["n"], r["n"]) > 1 and abs(diff) > 2 * se)})
  return rows


def summary(path: str, runs: dict, metrics: tuple[str, ...] = ()) -> dict:
  """What sweep.json holds: per arm the mean of each number (the arm's own numbers
  with one seed), their std and count, every seed's numbers and workdir, and the
  differences from the reference arm (the first) in the headline numbers and the
  ablation's own `metrics` (its METRICS, e.g. "held_out/mixed/zh"), which are also
  the printed table's columns."""
  stats = statistics(runs)
  arms = list(runs)
  columns = COLUMNS[:-1] + tuple(m for m in metrics if m not in COLUMNS) + COLUMNS[-1:]
  return {"ablation": path, "seeds": sorted({s for r in runs.values() for s in r}),
          "columns": list(columns),
          "arms": {a: {st: {k: m["mean"] for k, m in ms.items()} for st, ms in stats[a].items()}
                   for a in arms},
          "std": {a: {st: {k: m["std"] for k, m in ms.items()} for st, ms in stats[a].items()}
                  for a in arms},
          "n": {a: len(runs[a]) for a in arms},
          "runs": {a: {str(s): r for s, r in runs[a].items()} for a in arms},
          # each run's workdir, relative to the sweep root (arm_dir's layout)
          "dirs": {a: {str(s): os.path.relpath(arm_dir("", a, s, len(runs[a])))
                       for s in runs[a]} for a in arms},
          "differences": differences(stats, arms[0], columns)}


def table(sweep_json: dict) -> str:
  """One row per (arm, stage), the headline numbers as columns (markdown): the
  value with one seed, mean ± std with several; † marks a difference from the
  reference arm beyond 2 standard errors."""
  marked = {(d["arm"], d["stage"], d["metric"]) for d in sweep_json["differences"]
            if d["exceeds_2se"]}
  columns = sweep_json.get("columns", COLUMNS)
  lines = ["| arm | stage | " + " | ".join(columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for arm, stages in sweep_json["arms"].items():
    several = sweep_json["n"][arm] > 1
    for name, out in stages.items():
      cells = []
      for k in columns:
        if not isinstance(out.get(k), (int, float)):
          cells.append("")
          continue
        cell = f"{out[k]:.3f}"
        if several:
          cell += f" ± {sweep_json['std'][arm][name][k]:.3f}"
        cells.append(cell + (" †" if (arm, name, k) in marked else ""))
      lines.append(f"| {arm} | {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def submit_commands(path: str, variants: list[str], root: str, launcher: str, smoke: bool,
                    extra: list[str], seeds: list[int]) -> list[list[str]]:
  out = []
  for seed in seeds:
    for v in variants:
      cfg, wd = f"--config={path}:{arm_arg(v, smoke)}", arm_dir(root, v, seed, len(seeds))
      args = [cfg, f"--workdir={wd}"] + ([f"--config.seed={seed}"] if len(seeds) > 1 else [])
      if launcher == "local":  # one process per arm, this machine
        out.append([sys.executable, "-m", "r1jax.main", *args, *extra])
      else:
        out.append([sys.executable, os.path.join(ROOT, "launch", f"{launcher}.py"), *args,
                    *extra])
  return out


def main(argv):
  from r1jax import configs
  path = _ABLATION.value
  module = configs.experiment(path)
  if not hasattr(module, "VARIANTS"):
    raise app.UsageError(f"{path} has no VARIANTS; is it an ablation file?")
  variants = _VARIANTS.value or list(module.VARIANTS)
  unknown = [v for v in variants if v not in module.VARIANTS]
  if unknown:
    raise app.UsageError(f"--variants: {unknown} not in {list(module.VARIANTS)}")
  name = os.path.splitext(os.path.basename(path))[0]
  root = _WORKDIR.value.rstrip("/") + "/" + name
  if _SEEDS.value < 1:
    raise app.UsageError(f"--seeds={_SEEDS.value}: run at least one seed")
  if _SUBMIT.value:
    seeds = seed_list(module.get_config(arm_arg(variants[0], _SMOKE.value)), _SEEDS.value)
    for cmd in submit_commands(path, variants, root, _SUBMIT.value, _SMOKE.value, argv[1:],
                               seeds):
      if _DRY_RUN.value:
        print(" ".join(cmd))
      else:
        subprocess.run(cmd, check=True)
    return
  if _DRY_RUN.value:
    raise app.UsageError("--dry_run needs --submit")
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]} (launcher arguments need --submit)")
  runs = run_local(module, path, variants, root, _SMOKE.value, tuple(_REUSE_FROM.value),
                   _SEEDS.value)
  out = summary(path, runs, tuple(getattr(module, "METRICS", ())))
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
  print(table(out), flush=True)


if __name__ == "__main__":
  import r1jax
  r1jax.reexec_with_hugepages()
  app.run(main)
