"""config.json <-> ModelConfig for DeepSeek-V3, Qwen2 and Llama (the mapping
`hf.load` and `hf.save` use).

Reads either RoPE spelling (transformers 5 `rope_parameters` or the released
checkpoints' `rope_theta` + `rope_scaling`) and writes the released one. GQA
configs are written as Qwen2 when they have q/k/v biases, else as Llama.
"""

from __future__ import annotations

from typing import Any

from r1jax.model.config import ModelConfig


def _rope_dict(hf: dict) -> dict:
  """The RoPE scaling dict, whichever spelling the config uses (transformers 5
  `rope_parameters`, or the official `rope_scaling`)."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if any(isinstance(v, dict) for v in rope.values()):
    raise ValueError("per-layer-type rope_parameters are not supported")
  return rope


_DENSE_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def _model_type(hf: dict) -> str:
  arch = hf.get("architectures") or []
  if hf.get("model_type") == "deepseek_v3" or "DeepseekV3ForCausalLM" in arch:
    return "deepseek_v3"
  for model_type, name in _DENSE_TYPES.items():
    if hf.get("model_type") == model_type or name in arch:
      return model_type
  raise ValueError(f"unsupported config (model_type={hf.get('model_type')!r}, "
                   f"architectures={arch}); r1jax maps DeepSeek-V3, Qwen2 and Llama "
                   "checkpoints")


def _rope_fields(hf: dict, problems: list[str], types: tuple[str, ...]) -> dict[str, Any]:
  """rope_theta and the context-extension fields, from either spelling."""
  rope = _rope_dict(hf)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  fields: dict[str, Any] = dict(
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), rope_factor=1.0)
  if rope_type not in types:
    problems.append(f"rope type {rope_type!r} (only {', '.join(types)})")
  elif rope_type == "llama3":
    fields.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                  low_freq_factor=float(rope["low_freq_factor"]),
                  high_freq_factor=float(rope["high_freq_factor"]),
                  original_max_position=int(rope["original_max_position_embeddings"]))
  elif rope_type == "yarn":
    original = rope.get("original_max_position_embeddings", hf["max_position_embeddings"])
    # transformers derives a missing factor from the two lengths.
    factor = rope.get("factor") or hf["max_position_embeddings"] / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not mscale and mscale_all_dim:
      problems.append("YaRN with mscale_all_dim but no mscale is not supported")
    if not (mscale and mscale_all_dim):
      # transformers then scales cos/sin by 0.1·ln(factor)+1 whatever mscale
      # says, and leaves the softmax scale alone: mscale=1, mscale_all_dim=0.
      mscale, mscale_all_dim = 1.0, 0.0
    if rope.get("attention_factor") is not None:
      problems.append("YaRN attention_factor overrides are not supported")
    if rope.get("truncate", True) is False:
      problems.append("YaRN truncate=False is not supported")
    fields.update(rope_scaling="yarn", rope_factor=float(factor),
                  original_max_position=int(original),
                  beta_fast=float(rope.get("beta_fast") or 32.0),
                  beta_slow=float(rope.get("beta_slow") or 1.0),
                  mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))
  if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
    problems.append("partial_rotary_factor != 1 is not supported")
  return fields


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """A ModelConfig from a Hugging Face DeepSeek-V3, Qwen2 or Llama config.json dict.

  `overrides` set r1jax-only fields (dtype, param_dtype, remat, ...)."""
  if hf.get("quantization_config"):
    raise ValueError("quantised (FP8) checkpoints are not supported: dequantise to bf16 "
                     "first, e.g. with DeepSeek-V3's inference/fp8_cast_bf16.py")
  model_type = _model_type(hf)
  if model_type != "deepseek_v3":
    return _dense_from_hf(hf, model_type, overrides)
  problems = []
  heads = hf["num_attention_heads"]
  if hf.get("num_key_value_heads", heads) != heads:
    problems.append("num_key_value_heads must equal num_attention_heads in MLA")
  if hf.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={hf['hidden_act']!r} (only silu)")
  if hf.get("attention_bias"):
    problems.append("attention_bias=True (DeepSeek-V3 has none)")
  if hf.get("moe_layer_freq", 1) != 1:
    problems.append(f"moe_layer_freq={hf['moe_layer_freq']} (only 1)")
  if hf.get("topk_method", "noaux_tc") != "noaux_tc":
    problems.append(f"topk_method={hf['topk_method']!r} (only noaux_tc, V3's biased routing)")
  rope = _rope_fields(hf, problems, ("default", "yarn"))
  if problems:
    raise ValueError("unsupported DeepSeek-V3 config: " + "; ".join(problems))

  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"], n_dense_layers=hf.get("first_k_dense_replace") or 0,
      n_heads=heads, q_lora_rank=hf.get("q_lora_rank") or 0,
      kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
      d_ff=hf["intermediate_size"], moe_d_ff=hf["moe_intermediate_size"],
      n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
      n_activated_experts=hf["num_experts_per_tok"],
      n_expert_groups=hf.get("n_group") or 1, n_limited_groups=hf.get("topk_group") or 1,
      route_scale=float(hf.get("routed_scaling_factor", 1.0)),
      score_func=hf.get("scoring_func", "sigmoid"),
      norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
      # Official configs predate the key; their checkpoints are interleaved.
      rope_interleaved=bool(hf.get("rope_interleave", True)),
      max_seq_len=hf["max_position_embeddings"], rms_norm_eps=float(hf["rms_norm_eps"]),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      mtp_depth=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
      **rope)
  fields.update(overrides)
  return ModelConfig(**fields)


def _dense_from_hf(hf: dict, model_type: str, overrides: dict) -> ModelConfig:
  """Qwen2 (q/k/v biases always) or Llama (no biases) as a dense GQA config."""
  problems = []
  if hf.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={hf['hidden_act']!r} (only silu)")
  if model_type == "llama" and hf.get("attention_bias"):
    problems.append("attention_bias=True (Llama's o_proj bias is not supported)")
  if hf.get("mlp_bias"):
    problems.append("mlp_bias=True is not supported")
  if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
    problems.append("sliding-window attention is not supported")
  rope = _rope_fields(hf, problems, ("default", "llama3", "yarn"))
  if problems:
    raise ValueError(f"unsupported {model_type} config: " + "; ".join(problems))
  heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"], n_heads=heads,
      n_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      qkv_bias=model_type == "qwen2", d_ff=hf["intermediate_size"],
      max_seq_len=hf["max_position_embeddings"], rms_norm_eps=float(hf["rms_norm_eps"]),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **rope)
  fields.update(overrides)
  return ModelConfig.dense_gqa(**fields)


def config_to_hf(cfg: ModelConfig, *, torch_dtype: str = "bfloat16") -> dict:
  """A config.json dict in the released spelling (`rope_theta`, `rope_scaling`),
  which transformers 4 and 5, vLLM and SGLang all read."""
  if cfg.attention_kind == "gqa":
    return _dense_to_hf(cfg, torch_dtype)
  rope_scaling = None
  if cfg.use_yarn:
    rope_scaling = dict(type="yarn", factor=cfg.rope_factor,
                        original_max_position_embeddings=cfg.original_max_position,
                        beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow,
                        mscale=cfg.mscale, mscale_all_dim=cfg.mscale_all_dim)
  return dict(
      architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      num_hidden_layers=cfg.n_layers, first_k_dense_replace=cfg.n_dense_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
      q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
      qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
      v_head_dim=cfg.v_head_dim, intermediate_size=cfg.d_ff,
      moe_intermediate_size=cfg.moe_d_ff, n_routed_experts=cfg.n_routed_experts,
      n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.n_activated_experts,
      n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
      routed_scaling_factor=cfg.route_scale, scoring_func=cfg.score_func,
      topk_method="noaux_tc", norm_topk_prob=cfg.norm_topk_prob, moe_layer_freq=1,
      hidden_act="silu", attention_bias=False, rms_norm_eps=cfg.rms_norm_eps,
      rope_theta=cfg.rope_theta, rope_scaling=rope_scaling,
      rope_interleave=cfg.rope_interleaved, max_position_embeddings=cfg.max_seq_len,
      tie_word_embeddings=cfg.tie_embeddings, num_nextn_predict_layers=cfg.mtp_depth,
      torch_dtype=torch_dtype)


def _rope_scaling(cfg: ModelConfig) -> dict | None:
  if cfg.use_llama3_rope:
    return dict(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.low_freq_factor,
                high_freq_factor=cfg.high_freq_factor,
                original_max_position_embeddings=cfg.original_max_position)
  if cfg.use_yarn:
    return dict(rope_type="yarn", factor=cfg.rope_factor,
                original_max_position_embeddings=cfg.original_max_position,
                beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale,
                mscale_all_dim=cfg.mscale_all_dim)
  return None


def _dense_to_hf(cfg: ModelConfig, torch_dtype: str) -> dict:
  problems = []
  if cfg.n_moe_layers or cfg.mtp_depth:
    problems.append("MoE layers or MTP (Qwen2/Llama are dense)")
  if cfg.rope_interleaved:
    problems.append("rope_interleaved=True (Qwen2/Llama checkpoints rotate halves)")
  if problems:
    raise ValueError("a GQA config exports as Qwen2/Llama only without " + "; ".join(problems))
  model_type = "qwen2" if cfg.qkv_bias else "llama"
  out = dict(
      architectures=[_DENSE_TYPES[model_type]], model_type=model_type,
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, intermediate_size=cfg.d_ff, hidden_act="silu",
      rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
      rope_scaling=_rope_scaling(cfg), max_position_embeddings=cfg.max_seq_len,
      tie_word_embeddings=cfg.tie_embeddings, torch_dtype=torch_dtype)
  if model_type == "qwen2":
    out.update(use_sliding_window=False)
  else:
    out.update(attention_bias=False, mlp_bias=False)
  return out
