"""Ablation: how the per-token loss is averaged (r1jax/rl/grpo.py).

grpo: each completion's token mean, then the mean over completions (the paper's
  formula; long completions weigh less per token);
dapo: every token of the batch weighs the same (DAPO's token-level loss);
dr_grpo: token sums over a constant (the max length) and advantages not divided
  by the group's std (Dr. GRPO removes both length and difficulty biases).

  python -m r1jax.tools.sweep --ablation=experiments/ablations/aggregation.py --workdir=/tmp/abl
"""

from r1jax import configs

VARIANTS = ("grpo", "dapo", "dr_grpo")
_SETTINGS = {
    "grpo": dict(aggregation="seq-mean-token-mean", advantage_scale="group"),
    "dapo": dict(aggregation="token-mean", advantage_scale="group"),
    "dr_grpo": dict(aggregation="seq-mean-token-sum-norm", advantage_scale="none"),
}


def _apply(c, variant):
  c.stages.grpo.grpo.update(_SETTINGS[variant])


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply)
