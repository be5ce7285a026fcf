"""Ablation: the GRPO group size G at a fixed 128 completions per step.

G=16 in R1-Zero; a larger group gives each prompt a finer baseline, a smaller
one spreads the same samples over more prompts. Arms: G2, G4, G8 (the main
job's), G16. One arm:

  python -m r1jax.main --config=experiments/ablations/group_size.py:G4 --workdir=/tmp/abl/G4
The sweep (every arm in turn, sharing the pretrained base; compare in results.ipynb):
  python -m r1jax.tools.sweep --ablation=experiments/ablations/group_size.py --workdir=/tmp/abl
"""

from r1jax import configs

VARIANTS = ("G8", "G2", "G4", "G16")
COMPLETIONS_PER_STEP = 128


def _apply(c, variant):
  g = int(variant[1:])
  c.stages.grpo.grpo.update(dict(group_size=g, prompts_per_step=COMPLETIONS_PER_STEP // g))


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply)
