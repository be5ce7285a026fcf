"""Dense GQA students (Qwen2, Llama-3): HF parity, cached decode, presets, GRPO and SFT.

The fixtures under tests/fixtures/hf/{qwen2,llama3} were made by
make_dense_fixtures.py there (transformers 5.24, torch 2.13; neither is needed
to run these tests).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax import configs
from r1jax.interop import hf
from r1jax.model import LatentCache, ModelConfig, Transformer, cache_bytes_per_token
from r1jax.model import init_params, logical_axes, param_counts
from r1jax.parallel.mesh import batch_sharding, logical_sharding, make_mesh, replicated
from r1jax.rl.rollout import sample
from r1jax.rl.step import GRPOConfig, GRPOStep, reward_from_fn
from r1jax.tools import plan
from r1jax.train import sft
from r1jax.train.optim import OptimConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
VARIANTS = ["qwen2", "llama3"]
LOGIT_ATOL = 1e-4

# The released config.json files (as the model cards ship them).
QWEN2_5_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072,
    "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064,
}
LLAMA3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}


@pytest.fixture(scope="module")
def loaded() -> dict:
  return {v: hf.load(os.path.join(FIXTURES, v)) for v in VARIANTS}


@pytest.fixture(scope="module")
def reference() -> dict:
  return {v: dict(np.load(os.path.join(FIXTURES, v, "reference.npz"))) for v in VARIANTS}


# ----------------------------------------------------------------------------
# Presets and configs.

@pytest.mark.parametrize("preset, total", [
    ("qwen2_5_1_5b", 1_543_714_304), ("qwen2_5_7b", 7_615_616_512),
    ("llama3_1_8b", 8_030_261_248)])
def test_preset_param_counts_are_the_official_totals(preset, total):
  counts = param_counts(getattr(ModelConfig, preset)())
  assert counts["total"] == counts["activated"] == total
  assert counts["mtp"] == counts["router_bias"] == 0


@pytest.mark.parametrize("hf_cfg, preset", [(QWEN2_5_7B, "qwen2_5_7b"),
                                            (LLAMA3_1_8B, "llama3_1_8b")])
def test_released_configs_map_to_the_presets(hf_cfg, preset):
  cfg = hf.config_from_hf(hf_cfg, dtype="bfloat16", param_dtype="bfloat16", remat=True)
  assert cfg == getattr(ModelConfig, preset)()
  # Written back in the released spelling, read again: the same config.
  assert hf.config_from_hf(hf.config_to_hf(cfg), dtype="bfloat16",
                           param_dtype="bfloat16", remat=True) == cfg


def test_a_resized_dense_preset_stays_dense():
  c = configs.base()
  configs.with_model_preset(c, "qwen2_5_1_5b", n_layers=2, d_model=64, vocab_size=512)
  cfg = configs.model_config(c)
  assert (cfg.attention_kind, cfg.n_layers, cfg.n_dense_layers) == ("gqa", 2, 2)


def test_both_rope_spellings_read_alike():
  """transformers 5 writes `rope_parameters` (theta inside); released files do not."""
  new = {k: v for k, v in LLAMA3_1_8B.items() if k not in ("rope_scaling", "rope_theta")}
  new["rope_parameters"] = {**LLAMA3_1_8B["rope_scaling"], "rope_theta": 500000.0}
  assert hf.config_from_hf(new) == hf.config_from_hf(LLAMA3_1_8B)


def test_unsupported_dense_configs_are_refused():
  with pytest.raises(ValueError, match="sliding-window"):
    hf.config_from_hf({**QWEN2_5_7B, "use_sliding_window": True})
  with pytest.raises(ValueError, match="o_proj bias"):
    hf.config_from_hf({**LLAMA3_1_8B, "attention_bias": True})
  with pytest.raises(ValueError, match="unsupported config"):
    hf.config_from_hf({**LLAMA3_1_8B, "model_type": "mistral", "architectures": []})


def test_gqa_cache_bytes_by_hand():
  # Qwen2.5-7B in bf16: 28 layers × (k + v) × 4 kv heads × 128 dims × 2 bytes,
  # against 28 query heads' K and V.
  b = cache_bytes_per_token(ModelConfig.qwen2_5_7b(), dtype_bytes=2)
  assert b == {"cache": 28 * 2 * 4 * 128 * 2, "naive": 28 * 2 * 28 * 128 * 2, "ratio": 7.0}
  assert b["cache"] == 57_344
  cfg = ModelConfig.tiny_gqa()
  cache = LatentCache.zeros(cfg, batch=3, slots=5)
  assert cache.nbytes == 3 * 5 * cache_bytes_per_token(cfg, dtype_bytes=4)["cache"]
  assert cache.layers["dense_layers"][0].shape == (2, 3, 5, 2, 16)  # [L, B, S, G, K]


# ----------------------------------------------------------------------------
# Parity with transformers.

def test_fixture_configs(loaded):
  qwen, llama = loaded["qwen2"][0], loaded["llama3"][0]
  for cfg in (qwen, llama):
    assert (cfg.attention_kind, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == ("gqa", 4, 2, 16)
    assert cfg.n_dense_layers == cfg.n_layers == 2 and not cfg.rope_interleaved
  assert qwen.qkv_bias and qwen.tie_embeddings and not qwen.use_llama3_rope
  assert not llama.qkv_bias and not llama.tie_embeddings and llama.use_llama3_rope
  assert (llama.rope_factor, llama.original_max_position) == (4.0, 32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(loaded, reference, variant):
  cfg, params = loaded[variant]
  ref = reference[variant]
  logits = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))(params, ref["input_ids"])
  diff = float(np.max(np.abs(np.asarray(logits) - ref["logits"])))
  print(f"{variant}: max |logits - transformers| = {diff:.3g}")
  assert diff <= LOGIT_ATOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_decode_matches_transformers_and_full_forward_argmax(loaded, reference, variant):
  """The sampler at temperature 0 over the k/v cache gives transformers' greedy
  continuation, and so does step-by-step argmax of the cache-free forward."""
  cfg, params = loaded[variant]
  ref = reference[variant]
  prompts, want = ref["prompt_ids"], ref["greedy_ids"]
  B, Pn = prompts.shape
  N = want.shape[1]
  out = sample(cfg, params, prompts, np.full((B,), Pn), max_new_tokens=N,
                rng=jax.random.key(0), temperature=0.0, eos_id=None, pad_id=0)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  # Step-by-step argmax of the cache-free forward, in one causal pass: the
  # logits at slot t see only slots ≤ t, as the forward of that prefix would.
  seq = np.concatenate([prompts, want], 1)
  logits = Transformer(cfg).apply({"params": params}, seq)
  np.testing.assert_array_equal(np.asarray(logits)[:, Pn - 1:-1].argmax(-1), want)


def test_padded_rows_decode_like_unpadded_ones(loaded, reference):
  """A shorter prompt in a padded batch (left pad in the cache, RoPE positions
  from 0) continues exactly as it does alone."""
  cfg, params = loaded["llama3"]
  prompts = reference["llama3"]["prompt_ids"].copy()
  prompts[1, 6:] = 0  # row 1: 6 tokens, right-padded on input
  kw = dict(max_new_tokens=5, rng=jax.random.key(0), temperature=0.0, eos_id=None, pad_id=0)
  batch = sample(cfg, params, prompts, np.array([10, 6]), padding="right", **kw)
  alone = sample(cfg, params, prompts[1:, :6], np.array([6]), **kw)
  np.testing.assert_array_equal(np.asarray(batch.tokens)[1:], np.asarray(alone.tokens))


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_then_reload_is_bit_exact(loaded, tmp_path, variant):
  cfg, params = loaded[variant]
  out = str(tmp_path / variant)
  hf.save(out, cfg, params)  # bf16, as the fixture's weights are
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  assert written["architectures"] == [{"qwen2": "Qwen2ForCausalLM",
                                       "llama3": "LlamaForCausalLM"}[variant]]
  cfg2, params2 = hf.load(out)
  assert cfg2 == cfg
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, params2)
  assert all(jax.tree.leaves(same))


def test_streamed_load_onto_a_mesh(loaded):
  """Heads (and the flat q/k/v biases) split over tensor, kv heads whole."""
  cfg, want = loaded["qwen2"]
  cfg2, got = hf.load(os.path.join(FIXTURES, "qwen2"), mesh=make_mesh((1, 2, 2, 2)))
  assert cfg2 == cfg
  assert got["dense_layers"]["attn"]["wq"]["bias"].sharding.spec[1] == "tensor"
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), got, want)
  assert all(jax.tree.leaves(same))


# ----------------------------------------------------------------------------
# Training on a tiny Qwen2-shaped model.

def test_sft_step_trains_a_gqa_model_and_shards():
  """Every leaf moves (q/k/v biases included), no balance loss; on a
  (data 1, fsdp 2, expert 2, tensor 2) mesh (heads over tensor, kv heads
  whole) the step gives the single-device numbers."""
  cfg = ModelConfig.tiny_gqa(n_layers=1)
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 8), 1, cfg.vocab_size)
  valid = jnp.ones((4, 8), jnp.int32).at[1, 5:].set(0)
  batch = dict(tokens=tokens, loss_mask=valid, valid=valid)
  step = jax.jit(sft.make_train_step(cfg, optax.sgd(0.1)))
  state = sft.init_state(params, optax.sgd(0.1))
  want, m = step(state, batch)
  assert np.isfinite(float(m["loss"])) and "balance_loss" not in m
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       params, want.params)
  assert all(jax.tree.leaves(moved))
  mesh = make_mesh((1, 2, 2, 2))
  state = jax.device_put(state, sft.TrainState(
      step=replicated(mesh), params=logical_sharding(mesh, logical_axes(cfg)),
      opt_state=jax.tree.map(lambda _: replicated(mesh), state.opt_state)))
  with jax.set_mesh(mesh):
    got, got_m = step(state, jax.device_put(batch, batch_sharding(mesh)))
  np.testing.assert_allclose(got_m["loss"], m["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_grpo_step_on_a_tiny_qwen2_model():
  """Rollout over the k/v cache, π_old recomputed to f32 rounding, an update of
  every leaf; no MoE layer, so no balance loss and no router bias rule."""
  cfg = ModelConfig.tiny_gqa(n_layers=1)
  params = jax.device_put(init_params(cfg, jax.random.key(0)), jax.devices()[0])
  gcfg = GRPOConfig(group_size=2, prompts_per_step=2, max_prompt_len=6, max_new_tokens=4,
                    num_iterations=1, n_minibatches=1, beta=0.01)
  ocfg = OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10, weight_decay=0.0)

  def low_ids(completion: str, example) -> float:
    return float(np.mean([int(t) < 256 for t in completion.split()]))

  step = GRPOStep(cfg, gcfg, ocfg, reward_from_fn(low_ids, "low_ids"),
                  decode=lambda ids: " ".join(map(str, ids)), eos_id=None, pad_id=0)
  rng = np.random.default_rng(0)
  data = iter(lambda: {"prompt_ids": rng.integers(1, 512, 5).tolist(), "answer": ""}, None)
  state = step.init_state(params)
  for i in range(2):  # the schedule's first update has learning rate 0
    state, m = step(state, data, jax.random.key(i))
    assert m["logp_mismatch/max"] <= 1e-4
    for key in ("reward/mean", "kl", "entropy", "grad_norm", "loss"):
      assert np.isfinite(m[key]), key
  assert int(state.step) == 2
  assert m["entropy"] > 1.0 and m["lr"] > 0  # a tied init is not a near-one-hot policy
  assert "balance_loss" not in m
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       params, state.params)
  assert all(jax.tree.leaves(moved))


def test_plan_tool_on_a_dense_preset(capsys):
  rc = plan.main(["--model=llama3_1_8b", "--devices=8", "--no-compile", "--json"])
  report = json.loads(capsys.readouterr().out)
  assert rc == 0 and report["fits"]
  assert report["params_total"] == report["params_activated"] == 8_030_261_248
  assert report["mesh"]["tensor"] in (1, 2, 4, 8)  # divides 32 query heads
