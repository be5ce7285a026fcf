"""Two processes × 4 CPU devices (jax.distributed over localhost) give the numbers of
one process × 8 devices, for every stage kind.

One process group runs all three smoke experiments (tests/multihost_jobs.py): R1
(pretrain, SFT, GRPO, rejection sampling; on a mesh whose expert axis spans both
processes), distillation (its teacher stages copied from the 1 × 8 main job, as
the 1 × 8 distill run copies them), and the main job in a `gs://` workdir on a
local GCS emulator (its pretraining copied there from the 1 × 8 run), where process
1 is killed in the middle of GRPO. A second launch
resumes the main job from the checkpoint in the bucket. Every logged number is
compared with the in-process 1 × 8 runs of the same experiments (conftest).
"""

import json
import math
import os
import subprocess
import sys

import pytest

from r1jax import storage
from tests.conftest import SMOKE_RUNS
from tests.experiment_loader import ROOT

# One xdist worker runs every test that reads the smoke runs (conftest), so each
# is computed once.
pytestmark = pytest.mark.xdist_group("smoke")

# Timings and throughputs differ from run to run; everything else must not.
_UNTIMED = ("time/", "wall_s", "_per_s")
# The sampler-vs-trainer log-prob gap, and the mass top-k/top-p cut away (0 when
# nothing is cut), are rounding noise (~1e-7 in f32) at these settings; so is the
# mean group-normalised advantage (0 up to rounding: 0.0 vs -1.5e-8 was seen).
# Compared in absolute terms, since a different reduction order moves them by ulps.
_NOISE = ("logp_mismatch/", "logp_truncation/", "advantage_mean")


def _launch(jobs: list[dict], path: str, env: dict) -> subprocess.Popen:
  with open(path, "w") as f:
    json.dump(jobs, f)
  return subprocess.Popen([sys.executable, "launch/local.py", "--num_processes=2",
                           "--devices_per_process=4", "--", sys.executable, "-m",
                           "tests.multihost_jobs", path],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
  out, _ = proc.communicate(timeout=1800)
  return proc.returncode, out


def _job(name: str, workdir: str, overrides: dict | None = None, **extra) -> dict:
  config, smoke_overrides = SMOKE_RUNS[name]
  return {"config": config, "overrides": {**smoke_overrides, **(overrides or {})},
          "workdir": workdir, **extra}


# R1's stages after rejection sampling (SFT, then GRPO again) are kinds the
# comparison already covers; the 2 x 4 run stops there.
_R1_STAGES = ["pretrain", "cold_start", "reasoning_rl", "rejection"]
# The distillation's student stages; its eval stages are a kind the main job's
# 2 x 4 run covers. The main job's pretraining, a kind the R1 run covers, is copied
# from the 1 x 8 run into the bucket (as a sweep would): what it tests is the rest.
_DISTILL_STAGES = ["pretrain", "grpo", "student_pretrain", "distill"]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, gcs_bucket, zero_run, request):
  tmp = tmp_path_factory.mktemp("multihost")
  # The same XLA flags as the 1 × 8 runs in this process (the launcher sets the
  # device count), and one compilation cache for both launches.
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache")}
  dirs = {"r1": str(tmp / "r1"), "distill": str(tmp / "distill"),
          "r1_zero": f"{gcs_bucket}/multihost/r1_zero"}
  # The distillation's teacher stages (the main job's) are copied from the 1 x 8
  # run, as the 1 x 8 distill run does: what is compared are the student's stages.
  first = _launch([_job("r1", dirs["r1"], overrides={"pipeline": _R1_STAGES}),
                   _job("distill", dirs["distill"], overrides={"pipeline": _DISTILL_STAGES},
                        reuse_from=[zero_run[0]]),
                   _job("r1_zero", dirs["r1_zero"], reuse_from=[zero_run[0]],
                        reuse_stages=["pretrain"],
                        kill={"stage": "grpo", "step": 2, "process": 1})],
                  str(tmp / "first.json"), env)
  # The 1 x 8 runs to compare with are computed here while the two processes work.
  request.getfixturevalue("r1_run")
  request.getfixturevalue("distill_run")
  code, first_out = _finish(first)
  assert "killing process 1 in grpo at step 2" in first_out, first_out[-4000:]
  assert code != 0
  code, second_out = _finish(_launch([_job("r1_zero", dirs["r1_zero"])],
                                     str(tmp / "second.json"), env))
  assert code == 0, second_out[-4000:]
  return dirs, first_out, second_out


def _close(a: float, b: float) -> bool:
  # abs_tol: a value that is zero in exact arithmetic (the GRPO loss when every
  # advantage cancels) is f32 rounding of O(1) terms, ~1e-8 either side of 0
  # depending on the reduction order (seen: -7.45e-9 on 1 x 8, +7.45e-9 on 2 x 4).
  return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


def _compare(one: dict, two: dict, where: str) -> list[str]:
  """Differences between two flat dicts of numbers (counts exact, floats to 1e-5)."""
  bad = []
  one, two = ({k: v for k, v in d.items() if k != "reused_from"} for d in (one, two))
  if set(one) != set(two):
    bad.append(f"{where}: keys differ: {sorted(set(one) ^ set(two))}")
  for k in sorted(set(one) & set(two)):
    a, b = one[k], two[k]
    if any(t in k for t in _UNTIMED) or not isinstance(a, (int, float)):
      continue
    if any(t in k for t in _NOISE):
      same = abs(a - b) < 1e-5
    else:
      same = a == b if isinstance(a, int) and isinstance(b, int) else _close(a, b)
    if not same:
      bad.append(f"{where}: {k} {a} (1 x 8) vs {b} (2 x 4)")
  return bad


# Printed per stage (`pytest -s`): the figures a reader compares first.
_HEADLINE = ("final_loss", "eval_loss_after", "reward/mean", "kl", "accuracy_after",
             "language_after", "rows_kept", "samples")


def _assert_same_run(one_dir: str, two_dir: str, stages) -> None:
  bad, checked = [], 0
  for stage in stages:
    a = storage.read_json(storage.join(one_dir, stage, "outputs.json"))
    b = storage.read_json(storage.join(two_dir, stage, "outputs.json"))
    bad += _compare(a, b, f"{stage}/outputs.json")
    rows_a = storage.read_jsonl(storage.join(one_dir, stage, "metrics.jsonl"))
    rows_b = storage.read_jsonl(storage.join(two_dir, stage, "metrics.jsonl"))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b], stage
    for ra, rb in zip(rows_a, rows_b):
      bad += _compare(ra, rb, f"{stage}/metrics.jsonl step {ra['step']}")
    checked += len(a) + sum(len(r) for r in rows_a)
    last_a, last_b = {**(rows_a[-1] if rows_a else {}), **a}, {**(rows_b[-1] if rows_b else {}), **b}
    shown = [f"{k} {last_a[k]:.6g} | {last_b[k]:.6g}" for k in _HEADLINE if k in last_a]
    print(f"\n  {stage} (1x8 | 2x4): " + "; ".join(shown))
  print(f"  {checked} logged values compared")
  assert not bad, "\n".join(bad[:40])


def test_r1_on_an_expert_axis_across_processes_matches_one_process(two_process_runs, r1_run):
  dirs, _, _ = two_process_runs
  workdir, results = r1_run
  assert [s for s in results if s in _R1_STAGES] == _R1_STAGES
  _assert_same_run(workdir, dirs["r1"], _R1_STAGES)
  # The rejection stage's dataset is the same file, written once by process 0.
  a = storage.read_text(storage.join(workdir, "rejection", "dataset.jsonl"))
  assert a == storage.read_text(storage.join(dirs["r1"], "rejection", "dataset.jsonl"))


def test_distill_matches_one_process(two_process_runs, distill_run):
  dirs, _, _ = two_process_runs
  workdir, _ = distill_run
  _assert_same_run(workdir, dirs["distill"], _DISTILL_STAGES[2:])


def test_main_job_killed_in_grpo_on_gs_resumes_to_one_process_numbers(two_process_runs,
                                                                       zero_run):
  dirs, _, resumed = two_process_runs
  assert "[pretrain] finished earlier; skipping" in resumed
  assert "resuming from step 1" in resumed
  workdir, results = zero_run
  _assert_same_run(workdir, dirs["r1_zero"], results)
  for name in ("summary.json", "summary.md", "tokenizer.model", "config.json",
               "grpo/samples.json", "grpo/metrics.png"):
    assert storage.exists(storage.join(dirs["r1_zero"], name)), name
  events = list(storage.path(dirs["r1_zero"]).joinpath("grpo", "tensorboard").iterdir())
  assert events and all(e.name.startswith("events.out.tfevents") for e in events)
