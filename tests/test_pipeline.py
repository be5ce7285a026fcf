"""The pipeline end to end on the smoke configs: outputs, skipping, one-line config errors.

Exact resume after a SIGKILL is tested by tests/test_multihost.py (a process killed
in the middle of GRPO, resumed from its checkpoints to the uninterrupted run's numbers)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from r1jax.pipeline import runner
from r1jax.train.metrics import read_jsonl
from tests.experiment_loader import ROOT, load_config

# One xdist worker runs every test that reads the smoke runs (conftest).
pytestmark = pytest.mark.xdist_group("smoke")


def test_r1_zero_smoke_writes_every_artifact(zero_run):
  workdir, results = zero_run
  assert list(results) == ["pretrain", "eval_base", "grpo", "eval"]
  for stage in ("pretrain", "grpo"):
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
  assert capsys.readouterr().out.count("finished earlier; skipping") == 4


def test_other_experiments_run_end_to_end(r1_run, distill_run):
  _, results = r1_run
  assert list(results) == list(load_config("experiments/r1/tiny.py", "smoke").pipeline)
  assert results["rejection"]["samples"] > 0
  # The general slice's held-out requests are benchmarked beside the reasoning ones.
  assert results["eval"]["general/n_prompts"] == results["eval"]["held_out/n_prompts"] > 0
  _, results = distill_run
  assert list(results) == list(load_config("experiments/distill/tiny.py", "smoke").pipeline)
  # The student is pretrained in its own stage, then distilled from those weights.
  assert results["student_pretrain"]["kind"] == "pretrain"
  assert results["student_pretrain"]["model"] == results["distill"]["model"]
  assert results["distill"]["model"]["attention_kind"] == "gqa"
  assert results["distill"]["student_params"] < results["distill"]["teacher_params"] / 2
  # Distillation starts where the student's pretraining ended, not from a fresh init.
  assert results["distill"]["eval_loss_before"] < results["student_pretrain"]["eval_loss_before"]


def _check_eval_stage(workdir: str, stage: str, out: dict, sc) -> None:
  """eval.json, samples.jsonl and the stage's outputs tell the same story."""
  d = os.path.join(workdir, stage)
  with open(os.path.join(d, "eval.json")) as f:
    ev = json.load(f)
  samples = read_jsonl(os.path.join(d, "samples.jsonl"))
  assert list(ev) == [b[0] for b in sc.benchmarks]
  k = sc.samples
  for bench, m in ev.items():
    rows = [r for r in samples if r["benchmark"] == bench]
    assert m["k"] == k and m["n_prompts"] == sc.max_prompts and len(rows) == k * sc.max_prompts
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [
        (p, s) for p in range(sc.max_prompts) for s in range(k)]
    assert m["pass@1"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert m["response_len"] == pytest.approx(np.mean([r["tokens"] for r in rows]))
    assert m["truncated"] == pytest.approx(1 - np.mean([r["finished"] for r in rows]))
    assert m["mixed"] == pytest.approx(np.mean([r["language"] < 1 for r in rows]))
    for r in rows:
      assert set(r) >= {"completion", "extracted", "correct", "tokens"}
      assert r["correct"] <= (r["extracted"] is not None)  # a right sample has an answer
    assert 0.0 <= m[f"cons@{k}"] <= m[f"pass@{k}"] <= 1.0  # the vote needs a right sample
    assert m["pass@1"] <= m[f"pass@{k}"]
    for key, value in m.items():
      assert out[f"{bench}/{key}"] == pytest.approx(value)
  with open(os.path.join(workdir, "summary.md")) as f:
    table = f.read()
  row = f"| {stage} | held_out | {sc.max_prompts} | {k} | {ev['held_out']['pass@1']:.3f} |"
  assert row in table


def test_every_experiment_ends_with_an_eval_stage(zero_run, r1_run, distill_run):
  for path, (workdir, results) in (("experiments/r1_zero/tiny.py", zero_run),
                                   ("experiments/r1/tiny.py", r1_run),
                                   ("experiments/distill/tiny.py", distill_run)):
    c = load_config(path, "smoke")
    assert c.stages[c.pipeline[-1]].kind == "eval", path
    for stage in c.pipeline:
      if c.stages[stage].kind == "eval":
        # R1's pipeline also benchmarks the general slice's held-out requests.
        general = ["general"] if path == "experiments/r1/tiny.py" else []
        assert ([b[0] for b in c.stages[stage].benchmarks] ==
                ["held_out", "arith_math500"] + general)
        _check_eval_stage(workdir, stage, results[stage], c.stages[stage])


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


def test_grpo_logs_pass_at_1_and_cons_at_k_over_training(zero_run, tmp_path):
  """eval_every: the in-stage evaluation at step 0 (= before), every k steps, and the
  last step (= after), as metric rows; the report plots them in one panel."""
  from r1jax.tools import sweep
  zero_dir, zero = zero_run
  c = load_config("experiments/r1_zero/tiny.py", "smoke")
  with c.unlocked():
    c.pipeline = ("pretrain", "grpo")
    c.stages.grpo.eval_every = 1
    c.stages.grpo.eval_samples = 2
  c.lock()
  workdir = str(tmp_path / "run")
  sweep.reuse_finished(c, workdir, [sweep.earlier_run(zero_dir)])
  out = runner.run(c, workdir)["grpo"]
  rows = [r for r in read_jsonl(os.path.join(workdir, "grpo", "metrics.jsonl"))
          if "eval/accuracy" in r]
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert rows[0]["eval/accuracy"] == out["accuracy_before"]
  assert rows[-1]["eval/accuracy"] == out["accuracy_after"]
  assert rows[-1]["eval/cons@2"] == out["cons@2_after"]
  assert all("eval/cons@2" in r for r in rows)
  # The training rows are the steps' own: the periodic evaluation adds no rollout.
  steps = [r for r in read_jsonl(os.path.join(workdir, "grpo", "metrics.jsonl"))
           if "reward/mean" in r]
  assert [r["step"] for r in steps] == [1, 2]
  assert os.path.exists(os.path.join(workdir, "grpo", "metrics.png"))
