"""The model's typed configuration: DeepSeek-V3's own fields, frozen.

Field names follow DeepSeek-V3's official inference config; the 671B values are
in `ModelConfig.deepseek_v3_671b()`. The same dataclass describes the dense GQA
students R1 distils into (Qwen2.5, Llama-3): `attention_kind="gqa"` with every
layer dense (`n_dense_layers == n_layers`); the MLA and MoE fields are then
unused and the presets set them to zero. Modules receive this dataclass, never
the experiment's ConfigDict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 129280
  d_model: int = 7168
  n_layers: int = 61
  n_dense_layers: int = 3
  n_heads: int = 128
  # "mla": Multi-head Latent Attention (r1jax/model/mla.py); "gqa": grouped-query
  # attention with n_kv_heads key/value heads of head_dim (r1jax/model/gqa.py),
  # bias on the q/k/v projections when qkv_bias (Qwen2), none on the output.
  attention_kind: Literal["mla", "gqa"] = "mla"
  n_kv_heads: int = 0
  head_dim: int = 0
  qkv_bias: bool = False
  q_lora_rank: int = 1536  # 0: plain query projection, no compression
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  d_ff: int = 18432  # dense MLP hidden size
  moe_d_ff: int = 2048  # per-expert hidden size
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  n_activated_experts: int = 8
  n_expert_groups: int = 8
  n_limited_groups: int = 4
  route_scale: float = 2.5
  score_func: Literal["sigmoid", "softmax"] = "sigmoid"
  norm_topk_prob: bool = True
  rope_theta: float = 10000.0
  rope_interleaved: bool = True  # official checkpoints rotate adjacent pairs
  # Context extension of the rotary frequencies; rope_factor <= 1 disables it.
  # "yarn" (DeepSeek-V3) uses beta_fast/beta_slow/mscale*, "llama3" (Llama-3.1)
  # low/high_freq_factor; both use rope_factor and original_max_position.
  rope_scaling: Literal["yarn", "llama3"] = "yarn"
  rope_factor: float = 40.0
  original_max_position: int = 4096
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0
  max_seq_len: int = 163840
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  # Multi-token prediction (V3 report §2.2): depth and loss weight λ.
  mtp_depth: int = 1
  mtp_loss_weight: float = 0.3
  # Balancing (V3 report §2.1.2): bias step γ and the sequence-wise loss α.
  bias_update_rate: float = 0.001
  seq_aux_loss_alpha: float = 0.0001
  # MoE execution (results do not depend on these). grouped_matmul is the
  # routed-expert path: "gather" (per-token weights; decode), "dense" (all
  # experts, no dispatch), "sorted" (XLA:CPU loops over each expert's blocks of
  # ≤ gmm_block_size rows), "blocked" (same blocks, batched over weight copies),
  # "ragged_dot" (GPU/TPU); "auto" = moe.moe_impl by token count and backend.
  # Expert parallelism runs when an ambient mesh (`jax.set_mesh`) has an
  # expert axis > 1; ep_exchange: "all_to_all" (fixed
  # capacity, any backend), "ragged_all_to_all" (GPU/TPU), "auto" by backend;
  # ep_capacity_factor 0 = worst-case buffers, > 0 = balanced-load buffers with
  # a dropless worst-case fallback (see r1jax/parallel/expert_parallel.py);
  # ep_chunk_tokens > 0 exchanges each device's tokens in chunks of that many,
  # one after another, so the exchange buffers (worst case: expert-axis × chunk
  # received rows) do not grow with the sequence.
  grouped_matmul: Literal["auto", "gather", "dense", "sorted", "blocked", "ragged_dot"] = "auto"
  gmm_block_size: int = 128
  ep_exchange: Literal["auto", "all_to_all", "ragged_all_to_all"] = "auto"
  ep_capacity_factor: float = 0.0
  ep_chunk_tokens: int = 0
  # Attention kernel (results agree to float rounding): "reference" (materialised
  # [B,H,T,S] scores), "blocked" (pure-JAX flash, key/query blocks of
  # attention_block), "cudnn" (GPU), "splash" (TPU), "auto" by backend and
  # shape (r1jax/model/attention.py: choose_attention).
  attention: Literal["auto", "reference", "blocked", "cudnn", "splash"] = "auto"
  attention_block: int = 512
  # Numerics and compilation.
  dtype: str = "float32"  # activations / compute
  param_dtype: str = "float32"
  remat: bool = False
  # Layer stacks: lax.scan's unroll factor for each stack (1 = a rolled loop,
  # the stack's length = straight-line code); 0 = "auto"
  # (transformer.stack_unroll: XLA:CPU unrolls stacks of up to 8 layers, where a
  # rolled loop's per-layer slicing and stacking measured 25% of a train step).
  scan_unroll: int = 0
  # Sequence parallelism (training form, under a mesh whose tensor axis is > 1):
  # between blocks the residual stream is split over `tensor` along the sequence;
  # each sublayer gathers its normed input and scatters its output. Results do
  # not depend on it.
  sequence_parallel: bool = False
  # Sequence positions per output-head chunk in the losses and log-probs: each
  # chunk's [B, logits_chunk, V] float32 logits exist only one at a time
  # (r1jax/model/head.py). Results do not depend on it.
  logits_chunk: int = 1024

  def __post_init__(self):
    problems = []
    if self.n_dense_layers > self.n_layers:
      problems.append(f"n_dense_layers={self.n_dense_layers} > n_layers={self.n_layers}")
    if self.n_routed_experts and self.n_activated_experts > self.n_routed_experts:
      problems.append("n_activated_experts exceeds n_routed_experts")
    if self.n_routed_experts % max(self.n_expert_groups, 1):
      problems.append(
          f"n_routed_experts={self.n_routed_experts} is not divisible by "
          f"n_expert_groups={self.n_expert_groups}")
    if self.n_limited_groups > self.n_expert_groups:
      problems.append("n_limited_groups exceeds n_expert_groups")
    if self.n_expert_groups > 1 and self.n_routed_experts // self.n_expert_groups < 2:
      problems.append("group-limited routing needs at least 2 experts per group "
                      "(a group's score is the sum of its top-2)")
    if self.attention_kind not in ("mla", "gqa"):
      problems.append(f"attention_kind must be 'mla' or 'gqa', got {self.attention_kind!r}")
    if self.attention_kind == "gqa":
      if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
        problems.append(f"gqa needs n_kv_heads >= 1 dividing n_heads={self.n_heads}, "
                        f"got n_kv_heads={self.n_kv_heads}")
      if self.head_dim < 2 or self.head_dim % 2:
        problems.append(f"gqa needs an even head_dim >= 2, got {self.head_dim}")
    if self.rope_scaling not in ("yarn", "llama3"):
      problems.append(f"rope_scaling must be 'yarn' or 'llama3', got {self.rope_scaling!r}")
    if self.rope_scaling == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      problems.append("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    if self.qk_rope_head_dim % 2:
      problems.append("qk_rope_head_dim must be even")
    if self.score_func not in ("sigmoid", "softmax"):
      problems.append(f"score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")
    if self.grouped_matmul not in ("auto", "gather", "dense", "sorted", "blocked", "ragged_dot"):
      problems.append("grouped_matmul must be 'auto', 'gather', 'dense', 'sorted', 'blocked' "
                      f"or 'ragged_dot', got {self.grouped_matmul!r}")
    if self.scan_unroll < 0:
      problems.append(f"scan_unroll must be >= 0 (0: auto), got {self.scan_unroll}")
    if self.gmm_block_size < 1:
      problems.append("gmm_block_size must be >= 1")
    if self.ep_exchange not in ("auto", "all_to_all", "ragged_all_to_all"):
      problems.append(f"ep_exchange must be 'auto', 'all_to_all' or 'ragged_all_to_all', "
                      f"got {self.ep_exchange!r}")
    if self.ep_capacity_factor < 0:
      problems.append("ep_capacity_factor must be >= 0 (0: worst-case buffers)")
    if self.ep_chunk_tokens < 0:
      problems.append("ep_chunk_tokens must be >= 0 (0: all of a device's tokens at once)")
    if self.mtp_depth < 0:
      problems.append("mtp_depth must be >= 0")
    if self.attention not in ("auto", "reference", "blocked", "cudnn", "splash"):
      problems.append(f"attention must be 'auto', 'reference', 'blocked', 'cudnn' "
                      f"or 'splash', got {self.attention!r}")
    if self.attention_block < 1:
      problems.append(f"attention_block must be >= 1, got {self.attention_block}")
    if self.logits_chunk < 1:
      problems.append(f"logits_chunk must be >= 1, got {self.logits_chunk}")
    if problems:
      raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

  # Derived sizes.
  @property
  def qk_head_dim(self) -> int:
    """Query/key dims per head that enter a score."""
    if self.attention_kind == "gqa":
      return self.head_dim
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def value_head_dim(self) -> int:
    return self.head_dim if self.attention_kind == "gqa" else self.v_head_dim

  @property
  def rope_dim(self) -> int:
    """Dims per head that RoPE rotates: MLA's rope part, all of a GQA head."""
    return self.head_dim if self.attention_kind == "gqa" else self.qk_rope_head_dim

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  @property
  def use_yarn(self) -> bool:
    return self.rope_scaling == "yarn" and self.rope_factor > 1.0

  @property
  def use_llama3_rope(self) -> bool:
    return self.rope_scaling == "llama3" and self.rope_factor > 1.0

  @property
  def softmax_scale(self) -> float:
    """1/sqrt(qk_head_dim), times mscale² under YaRN when mscale_all_dim is set."""
    scale = self.qk_head_dim ** -0.5
    if self.use_yarn and self.mscale_all_dim:
      m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
      scale *= m * m
    return scale

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # Presets.
  @classmethod
  def deepseek_v3_671b(cls, **overrides) -> "ModelConfig":
    """The official DeepSeek-V3 / R1 configuration (the defaults above)."""
    return cls(dtype="bfloat16", param_dtype="bfloat16", remat=True, **overrides)

  @classmethod
  def tiny(cls, **overrides) -> "ModelConfig":
    """A few-hundred-thousand-parameter model with every V3 feature switched on."""
    fields = dict(
        vocab_size=512, d_model=64, n_layers=3, n_dense_layers=1, n_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, d_ff=128, moe_d_ff=32, n_routed_experts=8,
        n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
        n_limited_groups=2, route_scale=2.5, rope_factor=4.0,
        original_max_position=64, max_seq_len=256, mtp_depth=1)
    fields.update(overrides)
    return cls(**fields)

  # Dense GQA students (R1 §2.4 distils into these). Sizes from each model's
  # released config.json; tests/test_dense.py checks the parameter totals.
  @classmethod
  def dense_gqa(cls, **fields) -> "ModelConfig":
    """A dense GQA model: every layer dense, MLA/MoE/MTP fields zeroed, halves
    RoPE layout (as Hugging Face Qwen2/Llama checkpoints store q and k)."""
    base = dict(
        attention_kind="gqa", q_lora_rank=0, kv_lora_rank=0, qk_nope_head_dim=0,
        qk_rope_head_dim=0, v_head_dim=0, moe_d_ff=0, n_routed_experts=0,
        n_shared_experts=0, n_activated_experts=0, n_expert_groups=1, n_limited_groups=1,
        rope_interleaved=False, rope_factor=1.0, mtp_depth=0, seq_aux_loss_alpha=0.0,
        bias_update_rate=0.0)
    base.update(fields)
    base.setdefault("n_dense_layers", base["n_layers"])
    return cls(**base)

  @classmethod
  def qwen2_5_1_5b(cls, **overrides) -> "ModelConfig":
    """Qwen2.5-1.5B: 28 layers, 12 query / 2 kv heads of 128, q/k/v bias, tied."""
    return cls.dense_gqa(**{**dict(
        vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
        head_dim=128, qkv_bias=True, d_ff=8960, rope_theta=1000000.0,
        max_seq_len=131072, rms_norm_eps=1e-6, tie_embeddings=True,
        dtype="bfloat16", param_dtype="bfloat16", remat=True), **overrides})

  @classmethod
  def qwen2_5_7b(cls, **overrides) -> "ModelConfig":
    """Qwen2.5-7B: 28 layers, 28 query / 4 kv heads of 128, q/k/v bias, untied."""
    return cls.dense_gqa(**{**dict(
        vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
        head_dim=128, qkv_bias=True, d_ff=18944, rope_theta=1000000.0,
        max_seq_len=131072, rms_norm_eps=1e-6, tie_embeddings=False,
        dtype="bfloat16", param_dtype="bfloat16", remat=True), **overrides})

  @classmethod
  def llama3_1_8b(cls, **overrides) -> "ModelConfig":
    """Llama-3.1-8B: 32 layers, 32 query / 8 kv heads of 128, llama3 RoPE scaling."""
    return cls.dense_gqa(**{**dict(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, d_ff=14336, rope_theta=500000.0, rope_scaling="llama3",
        rope_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position=8192, max_seq_len=131072, rms_norm_eps=1e-5,
        dtype="bfloat16", param_dtype="bfloat16", remat=True), **overrides})

  @classmethod
  def tiny_gqa(cls, **overrides) -> "ModelConfig":
    """A tiny Qwen2-shaped model (q/k/v bias, tied, 4 query / 2 kv heads)."""
    return cls.dense_gqa(**{**dict(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        qkv_bias=True, d_ff=128, tie_embeddings=True, max_seq_len=256), **overrides})


def yarn_mscale(factor: float, mscale: float) -> float:
  """YaRN's attention temperature: 0.1·mscale·ln(factor) + 1 (1 when factor ≤ 1)."""
  if factor <= 1.0:
    return 1.0
  return 0.1 * mscale * math.log(factor) + 1.0
