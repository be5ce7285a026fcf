"""Ablation: R1's language-consistency reward (R1 §2.3.2), on or off.

R1 adds the share of the chain of thought written in the prompt's language to
the accuracy reward; the paper reports that it costs a little accuracy and buys
readability. A quarter of the task's problems are posed in Chinese. Arms:
without (accuracy + format, the main job's), with (+ 0.5 × language).
Both arms report held-out `language_after` (the mean consistency score).

  python -m r1jax.tools.sweep --ablation=experiments/ablations/language_reward.py --workdir=/tmp/abl
"""

from r1jax import configs

VARIANTS = ("without", "with")


def _apply(c, variant):
  if variant == "with":
    c.stages.grpo.rewards = (("accuracy", 1.0), ("format", 0.5), ("language", 0.5))


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply)
