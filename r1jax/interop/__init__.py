"""Checkpoint interop with other ecosystems (Hugging Face safetensors)."""

from r1jax.interop import hf

__all__ = ["hf"]
