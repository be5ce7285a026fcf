"""Ablation: DAPO's clip-higher, a wider upper clip range ε_high than ε_low.

A symmetric ε = 0.2 caps how fast an unlikely token's probability can grow,
which DAPO links to entropy collapse; ε_high = 0.28 lets it grow further.
Arms: sym (0.2/0.2, the main job's), higher (0.2/0.28), much_higher (0.2/0.4).
Watch `entropy` and `clip_frac_high` in each arm's grpo/metrics.jsonl.

  python -m r1jax.tools.sweep --ablation=experiments/ablations/clip_higher.py --workdir=/tmp/abl
"""

from r1jax import configs

VARIANTS = ("sym", "higher", "much_higher")
_EPS_HIGH = {"sym": 0.2, "higher": 0.28, "much_higher": 0.4}


def _apply(c, variant):
  c.stages.grpo.grpo.update(dict(eps_low=0.2, eps_high=_EPS_HIGH[variant]))


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply)
