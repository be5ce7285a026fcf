"""Countdown R1-Zero (experiments/r1_zero/countdown_tiny.py) over run seeds.

One arm, the experiment as it is: with `--seeds=3` the sweep reports rollout
accuracy and response length before and after GRPO, and the eval stages'
pass@1, cons@8, pass@8, reflective words and response length, as mean ± std
over seeds (the README's "aha moment" row; each seed's metrics.jsonl holds the
per-step curves).

  python -m r1jax.tools.sweep --ablation=experiments/ablations/countdown.py \
      --workdir=/tmp/abl --seeds=3
"""

from r1jax import configs

VARIANTS = ("r1_zero",)
# Beyond pass@1 and cons@8: the eval stages' pass@8, reflective words per
# response (the "aha" count) and response length, before (eval_base) and after (eval).
METRICS = ("held_out/pass@8", "held_out/reflective_words", "held_out/response_len")


def _apply(c, variant):
  del c, variant  # the experiment as it is


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply, base="r1_zero/countdown_tiny.py")
