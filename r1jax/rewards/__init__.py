"""Rule-based rewards (DeepSeek-R1 section 2.2.2): no neural reward model.

Every reward is `fn(completion: str, example: Mapping, **options) -> float`;
`REWARDS` maps config names to them and `BOUNDS` to their ranges, `RewardSpec`
combines them with weights, `RewardEvaluator` runs a batch in a killable
worker pool (a failed call scores its term's worst value).
"""

from r1jax.rewards.accuracy import accuracy, extract_answers, is_equivalent
from r1jax.rewards.code import code, extract_code, run_tests
from r1jax.rewards.combine import (BOUNDS, REWARDS, RewardEvaluator, RewardSpec, RewardTerm,
                                   make_reward_fn)
from r1jax.rewards.format import format_checks, format_reward
from r1jax.rewards.language import language, script_counts
from r1jax.rewards.preference import preference
from r1jax.rewards.sandbox import SandboxInfo, SandboxLimits, sandbox_info
from r1jax.rewards.shaping import cosine_accuracy, dapo_overlong, overlong, repetition

__all__ = [
    "BOUNDS", "REWARDS", "RewardEvaluator", "RewardSpec", "RewardTerm", "SandboxInfo",
    "SandboxLimits", "accuracy", "code", "cosine_accuracy", "dapo_overlong",
    "extract_answers", "extract_code", "format_checks", "format_reward",
    "is_equivalent", "language", "make_reward_fn", "overlong", "preference", "repetition",
    "run_tests", "sandbox_info", "script_counts",
]
