"""R1's stages, each measured: experiments/r1/tiny.py as a one-arm sweep, for seeds.

r1/tiny.py evaluates after every stage (64 held-out prompts, 64 of the
MATH-500-layout file and the general slice's 64 held-out requests, 8 samples
each at T 0.6): after cold start, after
reasoning RL, after the SFT of the base on rejection samples, and at the end,
after alignment RL. With `--seeds=3` the sweep gives each stage's numbers as
mean ± std over seeds (sweep.json, `r1/seed<k>/<stage>/eval.json`), which is the
README's per-stage table. There is one arm: the comparison is between stages.

  python -m r1jax.tools.sweep --ablation=experiments/ablations/r1_stages.py \
      --workdir=/tmp/abl --seeds=3
(Its base model also reads the general slice, so the main job's pretraining is
not shared.)
"""

from r1jax import configs

VARIANTS = ("r1",)


def _apply(c, variant):
  del c, variant  # r1/tiny.py as it is


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply, base="r1/tiny.py")
