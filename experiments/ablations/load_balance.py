"""Ablation: DeepSeek-V3's auxiliary-loss-free load balancing vs an auxiliary loss.

Pre-training only (that is where the router learns its load). Arms:
bias: the correction bias of V3 §2.1.2 (γ = 0.001) and the tiny sequence-wise
  loss (α = 0.0001), the main job's setting;
aux: no bias updates, a conventional balance loss (α = 0.01) does the work;
none: neither, to see how unbalanced the router gets by itself.
Each arm's pretrain/metrics.jsonl logs MaxVio (max load / mean load − 1, per
MoE layer, worst layer) per step; the summary holds the last value and the loss.

  python -m r1jax.tools.sweep --ablation=experiments/ablations/load_balance.py --workdir=/tmp/abl
"""

from r1jax import configs

VARIANTS = ("bias", "aux", "none")
_SETTINGS = {
    "bias": dict(bias_update_rate=0.001, seq_aux_loss_alpha=0.0001),
    "aux": dict(bias_update_rate=0.0, seq_aux_loss_alpha=0.01),
    "none": dict(bias_update_rate=0.0, seq_aux_loss_alpha=0.0),
}


def _apply(c, variant):
  c.model.update(_SETTINGS[variant])
  c.pipeline = ("pretrain",)


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply)
