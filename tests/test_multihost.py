"""Two processes × 4 CPU devices (jax.distributed over localhost) train and checkpoint
like one process × 8 devices."""

import json
import os
import subprocess
import sys

from tests.experiment_loader import ROOT


def _cmd(workdir: str) -> list:
  return [sys.executable, "-m", "r1jax.main", "--config=experiments/r1_zero/tiny.py:smoke",
          f"--workdir={workdir}", "--stages=pretrain", "--config.stages.pretrain.steps=4",
          "--config.stages.pretrain.optim.total_steps=4",
          "--config.stages.pretrain.checkpoint_every=2"]


def test_two_processes_match_one(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  subprocess.run(_cmd(one), cwd=ROOT, check=True, capture_output=True, timeout=600,
                 env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  out = subprocess.run([sys.executable, "launch/local.py", "--num_processes=2",
                        "--devices_per_process=4", "--", *_cmd(two)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stdout[-3000:]
  a = json.load(open(os.path.join(one, "pretrain", "outputs.json")))
  b = json.load(open(os.path.join(two, "pretrain", "outputs.json")))
  assert abs(a["final_loss"] - b["final_loss"]) < 1e-5 * abs(a["final_loss"])
  assert abs(a["eval_loss_after"] - b["eval_loss_after"]) < 1e-5 * abs(a["eval_loss_after"])
  # Both processes wrote one orbax checkpoint together; forget the stage's result
  # and rerun: it restores step 4 from that checkpoint and reaches the same numbers.
  assert sorted(os.listdir(os.path.join(two, "pretrain", "checkpoints"))) == ["2", "4"]
  os.remove(os.path.join(two, "pretrain", "outputs.json"))
  rerun = subprocess.run([sys.executable, "launch/local.py", "--num_processes=2",
                          "--devices_per_process=4", "--", *_cmd(two)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert rerun.returncode == 0, rerun.stdout[-3000:]
  assert "resuming from step 4" in rerun.stdout
  c = json.load(open(os.path.join(two, "pretrain", "outputs.json")))
  assert c["eval_loss_after"] == b["eval_loss_after"]
