"""Each benchmark prints one JSON line with its figures (tiny sizes; no timing asserted).

The peer comparisons (--compare-hf, --compare-trl) need torch, which the test
environment lacks: their argument checks, parity checks and TRL phase clock
are tested here without it.
"""

import importlib.util
import json
import sys
import time

import numpy as np
import pytest

from r1jax.tools import bench, bench_peers

NO_TORCH = importlib.util.find_spec("torch") is None


def test_train_reports_tokens_per_s_and_mfu(capsys):
  line = bench.main(["train", "--config=tiny", "--batch=4", "--seq=32", "--repeats=1",
                     "--roof_size=256"])
  assert json.loads(capsys.readouterr().out) == line
  assert line["tokens_per_s"] > 0 and line["roof_tflops"] > 0
  assert 0 < line["mfu"] < 1  # a toy model on a CPU is far from the matmul roof


def test_train_flops_count_the_activated_weights_and_attention():
  cfg = bench.CONFIGS["tiny"](mtp_depth=0)
  f0, f1 = bench.train_flops_per_token(cfg, 0), bench.train_flops_per_token(cfg, 64)
  assert f1 - f0 == 3 * cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 64
  # Eight more experts per MoE layer: idle for any one token, only the router grows.
  wider = cfg.replace(n_routed_experts=16, n_expert_groups=4)
  router = 6 * cfg.n_moe_layers * cfg.d_model * 8
  assert bench.train_flops_per_token(wider, 64) == f1 + router


def test_roof_and_moe_lines():
  roof = bench.main(["roof", "--size=128", "--repeats=1"])
  assert roof["matmul_tflops"] > 0
  moe = bench.main(["moe", "--tokens=64", "--top_k=2", "--experts=8", "--impls=blocked",
                    "--repeats=1"])
  assert [r["experts"] for r in moe["results"]] == [8]


# ----------------------------------------------------------------------------
# grpo

def test_grpo_step_split_adds_up_and_times_every_phase(capsys, monkeypatch):
  monkeypatch.setitem(bench.CONFIGS, "micro", lambda: bench.CONFIGS["tiny"](
      n_layers=1, mtp_depth=0, vocab_size=128))  # one dense layer: quick to compile
  line = bench.main(["grpo", "--config=micro", "--prompts=2", "--group=2", "--prompt=4",
                     "--new=3", "--steps=1"])
  assert json.loads(capsys.readouterr().out) == line
  assert line["completions_per_step"] == 4 and line["updates_per_step"] == 1
  assert len(line["all_step_s"]) == 2  # the first (compiling) step and one timed step
  assert line["first_step"]["step_s"] == line["all_step_s"][0]
  assert line["median_step"]["step_s"] == line["step_s"] == line["all_step_s"][1]
  for split in (line["first_step"], line["median_step"]):
    phases = [split[k] for k in bench.PHASES]
    assert all(t > 0 for t in phases), split
    assert split["other"] >= -1e-3, split
    assert sum(phases) + split["other"] == pytest.approx(split["step_s"], abs=3e-4)


def test_grpo_phase_split_and_prompts():
  m = {"time/rollout_s": 1.0, "time/reward_s": 0.25, "time/logprob_s": 0.5, "time/train_s": 2.0}
  assert bench.phase_split(m, 4.0) == {"step_s": 4.0, "rollout": 1.0, "rewards": 0.25,
                                       "logprobs": 0.5, "update": 2.0, "other": 0.25}
  p = bench.grpo_examples(1024, 8, 32)
  assert np.shape(p) == (8, 32) and min(map(min, p)) >= 3 and max(map(max, p)) < 1024
  assert p == bench.grpo_examples(1024, 8, 32)  # both sides get the same prompts
  with pytest.raises(ValueError, match="--steps=0"):
    bench.main(["grpo", "--config=tiny", "--steps=0"])


def test_peer_preset_is_the_issues_model():
  c = bench.CONFIGS["peer"]()
  assert (c.n_layers, c.d_model, c.vocab_size, c.q_lora_rank, c.kv_lora_rank) == (
      4, 256, 1024, 96, 64)
  assert (c.n_routed_experts, c.n_activated_experts, c.n_shared_experts) == (16, 4, 1)
  assert c.mtp_depth == 0 and c.dtype == c.param_dtype == "float32"
  assert bench.parse(["grpo"]).config == "peer"


# ----------------------------------------------------------------------------
# Peer comparisons, without torch.

@pytest.mark.skipif(not NO_TORCH, reason="checks the message given when torch is missing")
def test_compare_without_torch_fails_before_timing_with_one_line():
  for argv in (["train", "--compare-hf"], ["forward", "--compare-hf"],
               ["generate", "--compare-hf"], ["grpo", "--compare-trl"]):
    with pytest.raises(ValueError, match=r"--peer_python is not set .*/pip install torch==2\.13\.0"
                       ) as e:
      bench.main(argv)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="cannot import torch"):
    bench.main(["forward", "--compare-hf", f"--peer_python={sys.executable}"])
  with pytest.raises(ValueError, match="not an executable file"):
    bench.main(["forward", "--compare-hf", "--peer_python=/nonexistent/python"])


def test_compare_settings_are_checked_first():
  with pytest.raises(ValueError, match="greedy decoding on both sides"):
    bench.main(["rollout", "--compare-hf", "--temperature=0.7"])
  with pytest.raises(ValueError, match="--mesh"):
    bench.main(["forward", "--compare-hf", "--mesh=8,1,1,1"])
  with pytest.raises(ValueError, match="unknown peer job 'moe'"):
    bench_peers.peer_modules("moe")
  assert bench_peers.peer_modules("grpo") == ("torch", "transformers", "trl")


def test_parity_and_token_agreement():
  a = np.zeros((2, 3, 4), np.float32)
  assert bench_peers.parity(a, a + 1e-5, atol=1e-4)["ok"]
  far = bench_peers.parity(a, a + np.eye(4)[None, None, 0], atol=1e-4)
  assert not far["ok"] and far["max_abs_diff"] == 1.0
  with pytest.raises(ValueError, match="shapes differ"):
    bench_peers.parity(a, a[:1], atol=1.0)
  ours = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  theirs = np.array([[1, 2, 3, 4], [5, 9, 7, 8]])
  assert bench_peers.token_agreement(ours, theirs) == {
      "tokens_equal": 7 / 8, "rows_equal": 0.5, "mean_equal_prefix": 2.5}
  assert bench_peers.speedup(2.0, 3.0) == 1.5  # theirs / ours: > 1 when we are faster
  with pytest.raises(ValueError, match="positive"):
    bench_peers.speedup(0.0, 1.0)


def test_reward_rule_is_the_same_on_ids_and_text():
  ids = [3, 600, 17, 1023, 511, 512]
  text = bench_peers.token_text(ids)
  assert text == "t3 t600 t17 t1023 t511 t512"
  assert bench_peers.text_ids(text) == ids
  assert bench_peers.low_id_reward(text, 1024) == 3 / 6
  assert bench_peers.low_id_reward("", 1024) == 0.0


class _FakeTrainer:
  """The GRPOTrainer methods the phase clock wraps, each taking a known time."""

  def _generate(self):
    time.sleep(0.02)

  def _calculate_rewards(self):
    time.sleep(0.01)

  def _get_per_token_logps_and_entropies(self):
    time.sleep(0.03)

  def _generate_and_score_completions(self):
    self._generate()
    self._get_per_token_logps_and_entropies()  # the reference's log-probs
    self._calculate_rewards()


def test_trl_phase_clock_counts_logprobs_only_while_preparing():
  trainer = _FakeTrainer()
  clock = bench_peers._PhaseClock(trainer)
  trainer._generate_and_score_completions()
  trainer._get_per_token_logps_and_entropies()  # inside the loss: the update's, not counted
  split = clock.take()
  assert split["rollout"] >= 0.02 and split["rewards"] >= 0.01
  assert 0.03 <= split["logprobs"] < 0.06
  assert split["prepare"] >= split["rollout"] + split["rewards"] + split["logprobs"]
  assert set(clock.take().values()) == {0.0}  # take() starts the next step from zero
