"""The Hugging Face name table: one `Slot` per checkpoint tensor.

`slot_table(cfg)` names every tensor of a DeepSeek-V3, Qwen2 or Llama
checkpoint for `cfg` and says which r1jax leaf (and which layer / expert
position in it) holds it, in which layout; hf.py loads and saves through it,
hf_stream.py reads blocks through `Slot.read`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from r1jax.model.config import ModelConfig



def flat_span(dims: tuple[int, ...], block: Sequence[tuple[int, int]]
              ) -> tuple[slice, np.ndarray | None]:
  """In the row-major flattening of `dims`: the span holding `block`, and the
  block's offsets in that span (None when the block fills it)."""
  first = int(np.ravel_multi_index([a for a, _ in block], dims))
  last = int(np.ravel_multi_index([b - 1 for _, b in block], dims))
  if math.prod(b - a for a, b in block) == last + 1 - first:
    return slice(first, last + 1), None
  grid = np.ix_(*[np.arange(a, b) for a, b in block])
  return slice(first, last + 1), np.ravel_multi_index(grid, dims).ravel() - first


FLAT = -1


@dataclasses.dataclass(frozen=True)
class Slot:
  path: tuple[str, ...]  # the r1jax leaf
  index: tuple[int, ...]  # position along the leaf's stacked axes (layer, expert)
  shape: tuple[int, ...]  # the slice's r1jax shape
  # 0: stored as is; k > 0: a kernel whose first k dims are inputs; FLAT: a
  # vector stored flat and split into `shape` here (the q/k/v biases [heads, dim])
  n_in: int

  def hf_shape(self) -> tuple[int, ...]:
    if self.n_in == FLAT:
      return (math.prod(self.shape),)
    if not self.n_in:
      return self.shape
    return (math.prod(self.shape[self.n_in:]), math.prod(self.shape[:self.n_in]))

  def read(self, tensor: Any, block: Sequence[tuple[int, int]]) -> np.ndarray:
    """The r1jax `block` of this slot ([start, stop) per axis of `shape`), from
    `tensor` (a safetensors slice or an array of hf_shape()), reading only
    the rows and columns that hold it."""
    if self.n_in == FLAT:
      span, pick = flat_span(self.shape, block)
      w = tensor[span]
      return (w if pick is None else w[pick]).reshape([b - a for a, b in block])
    if not self.n_in:
      return tensor[tuple(slice(a, b) for a, b in block)]
    k = self.n_in
    rows, row_pick = flat_span(self.shape[k:], block[k:])
    cols, col_pick = flat_span(self.shape[:k], block[:k])
    w = tensor[rows, cols]  # [out, in]
    if row_pick is not None:
      w = w[row_pick]
    if col_pick is not None:
      w = w[:, col_pick]
    return w.T.reshape([b - a for a, b in block])

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.n_in == FLAT:
      return np.ascontiguousarray(x.reshape(-1))
    if not self.n_in:
      return x
    return np.ascontiguousarray(x.reshape(self.hf_shape()[::-1]).T)


# (r1jax sub-path, HF name under model.layers.N., slice shape, n_in, per expert)
BlockLeaf = tuple[tuple[str, ...], str, tuple[int, ...], int, bool]


def _gqa_leaves(cfg: ModelConfig) -> list[BlockLeaf]:
  """Grouped-query attention (Qwen2, Llama): q/k/v/o projections, q/k/v biases."""
  D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  a = "self_attn."
  leaves = []
  for sub, name, heads in (("wq", "q_proj", H), ("wk", "k_proj", G), ("wv", "v_proj", G)):
    leaves.append((("attn", sub, "kernel"), f"{a}{name}.weight", (D, heads, K), 1, False))
    if cfg.qkv_bias:
      leaves.append((("attn", sub, "bias"), f"{a}{name}.bias", (heads, K), FLAT, False))
  return leaves + [(("attn", "wo", "kernel"), a + "o_proj.weight", (H, K, D), 2, False)]


def _mla_leaves(cfg: ModelConfig) -> list[BlockLeaf]:
  D, H = cfg.d_model, cfg.n_heads
  K, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  leaves = []
  a = "self_attn."
  if cfg.q_lora_rank:
    Q = cfg.q_lora_rank
    leaves += [(("attn", "wq_a", "kernel"), a + "q_a_proj.weight", (D, Q), 1, False),
               (("attn", "q_norm", "scale"), a + "q_a_layernorm.weight", (Q,), 0, False),
               (("attn", "wq_b", "kernel"), a + "q_b_proj.weight", (Q, H, K + R), 1, False)]
  else:
    leaves.append((("attn", "wq", "kernel"), a + "q_proj.weight", (D, H, K + R), 1, False))
  leaves += [(("attn", "wkv_a", "kernel"), a + "kv_a_proj_with_mqa.weight", (D, C + R), 1, False),
             (("attn", "kv_norm", "scale"), a + "kv_a_layernorm.weight", (C,), 0, False),
             (("attn", "wkv_b", "kernel"), a + "kv_b_proj.weight", (C, H, K + V), 1, False),
             (("attn", "wo", "kernel"), a + "o_proj.weight", (H, V, D), 2, False)]
  return leaves


def _block_leaves(cfg: ModelConfig, moe: bool) -> list[BlockLeaf]:
  """The leaves of one block (dense or MoE) and their checkpoint names."""
  D = cfg.d_model
  leaves = [(("attn_norm", "scale"), "input_layernorm.weight", (D,), 0, False),
            (("mlp_norm", "scale"), "post_attention_layernorm.weight", (D,), 0, False)]
  leaves += _gqa_leaves(cfg) if cfg.attention_kind == "gqa" else _mla_leaves(cfg)
  if not moe:
    F = cfg.d_ff
    return leaves + [(("mlp", "wi_gate", "kernel"), "mlp.gate_proj.weight", (D, F), 1, False),
                     (("mlp", "wi_up", "kernel"), "mlp.up_proj.weight", (D, F), 1, False),
                     (("mlp", "wo", "kernel"), "mlp.down_proj.weight", (F, D), 1, False)]
  E, F = cfg.n_routed_experts, cfg.moe_d_ff
  leaves += [(("moe", "router", "kernel"), "mlp.gate.weight", (D, E), 1, False),
             (("moe", "router", "bias"), "mlp.gate.e_score_correction_bias", (E,), 0, False),
             (("moe", "experts", "wi_gate"), "mlp.experts.{e}.gate_proj.weight", (D, F), 1, True),
             (("moe", "experts", "wi_up"), "mlp.experts.{e}.up_proj.weight", (D, F), 1, True),
             (("moe", "experts", "wo"), "mlp.experts.{e}.down_proj.weight", (F, D), 1, True)]
  if cfg.n_shared_experts:
    Fs, s = cfg.n_shared_experts * F, "mlp.shared_experts."
    leaves += [(("moe", "shared", "wi_gate", "kernel"), s + "gate_proj.weight", (D, Fs), 1, False),
               (("moe", "shared", "wi_up", "kernel"), s + "up_proj.weight", (D, Fs), 1, False),
               (("moe", "shared", "wo", "kernel"), s + "down_proj.weight", (Fs, D), 1, False)]
  return leaves


def _block_slots(cfg: ModelConfig, moe: bool, prefix: str, root: tuple[str, ...],
                 layer: tuple[int, ...]) -> dict[str, Slot]:
  slots = {}
  for sub, name, shape, n_in, per_expert in _block_leaves(cfg, moe):
    experts = range(cfg.n_routed_experts) if per_expert else [None]
    for e in experts:
      index = layer + (() if e is None else (e,))
      slots[prefix + name.format(e=e)] = Slot(root + sub, index, shape, n_in)
  return slots


def copy_slots(cfg: ModelConfig, slots: dict[str, Slot], k: int) -> dict[str, Slot]:
  """MTP layer k's copies of the embedding and output head (r1jax shares the main ones)."""
  p = f"model.layers.{cfg.n_layers + k}."
  embed = slots["model.embed_tokens.weight"]
  return {p + "embed_tokens.weight": embed,
          p + "shared_head.head.weight": slots.get("lm_head.weight", embed)}


def slot_table(cfg: ModelConfig) -> dict[str, Slot]:
  """Every checkpoint tensor of `cfg` (MTP copies of shared tensors excepted)."""
  D, V = cfg.d_model, cfg.vocab_size
  slots = {"model.embed_tokens.weight": Slot(("embed", "embedding"), (), (V, D), 0),
           "model.norm.weight": Slot(("final_norm", "scale"), (), (D,), 0)}
  if not cfg.tie_embeddings:
    slots["lm_head.weight"] = Slot(("lm_head", "kernel"), (), (D, V), 1)
  for i in range(cfg.n_layers):
    moe = i >= cfg.n_dense_layers
    root, layer = (("moe_layers",), (i - cfg.n_dense_layers,)) if moe else (("dense_layers",), (i,))
    slots.update(_block_slots(cfg, moe, f"model.layers.{i}.", root, layer))
  for k in range(cfg.mtp_depth):
    p, root = f"model.layers.{cfg.n_layers + k}.", (f"mtp_{k}",)
    slots.update({p + "enorm.weight": Slot(root + ("enorm", "scale"), (), (D,), 0),
                  p + "hnorm.weight": Slot(root + ("hnorm", "scale"), (), (D,), 0),
                  p + "eh_proj.weight": Slot(root + ("eh_proj", "kernel"), (), (2 * D, D), 1),
                  p + "shared_head.norm.weight": Slot(root + ("norm", "scale"), (), (D,), 0)})
    slots.update(_block_slots(cfg, cfg.n_moe_layers > 0, p, root + ("block",), ()))
  return slots


def leaf_shapes(slots: dict[str, Slot]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Full leaf shapes: stacked axes (layer, expert) in front of the slice shape."""
  counts: dict[tuple[str, ...], tuple[int, ...]] = {}
  shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
  for s in slots.values():
    top = counts.get(s.path, (0,) * len(s.index))
    counts[s.path] = tuple(max(a, b + 1) for a, b in zip(top, s.index))
    shapes[s.path] = s.shape
  return {p: counts[p] + shapes[p] for p in shapes}
