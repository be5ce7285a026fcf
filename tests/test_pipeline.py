"""The pipeline end to end on the smoke configs: outputs, skipping, exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from r1jax.pipeline import runner
from r1jax.train.metrics import read_jsonl
from tests.experiment_loader import ROOT, load_config


def test_r1_zero_smoke_writes_every_artifact(zero_run):
  workdir, results = zero_run
  assert list(results) == ["pretrain", "grpo"]
  for stage in results:
    d = os.path.join(workdir, stage)
    for name in ("outputs.json", "metrics.jsonl", "metrics.png", "params"):
      assert os.path.exists(os.path.join(d, name)), (stage, name)
    assert os.listdir(os.path.join(d, "tensorboard"))
    assert [m["step"] for m in read_jsonl(os.path.join(d, "metrics.jsonl"))][-1] == 2
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  for key in ("accuracy_before", "accuracy_after", "format_after"):
    assert 0.0 <= summary["grpo"][key] <= 1.0
  assert summary["pretrain"]["wall_s"] > 0
  with open(os.path.join(workdir, "grpo", "samples.json")) as f:
    assert set(json.load(f)) == {"before", "after"}
  grpo_rows = read_jsonl(os.path.join(workdir, "grpo", "metrics.jsonl"))
  assert {"reward/mean", "kl", "response_len/mean"} <= set(grpo_rows[-1])


def test_rerun_skips_finished_stages(zero_run, capsys):
  workdir, results = zero_run
  stamp = os.path.getmtime(os.path.join(workdir, "grpo", "outputs.json"))
  again = runner.run(load_config("experiments/r1_zero/tiny.py", "smoke"), workdir)
  assert again["grpo"]["accuracy_after"] == results["grpo"]["accuracy_after"]
  assert os.path.getmtime(os.path.join(workdir, "grpo", "outputs.json")) == stamp
  assert capsys.readouterr().out.count("finished earlier; skipping") == 2


def test_other_experiments_run_end_to_end(r1_run, distill_run):
  _, results = r1_run
  assert list(results) == list(load_config("experiments/r1/tiny.py", "smoke").pipeline)
  assert results["rejection"]["samples"] > 0
  _, results = distill_run
  assert list(results) == list(load_config("experiments/distill/tiny.py", "smoke").pipeline)
  assert results["distill"]["student_params"] < results["distill"]["teacher_params"]


def _pretrain_only(workdir: str) -> list:
  return ["-m", "r1jax.main", "--config=experiments/r1_zero/tiny.py:smoke",
          f"--workdir={workdir}", "--stages=pretrain", "--config.stages.pretrain.steps=6",
          "--config.stages.pretrain.optim.total_steps=6",
          "--config.stages.pretrain.checkpoint_every=2"]


def test_sigkill_mid_stage_then_rerun_matches_uninterrupted(tmp_path):
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run([sys.executable, *_pretrain_only(straight)], cwd=ROOT, env=env, check=True,
                 capture_output=True, timeout=600)
  proc = subprocess.Popen([sys.executable, *_pretrain_only(killed)], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = os.path.join(killed, "pretrain", "checkpoints")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:  # kill once step 2 or 4 is saved
    if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(killed, "pretrain", "outputs.json"))
  subprocess.run([sys.executable, *_pretrain_only(killed)], cwd=ROOT, env=env, check=True,
                 capture_output=True, timeout=600)
  a = json.load(open(os.path.join(straight, "pretrain", "outputs.json")))
  b = json.load(open(os.path.join(killed, "pretrain", "outputs.json")))
  assert a["eval_loss_after"] == b["eval_loss_after"]
  assert a["final_loss"] == b["final_loss"]
  rows = read_jsonl(os.path.join(killed, "pretrain", "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, 7))


def test_bad_config_flag_is_a_one_line_error(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "r1jax.main", "--config=experiments/r1_zero/tiny.py:smoke",
       f"--workdir={tmp_path}", "--config.stages.grpo.init=stage:later"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  lines = [l for l in out.stderr.splitlines() if "bad config" in l]
  assert lines and "stages.grpo.init: 'later' is not an earlier stage" in lines[0]


def test_format_reward_follows_the_template():
  """An R1-chat completion starts inside <think> and ends in \\boxed{}: the format
  reward must use R1's shape there, and the R1-Zero tags for R1-Zero prompts."""
  from r1jax.data import tokenizer as tokenizer_lib
  from r1jax.pipeline import stages
  from r1jax.rewards import make_reward_fn, RewardSpec
  example = {"answer": "12", "match": "exact", "language": "en"}
  for template, other in (("r1_chat", "r1_zero"), ("r1_zero", "r1_chat")):
    completion = tokenizer_lib.get_template(template).response("7 + 5 = 12.", "12")
    reward = make_reward_fn(RewardSpec.create(stages.reward_terms([("format", 1.0)], template)))
    assert reward(completion, example) == 1.0, template
    wrong = make_reward_fn(RewardSpec.create(stages.reward_terms([("format", 1.0)], other)))
    assert wrong(completion, example) == 0.0, template
  explicit = stages.reward_terms([("format", 1.0, {"partial": True})], "r1_chat")
  assert explicit == [("format", 1.0, {"partial": True})]  # options given are kept


def test_rejection_filters_follow_r1():
  """R1 §2.3.3: reasoning with a code block or an over-long paragraph is dropped;
  the answer after </think> does not count; 0 / False turn the filters off."""
  from r1jax.pipeline.stages import reasoning_flaw
  ok = "3 + 4 = 7.\n\n7 + 5 = 12.\n</think>\n\n\\boxed{12}"
  assert reasoning_flaw(ok, 300, True) is None
  assert reasoning_flaw("Let me code it:\n```python\nprint(12)\n```\n</think> 12", 300,
                        True) == "code_block"
  assert reasoning_flaw("x " * 200 + "\n</think> 12", 300, True) == "long_paragraph"
  assert reasoning_flaw("short.\n</think>\n" + "```" + "y" * 400, 300, True) is None
  assert reasoning_flaw("```" + "x " * 200, 0, False) is None
  c = load_config("experiments/r1/tiny.py")
  assert c.stages.rejection.reject_code_blocks and c.stages.rejection.max_paragraph_chars
  assert 0 < c.stages.rejection.max_repetition < 0.5
