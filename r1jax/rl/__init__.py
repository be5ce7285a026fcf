"""Reinforcement learning: the rollout sampler (GRPO's loss and step come later)."""

from r1jax.rl.rollout import (Rollout, SamplingConfig, generate, left_pad, rollout, sample,
                              select_tokens)

__all__ = ["Rollout", "SamplingConfig", "generate", "left_pad", "rollout", "sample",
           "select_tokens"]
