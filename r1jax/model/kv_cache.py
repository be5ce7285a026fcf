"""The decode cache. MLA: per layer only the latent c_kv and the shared rotary
key, B × S × (kv_lora_rank + qk_rope_head_dim) × n_layers × dtype bytes, no
per-head key or value. GQA: per layer the rotated keys and the values of the
n_kv_heads heads, B × S × 2 × n_kv_heads × head_dim × n_layers × dtype bytes.

Glossary: L layers in a stack, B batch, S slots, C kv_lora_rank, R rope dims,
G kv heads, K head_dim.
"""

from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp

from r1jax.model.config import ModelConfig


@flax.struct.dataclass
class LatentCache:
  """The cache of `Transformer.decode` (named for MLA; GQA configs hold k/v in it).
  Each entry's axis 2 is the slot axis."""
  # stack name ("dense_layers" / "moe_layers") -> MLA: (c_kv [L,B,S,C], k_pe [L,B,S,R]);
  # GQA: (k [L,B,S,G,K], v [L,B,S,G,K])
  layers: dict

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None) -> "LatentCache":
    dtype = jnp.dtype(dtype or cfg.dtype)
    layers = {}
    for name, n in (("dense_layers", cfg.n_dense_layers), ("moe_layers", cfg.n_moe_layers)):
      if n:
        layers[name] = tuple(jnp.zeros((n, batch, slots) + shape, dtype)
                             for shape in entry_shapes(cfg))
    return cls(layers)

  @property
  def nbytes(self) -> int:
    return sum(a.size * a.dtype.itemsize for pair in self.layers.values() for a in pair)


def entry_shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
  """Per layer and token, the shapes of the cached arrays."""
  if cfg.attention_kind == "gqa":
    return (cfg.n_kv_heads, cfg.head_dim), (cfg.n_kv_heads, cfg.head_dim)
  return (cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)


def cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> dict:
  """Cache bytes per token over all layers. "cache": what the decode cache holds
  (MLA's latent, or GQA's kv-head K and V); "naive": per-head K and V for every
  query head (multi-head attention); "ratio" = naive / cache. MLA configs also
  report "cache" as "latent"."""
  held = cfg.n_layers * sum(math.prod(s) for s in entry_shapes(cfg)) * dtype_bytes
  naive = cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.value_head_dim) * dtype_bytes
  out = {"cache": held, "naive": naive, "ratio": naive / held}
  if cfg.attention_kind == "mla":
    out["latent"] = held
  return out
