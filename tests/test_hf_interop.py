"""Hugging Face interop: parity with transformers' DeepSeek-V3, lossless round trips.

The fixtures under tests/fixtures/hf/ were made by make_fixtures.py there
(transformers 5.23, torch 2.13; neither is needed to run these tests).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from r1jax.interop import hf
from r1jax.model import ModelConfig, Transformer, abstract_params
from r1jax.parallel.mesh import make_mesh

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
VARIANTS = ["yarn_qlora_mtp", "yarn_noqlora", "rope_qlora", "rope_noqlora"]
MTP_VARIANT = "yarn_qlora_mtp"
LOGIT_ATOL = 1e-4

# DeepSeek-V3's released config.json (FP8 quantisation block aside), as the
# model card ships it.
OFFICIAL_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1,
    "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


@pytest.fixture(scope="module")
def loaded() -> dict:
  return {v: hf.load(os.path.join(FIXTURES, v)) for v in VARIANTS}


@pytest.fixture(scope="module")
def reference() -> dict:
  return {v: dict(np.load(os.path.join(FIXTURES, v, "reference.npz"))) for v in VARIANTS}


def _leaves(params) -> list:
  return jax.tree_util.tree_leaves_with_path(params)


def _copy_fixture(tmp_path, variant: str) -> str:
  dst = str(tmp_path / variant)
  shutil.copytree(os.path.join(FIXTURES, variant), dst)
  return dst


def _edit_tensors(path: str, edit) -> None:
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


# ----------------------------------------------------------------------------
# Config.

def test_fixture_configs(loaded):
  for v, (cfg, _) in loaded.items():
    assert cfg.q_lora_rank == (32 if "_qlora" in v else 0), v
    assert cfg.rope_factor == (4.0 if v.startswith("yarn") else 1.0), v
    assert cfg.mtp_depth == (1 if v == MTP_VARIANT else 0), v
    assert cfg.rope_interleaved and cfg.n_dense_layers == 1 and cfg.n_layers == 3
    assert (cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups,
            cfg.n_limited_groups, cfg.route_scale) == (8, 2, 4, 2, 2.5)
    assert cfg.param_dtype == "float32"


def test_official_config_maps_to_the_671b_preset():
  cfg = hf.config_from_hf(OFFICIAL_V3, dtype="bfloat16", param_dtype="bfloat16", remat=True)
  assert cfg == ModelConfig.deepseek_v3_671b()


def test_fp8_config_is_refused():
  fp8 = dict(OFFICIAL_V3, quantization_config={"quant_method": "fp8", "fmt": "e4m3"})
  with pytest.raises(ValueError, match="FP8"):
    hf.config_from_hf(fp8)


@pytest.mark.parametrize("cfg", [
    ModelConfig.deepseek_v3_671b(),
    ModelConfig.tiny(q_lora_rank=0, rope_factor=1.0, mtp_depth=0, rope_interleaved=False),
    ModelConfig.tiny(n_shared_experts=0, tie_embeddings=True, n_expert_groups=1,
                     n_limited_groups=1),
])
def test_config_round_trip(cfg):
  back = hf.config_from_hf(hf.config_to_hf(cfg), dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, remat=cfg.remat)
  # Fields transformers has no key for keep their defaults, and so do the
  # YaRN fields of a config without YaRN (they are inert there).
  fields = ["mtp_loss_weight", "bias_update_rate", "seq_aux_loss_alpha"]
  if not cfg.use_yarn:
    fields += ["original_max_position", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"]
  defaults = {f: getattr(ModelConfig(), f) for f in fields}
  assert back == cfg.replace(**defaults)


# ----------------------------------------------------------------------------
# Parity with transformers.

def test_params_match_the_model_tree(loaded):
  for v, (cfg, params) in loaded.items():
    want = abstract_params(cfg)
    got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert jax.tree.structure(got) == jax.tree.structure(want), v
    for (path, a), (_, b) in zip(_leaves(got), _leaves(want)):
      assert a.shape == b.shape and a.dtype == b.dtype, (v, jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(loaded, reference, variant):
  cfg, params = loaded[variant]
  ref = reference[variant]
  logits = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))(params, ref["input_ids"])
  diff = float(np.max(np.abs(np.asarray(logits) - ref["logits"])))
  print(f"{variant}: max |logits - transformers| = {diff:.3g}")
  assert diff <= LOGIT_ATOL


def test_mtp_layer_is_loaded(loaded, reference):
  cfg, params = loaded[MTP_VARIANT]
  raw = load_file(os.path.join(FIXTURES, MTP_VARIANT, "model.safetensors"))
  p = f"model.layers.{cfg.n_layers}."
  mtp = params["mtp_0"]
  np.testing.assert_array_equal(mtp["enorm"]["scale"], raw[p + "enorm.weight"].astype(np.float32))
  np.testing.assert_array_equal(mtp["eh_proj"]["kernel"],
                                raw[p + "eh_proj.weight"].astype(np.float32).T)
  np.testing.assert_array_equal(mtp["block"]["moe"]["experts"]["wo"][5],
                                raw[p + "mlp.experts.5.down_proj.weight"].astype(np.float32).T)
  np.testing.assert_array_equal(mtp["block"]["moe"]["router"]["bias"],
                                raw[p + "mlp.gate.e_score_correction_bias"])
  # The MTP head on (h_i, t_{i+1}), h_i final-normed, against the fixture's
  # torch computation from transformers' own modules.
  ref = reference[MTP_VARIANT]
  apply = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x, return_aux=True))
  _, aux = apply(params, ref["input_ids"])
  mtp_logits = np.asarray(aux["mtp_logits"][0, :, :-1])
  diff = float(np.max(np.abs(mtp_logits - ref["mtp_logits"])))
  print(f"{MTP_VARIANT}: max |mtp logits - torch| = {diff:.3g}")
  assert diff <= LOGIT_ATOL


def test_mtp_can_be_skipped():
  cfg, params = hf.load(os.path.join(FIXTURES, MTP_VARIANT), mtp=False)
  assert cfg.mtp_depth == 0 and "mtp_0" not in params


def test_declared_but_absent_mtp_warns(tmp_path):
  path = _copy_fixture(tmp_path, "rope_qlora")
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["num_nextn_predict_layers"] = 1  # what transformers writes by default
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.warns(UserWarning, match="MTP"):
    cfg, params = hf.load(path)
  assert cfg.mtp_depth == 0 and "mtp_0" not in params


@pytest.mark.parametrize("mesh_shape", [None, (1, 2, 2, 2)])
def test_differing_mtp_embedding_copy_warns(tmp_path, mesh_shape):
  path = _copy_fixture(tmp_path, MTP_VARIANT)
  name = "model.layers.3.embed_tokens.weight"
  _edit_tensors(path, lambda t: t.__setitem__(name, t[name] * 2))
  with pytest.warns(UserWarning, match=name):
    hf.load(path, mesh=mesh_shape and make_mesh(mesh_shape))


def test_streamed_load_of_a_transformers_checkpoint(loaded):
  # bf16 files read slice by slice; tests/test_hf_stream.py covers the rest.
  cfg, want = loaded[MTP_VARIANT]
  cfg2, got = hf.load(os.path.join(FIXTURES, MTP_VARIANT), mesh=make_mesh((1, 2, 2, 2)))
  assert cfg2 == cfg
  for (path, a), (_, b) in zip(_leaves(got), _leaves(want)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b), jax.tree_util.keystr(path)


# ----------------------------------------------------------------------------
# Round trips.

@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_exact(loaded, tmp_path, variant):
  cfg, params = loaded[variant]
  hf.save(str(tmp_path), cfg, params, dtype="bfloat16")
  cfg2, params2 = hf.load(str(tmp_path))
  assert cfg2 == cfg
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for (path, a), (_, b) in zip(_leaves(params), _leaves(params2)):
    assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)
  # The written tensors are the fixture's, name for name and bit for bit.
  want = load_file(os.path.join(FIXTURES, variant, "model.safetensors"))
  got = load_file(os.path.join(str(tmp_path), "model.safetensors"))
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    assert np.array_equal(got[name].view(np.uint8), want[name].view(np.uint8)), name


def test_sharded_round_trip(loaded, tmp_path):
  cfg, params = loaded[MTP_VARIANT]
  hf.save(str(tmp_path), cfg, params, max_shard_bytes=100_000)
  files = os.listdir(tmp_path)
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  cfg2, params2 = hf.load(str(tmp_path))
  assert cfg2 == cfg
  for (path, a), (_, b) in zip(_leaves(params), _leaves(params2)):
    assert np.array_equal(a, b), jax.tree_util.keystr(path)


def test_save_refuses_to_mix_with_old_weights(loaded, tmp_path):
  cfg, params = loaded["rope_noqlora"]
  hf.save(str(tmp_path), cfg, params)
  with pytest.raises(FileExistsError):
    hf.save(str(tmp_path), cfg, params)
  hf.save(str(tmp_path), cfg, params, max_shard_bytes=100_000, overwrite=True)
  assert "model.safetensors" not in os.listdir(tmp_path)


# ----------------------------------------------------------------------------
# Errors name the tensor.

def test_missing_tensor_is_named(tmp_path):
  path = _copy_fixture(tmp_path, "rope_qlora")
  name = "model.layers.2.mlp.experts.5.up_proj.weight"
  _edit_tensors(path, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=f"missing tensors: {name}"):
    hf.load(path)


def test_unknown_tensor_is_named(tmp_path):
  path = _copy_fixture(tmp_path, "rope_qlora")
  name = "model.layers.1.mlp.experts.8.gate_proj.weight"
  copy = "model.layers.1.mlp.experts.7.gate_proj.weight"
  _edit_tensors(path, lambda t: t.__setitem__(name, t[copy]))
  with pytest.raises(ValueError, match=f"unexpected tensors: {name}"):
    hf.load(path)


def test_wrong_shape_is_named(tmp_path):
  path = _copy_fixture(tmp_path, "rope_noqlora")
  name = "model.layers.0.self_attn.kv_b_proj.weight"
  _edit_tensors(path, lambda t: t.__setitem__(name, np.ascontiguousarray(t[name].T)))
  with pytest.raises(ValueError, match=name):
    hf.load(path)


def test_fp8_checkpoint_is_refused(tmp_path):
  path = _copy_fixture(tmp_path, "rope_noqlora")
  name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
  _edit_tensors(path, lambda t: t.__setitem__(name, np.ones((1, 1), np.float32)))
  with pytest.raises(ValueError, match="FP8"):
    hf.load(path)
