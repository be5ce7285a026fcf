"""Each benchmark prints one JSON line with its figures (tiny sizes; no timing asserted)."""

import importlib.util
import json

from r1jax.tools import bench


def test_train_reports_tokens_per_s_and_mfu(capsys):
  line = bench.main(["train", "--config=tiny", "--batch=4", "--seq=32", "--repeats=1",
                     "--roof_size=256", "--compare-hf"])
  assert json.loads(capsys.readouterr().out) == line
  assert line["tokens_per_s"] > 0 and line["roof_tflops"] > 0
  assert 0 < line["mfu"] < 1  # a toy model on a CPU is far from the matmul roof
  if importlib.util.find_spec("torch") is None:
    assert line["hf"].startswith("skipped")
  else:
    assert line["hf_tokens_per_s"] > 0


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
