"""Ablation: the KL coefficient β (k3 estimator against the initial policy).

R1-Zero uses β = 0.001; DAPO and Dr. GRPO drop the KL term (β = 0, no
reference model). Arms: b1e-3 (the main job's), b0, b1e-2, b1e-1.

  python -m r1jax.tools.sweep --ablation=experiments/ablations/kl_beta.py --workdir=/tmp/abl
"""

from r1jax import configs

VARIANTS = ("b1e-3", "b0", "b1e-2", "b1e-1")


def _apply(c, variant):
  c.stages.grpo.grpo.beta = float(variant[1:])


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply)
