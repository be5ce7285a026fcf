"""Ablation: R1's language-consistency reward (R1 §2.3.2), on or off, on a base that mixes.

R1-Zero's reasoning often mixed languages; R1 adds the share of the chain of
thought written in the prompt's language to the reward, and reports that this
costs a little accuracy and buys readability. The main job's base model never
mixes (consistency 0.995 with or without the reward), so both arms here start
from a bilingual base that does: half of the problems are posed in Chinese, and
half of the Chinese pre-training documents drift into English partway through
their worked solution (`pretrain.mixed_language_rate`), as R1-Zero's outputs
did. Arms (sharing that pretraining per seed):
  without: accuracy + format (the main job's rewards);
  with:    + 0.5 × language consistency.
The eval stages report `mixed/zh` (the share of samples to Chinese prompts whose
reasoning is not all Chinese), `language/zh` and pass@1.

  python -m r1jax.tools.sweep --ablation=experiments/ablations/language_reward.py \
      --workdir=/tmp/abl --seeds=3
"""

from r1jax import configs

VARIANTS = ("without", "with")
# Compared between the arms (with standard errors) besides the sweep's headline numbers.
METRICS = ("held_out/mixed/zh", "held_out/language/zh")
ZH_FRACTION = 0.5
MIXED_LANGUAGE_RATE = 0.5


def _apply(c, variant):
  c.data.zh_fraction = ZH_FRACTION
  c.stages.pretrain.mixed_language_rate = MIXED_LANGUAGE_RATE
  if variant == "with":
    c.stages.grpo.rewards = (("accuracy", 1.0), ("format", 0.5), ("language", 0.5))


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply)
