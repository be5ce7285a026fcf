"""Reinforcement learning: the latent-cache sampler, GRPO's pure loss, and the RL step."""

from r1jax.rl.rollout import (Rollout, SamplingConfig, generate, left_pad, rollout, sample,
                              select_tokens)

__all__ = ["Rollout", "SamplingConfig", "generate", "left_pad", "rollout", "sample",
           "select_tokens"]
