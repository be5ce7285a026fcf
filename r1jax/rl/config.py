"""GRPO's settings (`GRPOConfig`), checked when built; r1jax/rl/step.py runs them."""

from __future__ import annotations

import dataclasses
from typing import Any

from r1jax.rl import grpo


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO's settings; defaults are DeepSeek-R1-Zero's (R1 Nature version, Methods).

  Units. A rollout (a GRPOStep call; the stage's `steps`, `RLState.step`)
  samples batch_size = prompts_per_step × group_size completions and trains on
  them with updates_per_step = n_minibatches × num_iterations updates. An
  update (`optim.total_steps` and `warmup_steps`, `ref_reset_every`) is one
  optimizer step on batch_size / n_minibatches completions, its gradient summed
  over `micro_batches` chunks. So optim.total_steps = steps × updates_per_step
  (`r1jax.configs.check_stage` checks it). R1-Zero: rollouts of 512 questions
  × 16, 16 minibatches of 32 questions, one pass; the paper's "10,400 steps"
  are updates (650 rollouts), its "32 questions per step" per update.

  rollout_slice: completions per decode call (0 = the whole rollout at once).
  The latent cache is sized per slice, so it bounds rollout memory; the tokens
  do not depend on it (a row's key is its global index; only float rounding of
  the logits changes with the batch shape, ~1e-6 in f32). It must divide the
  rollout's batch_size (one compiled shape) and, on a mesh, be a multiple of
  the data-parallel devices (each slice is a global batch split over them, as
  the whole rollout is). A slice may cut a group: rewards and advantages are
  computed once all slices are in.
  """
  # Sampling. R1-Zero: G = 16, temperature 1, max length 32,768.
  group_size: int = 16
  prompts_per_step: int = 512
  max_prompt_len: int = 1024  # P, the prompt bucket (one compilation)
  max_new_tokens: int = 32768
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  rollout_slice: int = 0  # completions per decode call; 0 = all (see above)
  # Updates. R1-Zero: one pass (μ = 1) over 16 minibatches; each update may sum
  # the gradients of micro_batches chunks of its minibatch (memory, not maths).
  num_iterations: int = 1
  n_minibatches: int = 16
  micro_batches: int = 1
  # The loss (r1jax/rl/grpo.py). R1-Zero: β = 0.001 with k3; DAPO: ε 0.2/0.28,
  # β = 0, "token-mean"; Dr. GRPO: "seq-mean-token-sum-norm", scale "none".
  # R1's first RL stage used ε = 10. β = 0 keeps no reference model (and logs no KL).
  eps_low: float = 0.2
  eps_high: float = 0.2
  beta: float = 0.001
  kl_estimator: str = "k3"
  aggregation: str = "seq-mean-token-mean"
  max_len: int | None = None  # Dr. GRPO's constant; None = max_new_tokens
  advantage_scale: str = "group"
  advantage_eps: float = 1e-6
  # DAPO dynamic sampling: drop groups whose rewards are all equal and refill
  # from up to max_retries further rollouts of fresh prompts.
  dynamic_sampling: bool = False
  max_retries: int = 4
  # DAPO overlong filtering: completions cut at max_new_tokens get no loss.
  mask_truncated: bool = False
  # R1: the reference is reset to the policy every 400 updates; 0 = never. Counted
  # in updates, and a multiple of updates_per_step: resets happen between rollouts.
  ref_reset_every: int = 400
  # Truncated importance sampling cap (Yao et al. suggest 2); 0 = off.
  tis_cap: float = 0.0

  def __post_init__(self):
    grpo._check_name("KL estimator", self.kl_estimator, grpo.KL_ESTIMATORS)
    grpo._check_name("aggregation", self.aggregation, grpo.AGGREGATIONS)
    grpo._check_name("advantage scale", self.advantage_scale, grpo.ADVANTAGE_SCALES)
    problems = []
    if self.group_size < 2:
      problems.append(f"group_size={self.group_size} must be >= 2 (advantages compare "
                      "completions of one prompt)")
    for name in ("prompts_per_step", "max_prompt_len", "max_new_tokens", "num_iterations",
                 "n_minibatches", "micro_batches"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1")
    B = self.prompts_per_step * self.group_size
    if B % max(self.n_minibatches, 1):
      problems.append(f"n_minibatches={self.n_minibatches} must divide the "
                      f"{B} completions per step")
    elif (B // max(self.n_minibatches, 1)) % max(self.micro_batches, 1):
      problems.append(f"micro_batches={self.micro_batches} must divide the minibatch of "
                      f"{B // max(self.n_minibatches, 1)} completions")
    if self.rollout_slice < 0 or (self.rollout_slice and B % self.rollout_slice):
      problems.append(f"rollout_slice={self.rollout_slice} must divide the {B} completions "
                      "per rollout (prompts_per_step × group_size), or be 0 for all at once")
    updates = max(self.num_iterations, 1) * max(self.n_minibatches, 1)
    if self.ref_reset_every > 0 and self.ref_reset_every % updates:
      problems.append(f"ref_reset_every={self.ref_reset_every} counts updates and must be a "
                      f"multiple of the {updates} updates per rollout (n_minibatches × "
                      "num_iterations): the reference can only be reset between rollouts")
    if self.temperature <= 0:
      problems.append(f"temperature={self.temperature} must be > 0: greedy sampling makes "
                      "a group's completions identical, so every advantage is 0")
    if min(self.eps_low, self.eps_high, self.beta, self.tis_cap) < 0:
      problems.append("eps_low, eps_high, beta and tis_cap must be >= 0")
    if self.max_retries < 0 or self.ref_reset_every < 0:
      problems.append("max_retries and ref_reset_every must be >= 0")
    if self.max_len is not None and self.max_len < 1:
      problems.append("max_len must be >= 1 (or None for max_new_tokens)")
    if problems:
      raise ValueError("Invalid GRPOConfig: " + "; ".join(problems))

  @property
  def batch_size(self) -> int:
    return self.prompts_per_step * self.group_size

  @property
  def minibatch_size(self) -> int:
    return self.batch_size // self.n_minibatches

  @property
  def updates_per_step(self) -> int:
    """Optimizer updates per rollout: the unit of optim.total_steps and ref_reset_every."""
    return self.num_iterations * self.n_minibatches

  @property
  def slice_size(self) -> int:
    """Completions per decode call."""
    return self.rollout_slice or self.batch_size

  def check_data_parallel(self, n_dp: int, key_prefix: str = "") -> None:
    """Errors unless the minibatch, its micro-batches and the rollout slice each split
    evenly over `n_dp` data-parallel devices (`key_prefix` names the settings)."""
    mb, micro = self.minibatch_size, self.micro_batches
    if mb % n_dp:
      raise ValueError(f"the minibatch of {mb} completions is not divisible by the {n_dp} "
                       "data-parallel devices; change prompts_per_step, group_size or "
                       "n_minibatches")
    if (mb // micro) % n_dp:
      raise ValueError(f"{key_prefix}micro_batches={micro} leaves {mb // micro} completions "
                       f"per micro-batch, not divisible by the {n_dp} data-parallel devices")
    if self.slice_size % n_dp:
      raise ValueError(f"{key_prefix}rollout_slice={self.rollout_slice} is not a multiple of "
                       f"the {n_dp} data-parallel devices")

  def loss_options(self) -> tuple[tuple[str, Any], ...]:
    """make_loss_fn's keyword arguments, hashable (the jitted programs' cache key)."""
    return (("temperature", self.temperature),
            ("eps_low", self.eps_low), ("eps_high", self.eps_high), ("beta", self.beta),
            ("kl_estimator", self.kl_estimator), ("aggregation", self.aggregation),
            ("max_len", self.max_len or self.max_new_tokens), ("tis_cap", self.tis_cap))
