"""Countdown R1-Zero (experiments/r1_zero/countdown_tiny.py) over run seeds.

Arms: r1_zero, the experiment as it is; t06, its GRPO rollouts sampled at T 0.6
(the eval stages' temperature) instead of 1.0: does searching pay when fewer of
its steps are sampled wrongly? With `--seeds=3` the sweep reports rollout
accuracy and response length before and after GRPO, and the eval stages'
pass@1, cons@8, pass@8, reflective words and response length, as mean ± std
over seeds (the README's "aha moment" row; each seed's metrics.jsonl holds the
per-step curves).

Measured (experiments/results/countdown/): in both arms RL drops the searches
(reflective words per rollout 0.72 → 0.01 at T 1.0, 0.59 → 0.02 at T 0.6) and
answers at once; eval pass@1 0.076 → 0.122 and 0.125, pass@8 0.302 → 0.182
and 0.167.

  python -m r1jax.tools.sweep --ablation=experiments/ablations/countdown.py \
      --workdir=/tmp/abl --seeds=3
"""

from r1jax import configs

VARIANTS = ("r1_zero", "t06")
# Beyond pass@1 and cons@8: the eval stages' pass@8, reflective words per
# response (the "aha" count) and response length, before (eval_base) and after (eval).
METRICS = ("held_out/pass@8", "held_out/reflective_words", "held_out/response_len")


def _apply(c, variant):
  if variant == "t06":  # rollouts at the eval stages' temperature instead of 1.0
    c.stages.grpo.grpo.temperature = 0.6


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply, base="r1_zero/countdown_tiny.py")
