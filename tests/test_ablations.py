"""Ablation files: every arm validates and differs; the sweep reuses shared stages."""

import glob
import json
import os
import subprocess
import sys

import pytest

from r1jax import configs
from r1jax.pipeline import validate
from r1jax.tools import sweep
from tests.experiment_loader import ROOT

ABLATIONS = sorted(glob.glob(os.path.join(ROOT, "experiments", "ablations", "*.py")))


def test_there_are_at_least_six_ablations():
  assert len(ABLATIONS) >= 6


@pytest.mark.parametrize("path", ABLATIONS, ids=os.path.basename)
def test_every_arm_validates_and_the_arms_differ(path):
  module = configs.experiment(path)
  seen = []
  for v in module.VARIANTS:
    for arg in (v, f"{v},smoke"):
      c = module.get_config(arg)
      validate.validate(c, n_devices=configs.mesh_devices(c))
    c = module.get_config(v).to_dict()
    assert c not in seen, f"arm {v} of {path} equals an earlier arm"
    seen.append(c)
  assert module.get_config().to_dict() == seen[0]  # no argument: the reference arm


def test_bad_arm_is_a_one_line_error():
  module = configs.experiment(os.path.join(ROOT, "experiments/ablations/kl_beta.py"))
  with pytest.raises(ValueError, match=r"b7.*expected one of \['b1e-3'"):
    module.get_config("b7")


@pytest.mark.xdist_group("smoke")  # reads the main job's smoke run (conftest)
def test_sweep_reuses_equal_stages_and_writes_a_table(tmp_path, zero_run):
  """Arm b1e-3 is the main job itself: both its stages are copied from the main
  job's run; arm b0 copies the pretraining and runs its own GRPO."""
  zero_dir, _ = zero_run
  path = os.path.join(ROOT, "experiments/ablations/kl_beta.py")
  module = configs.experiment(path)
  runs = sweep.run_local(module, path, ["b1e-3", "b0"], str(tmp_path), smoke=True,
                         reuse_from=(zero_dir,))
  assert list(runs) == ["b1e-3", "b0"] and all(list(r) == [0] for r in runs.values())
  summaries = {arm: r[0] for arm, r in runs.items()}

  def outputs(arm, stage):
    with open(tmp_path / arm / stage / "outputs.json") as f:
      return json.load(f)

  assert outputs("b1e-3", "grpo")["reused_from"] == os.path.join(zero_dir, "grpo")
  pre = outputs("b0", "pretrain")
  assert pre["reused_from"] == os.path.join(zero_dir, "pretrain")
  assert pre["checkpoint"].startswith(str(tmp_path / "b0" / "pretrain"))
  assert "reused_from" not in outputs("b0", "grpo")
  for arm in ("b1e-3", "b0"):
    assert 0.0 <= summaries[arm]["grpo"]["accuracy_after"] <= 1.0
  # A later sweep may start from these arms' runs: config.json says what they were.
  other, _, finished = sweep.earlier_run(str(tmp_path / "b0"))
  assert finished == {"pretrain", "eval_base", "grpo", "eval"}
  b1 = module.get_config("b1e-3,smoke")
  assert sweep.reusable(b1, "pretrain", other, finished)
  assert not sweep.reusable(b1, "grpo", other, finished)
  out = sweep.summary(path, runs)
  assert out["arms"]["b0"]["grpo"]["accuracy_after"] == summaries["b0"]["grpo"]["accuracy_after"]
  assert out["dirs"] == {"b1e-3": {"0": "b1e-3"}, "b0": {"0": "b0"}}
  assert not any(d["exceeds_2se"] for d in out["differences"])  # one seed: no error bars
  text = sweep.table(out)
  assert text.count("\n") == 1 + 8 and "| b0 | grpo |" in text  # 2 arms × 4 stages
  assert "±" not in text


def _runs(values: dict) -> dict:
  """{arm: [accuracy_after per seed]} as run_local returns them (seeds 0, 1, ...)."""
  return {arm: {s: {"grpo": {"accuracy_after": v, "steps": 30, "kind": "grpo"}}
                for s, v in enumerate(vals)} for arm, vals in values.items()}


def test_seeds_give_mean_std_and_flag_differences_beyond_two_standard_errors():
  out = sweep.summary("abl.py", _runs({"ref": [0.50, 0.52, 0.48], "better": [0.80, 0.82, 0.78],
                                       "noisy": [0.40, 0.70, 0.55]}))
  assert out["seeds"] == [0, 1, 2] and out["n"] == {"ref": 3, "better": 3, "noisy": 3}
  assert out["arms"]["ref"]["grpo"]["accuracy_after"] == pytest.approx(0.50)
  assert out["std"]["ref"]["grpo"]["accuracy_after"] == pytest.approx(0.02)  # n − 1
  assert out["std"]["noisy"]["grpo"]["accuracy_after"] == pytest.approx(0.15)
  assert "kind" not in out["arms"]["ref"]["grpo"]  # only numbers are averaged
  assert out["dirs"]["noisy"] == {"0": "noisy/seed0", "1": "noisy/seed1", "2": "noisy/seed2"}
  diffs = {(d["arm"], d["metric"]): d for d in out["differences"]}
  better = diffs[("better", "accuracy_after")]
  assert better["diff"] == pytest.approx(0.30)
  assert better["se"] == pytest.approx((0.02 ** 2 / 3 * 2) ** 0.5)
  assert better["exceeds_2se"]
  # 0.05 from the reference with a standard error of 0.087: within noise.
  assert not diffs[("noisy", "accuracy_after")]["exceeds_2se"]
  assert ("ref", "accuracy_after") not in diffs
  text = sweep.table(out)
  assert "| better | grpo | " in text and "0.800 ± 0.020 †" in text
  assert "0.550 ± 0.150 |" in text


def test_an_ablation_names_its_own_metrics_to_compare():
  runs = _runs({"ref": [0.5, 0.5, 0.5], "on": [0.5, 0.5, 0.5]})
  for arm, mixed in (("ref", [0.9, 0.1, 0.5]), ("on", [0.0, 0.0, 0.0])):
    for s, v in enumerate(mixed):
      runs[arm][s]["eval"] = {"held_out/mixed/zh": v, "held_out/pass@1": 0.5}
  out = sweep.summary("abl.py", runs, metrics=("held_out/mixed/zh",))
  assert out["columns"][-2:] == ["held_out/mixed/zh", "wall_s"]
  d = {(e["stage"], e["metric"]): e for e in out["differences"]}[("eval", "held_out/mixed/zh")]
  assert d["diff"] == pytest.approx(-0.5) and d["se"] == pytest.approx(0.4 / 3 ** 0.5)
  assert d["exceeds_2se"]  # 0.5 > 2 × 0.231
  assert "| on | eval |" in sweep.table(out) and "0.000 ± 0.000 †" in sweep.table(out)
  # Without METRICS the number is neither compared nor shown.
  plain = sweep.summary("abl.py", runs)
  assert "held_out/mixed/zh" not in plain["columns"]
  assert all(e["metric"] != "held_out/mixed/zh" for e in plain["differences"])


def test_sweep_submit_dry_run_prints_one_launch_per_arm(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "r1jax.tools.sweep", "--ablation=experiments/ablations/clip_higher.py",
       f"--workdir={tmp_path}", "--submit=slurm", "--dry_run", "--", "--nodes=2"],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip().splitlines()
  assert len(out) == 3
  for line, arm in zip(out, ("sym", "higher", "much_higher")):
    assert line.endswith(f"launch/slurm.py --config=experiments/ablations/clip_higher.py:{arm} "
                         f"--workdir={tmp_path}/clip_higher/{arm} --nodes=2")
  seeds = subprocess.run(
      [sys.executable, "-m", "r1jax.tools.sweep", "--ablation=experiments/ablations/clip_higher.py",
       f"--workdir={tmp_path}", "--submit=local", "--dry_run", "--seeds=2", "--variants=sym"],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip().splitlines()
  assert [line.split(" -m r1jax.main ")[1] for line in seeds] == [
      f"--config=experiments/ablations/clip_higher.py:sym --workdir={tmp_path}/clip_higher/sym/"
      f"seed{k} --config.seed={k}" for k in (0, 1)]


def test_a_run_made_before_a_config_key_existed_is_still_reused(tmp_path):
  """A key added since (the general slice's counts) reads as its default, which keeps the
  old behaviour; a key the old run set to something else still blocks the reuse."""
  c = configs.experiment(os.path.join(ROOT, "experiments/r1_zero/tiny.py")).get_config()
  old = json.loads(c.to_json_best_effort())
  del old["data"]["general_n_train"], old["stages"]["grpo"]["general_prompts"]
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "config.json").write_text(json.dumps(old))
  for stage in ("pretrain", "grpo"):
    (tmp_path / "old" / stage).mkdir()
    (tmp_path / "old" / stage / "outputs.json").write_text("{}")
  other, _, finished = sweep.earlier_run(str(tmp_path / "old"))
  assert finished == {"pretrain", "grpo"}
  assert sweep.reusable(c, "pretrain", other, finished)
  assert sweep.reusable(c, "grpo", other, finished)
  old["stages"]["grpo"]["grpo"]["group_size"] += 1
  (tmp_path / "old" / "config.json").write_text(json.dumps(old))
  other, _, finished = sweep.earlier_run(str(tmp_path / "old"))
  assert sweep.reusable(c, "pretrain", other, finished)
  assert not sweep.reusable(c, "grpo", other, finished)
