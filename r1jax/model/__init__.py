"""DeepSeek-V3 in Flax (MLA + DeepSeekMoE + MTP), and the dense GQA students (Qwen2, Llama-3)."""

from r1jax.model.config import ModelConfig
from r1jax.model.kv_cache import LatentCache, cache_bytes_per_token
from r1jax.model.params import abstract_params, init_params, logical_axes, param_counts
from r1jax.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "LatentCache", "cache_bytes_per_token",
           "init_params", "abstract_params", "logical_axes", "param_counts"]
