"""Reinforcement learning: the latent-cache sampler, GRPO's pure loss, and the RL step.

`r1jax.rl.rollout` is the sampler's module (so `r1jax.rl.rollout.sample(cfg, params, …)`
works as a path); its main entry points are re-exported here too.
"""

from r1jax.rl import rollout
from r1jax.rl.rollout import Rollout, SamplingConfig, generate, left_pad, sample, select_tokens

__all__ = ["rollout", "Rollout", "SamplingConfig", "generate", "left_pad", "sample",
           "select_tokens"]
