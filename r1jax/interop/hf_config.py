"""DeepSeek-V3 config.json <-> ModelConfig (the mapping `hf.load` and `hf.save` use).

Reads either RoPE spelling (transformers 5 `rope_parameters` or the official
`rope_scaling`) and writes the official one.
"""

from __future__ import annotations

from typing import Any

from r1jax.model.config import ModelConfig


def _rope_dict(hf: dict) -> dict:
  """The RoPE scaling dict, whichever spelling the config uses (transformers 5
  `rope_parameters`, or the official `rope_scaling`)."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if any(isinstance(v, dict) for v in rope.values()):
    raise ValueError("per-layer-type rope_parameters are not a DeepSeek-V3 config")
  return rope


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """A ModelConfig from a Hugging Face DeepSeek-V3 config.json dict.

  `overrides` set r1jax-only fields (dtype, param_dtype, remat, ...)."""
  arch = hf.get("architectures") or []
  if hf.get("model_type") != "deepseek_v3" and "DeepseekV3ForCausalLM" not in arch:
    raise ValueError(f"not a DeepSeek-V3 config (model_type={hf.get('model_type')!r}, "
                     f"architectures={arch}); r1jax maps DeepSeek-V3 checkpoints only")
  if hf.get("quantization_config"):
    raise ValueError("quantised (FP8) checkpoints are not supported: dequantise to bf16 "
                     "first, e.g. with DeepSeek-V3's inference/fp8_cast_bf16.py")
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

  rope = _rope_dict(hf)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  yarn: dict[str, Any] = dict(rope_factor=1.0)
  if rope_type == "yarn":
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
    yarn = dict(rope_factor=float(factor), original_max_position=int(original),
                beta_fast=float(rope.get("beta_fast") or 32.0),
                beta_slow=float(rope.get("beta_slow") or 1.0),
                mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))
  elif rope_type != "default":
    problems.append(f"rope type {rope_type!r} (only default and yarn)")
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
      rope_theta=rope_theta,
      # Official configs predate the key; their checkpoints are interleaved.
      rope_interleaved=bool(hf.get("rope_interleave", True)),
      max_seq_len=hf["max_position_embeddings"], rms_norm_eps=float(hf["rms_norm_eps"]),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      mtp_depth=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
      **yarn)
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, *, torch_dtype: str = "bfloat16") -> dict:
  """A config.json dict in the official DeepSeek-V3 spelling (`rope_scaling`),
  which transformers 4 and 5, vLLM and SGLang all read."""
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
