"""The decode cache: per layer only MLA's latent c_kv and the shared rotary key.

Memory is B × S × (kv_lora_rank + qk_rope_head_dim) × n_layers × dtype bytes;
no per-head key or value is ever stored.

Glossary: L layers in a stack, B batch, S slots, C kv_lora_rank, R rope dims.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

from r1jax.model.config import ModelConfig


@flax.struct.dataclass
class LatentCache:
  # stack name ("dense_layers" / "moe_layers") -> (c_kv [L,B,S,C], k_pe [L,B,S,R])
  layers: dict

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None) -> "LatentCache":
    dtype = jnp.dtype(dtype or cfg.dtype)
    layers = {}
    for name, n in (("dense_layers", cfg.n_dense_layers), ("moe_layers", cfg.n_moe_layers)):
      if n:
        layers[name] = (jnp.zeros((n, batch, slots, cfg.kv_lora_rank), dtype),
                        jnp.zeros((n, batch, slots, cfg.qk_rope_head_dim), dtype))
    return cls(layers)

  @property
  def nbytes(self) -> int:
    return sum(a.size * a.dtype.itemsize for pair in self.layers.values() for a in pair)


def cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> dict:
  """Cache bytes per token over all layers: MLA's latent vs naive per-head K and V."""
  latent = cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
  naive = cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes
  return {"latent": latent, "naive": naive, "ratio": naive / latent}
