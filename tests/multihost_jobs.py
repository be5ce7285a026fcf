"""Runs several experiments in one multi-process JAX job (one process group for many tests).

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      python -m tests.multihost_jobs JOBS.json

JOBS.json is a list of {"config": "experiments/….py:arg", "workdir": …,
"overrides": {"dotted.key": value}, "reuse_from": [earlier workdirs],
"reuse_stages": [the only stages to copy from them; default: every equal one],
"kill": {"stage": …, "step": k, "process": p}}. Stages that an earlier workdir
computed with the same settings are copied first (as the sweep does).
Each job is what `python -m r1jax.main --config=… --workdir=…` would run, one
after another in these processes, so compiled programs are shared between
jobs. "kill" makes process p SIGKILL itself when the stage would save its
checkpoint of step k, once step k−1's checkpoint is committed: a crash in the
middle of that stage, at a known point.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from r1jax.parallel import distributed


def load_job_config(spec: str, overrides: dict):
  from r1jax import configs
  path, _, arg = spec.partition(":")
  c = configs.experiment(path).get_config(arg or None)
  with c.unlocked():
    for key, value in overrides.items():
      node = c
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = tuple(value) if isinstance(value, list) else value
  c.lock()
  return c


def _arm_kill(stage: str, step: int, process: int) -> None:
  import jax

  from r1jax.train import checkpoint as ckpt_lib
  save = ckpt_lib.Checkpointer.save

  def save_or_die(self, s, *args, **kw):
    if s == step and self.directory.endswith(f"/{stage}/checkpoints"):
      self.wait()  # every process: step k-1's checkpoint is committed
      if jax.process_index() == process:
        print(f"killing process {process} in {stage} at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      time.sleep(600)  # the others: stopped by the launcher once process p is gone
    return save(self, s, *args, **kw)

  ckpt_lib.Checkpointer.save = save_or_die


def main(jobs_file: str) -> None:
  distributed.maybe_initialize()
  import jax

  from r1jax.parallel import multihost
  from r1jax.pipeline import runner
  from r1jax.tools import sweep
  with open(jobs_file) as f:
    jobs = json.load(f)
  for job in jobs:
    if "kill" in job:
      _arm_kill(**job["kill"])
    c = load_job_config(job["config"], job.get("overrides", {}))
    if job.get("reuse_from") and jax.process_index() == 0:
      sweep.reuse_finished(c, job["workdir"], [sweep.earlier_run(w) for w in job["reuse_from"]],
                           stages=job.get("reuse_stages"))
    multihost.barrier("reuse")
    runner.run(c, job["workdir"])


if __name__ == "__main__":
  main(sys.argv[1])
