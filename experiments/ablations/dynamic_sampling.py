"""Ablation: DAPO's dynamic sampling.

Groups whose completions all get the same reward have zero advantage and add
nothing but length to the batch; with dynamic sampling they are dropped and
replaced from further rollouts of fresh prompts (up to `max_retries`). Arms:
off (the main job's), on. Compare `dynamic/rounds`, `zero_adv_group_frac` and
held-out accuracy.

  python -m r1jax.tools.sweep --ablation=experiments/ablations/dynamic_sampling.py --workdir=/tmp/abl
"""

from r1jax import configs

VARIANTS = ("off", "on")


def _apply(c, variant):
  # "off" is the main job as it is, so a sweep can reuse its GRPO stage per seed.
  if variant == "on":
    c.stages.grpo.grpo.update(dict(dynamic_sampling=True, max_retries=2))


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply)
