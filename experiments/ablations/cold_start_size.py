"""Ablation: how much the cold start does, and what reasoning RL adds after it (R1 §2.3.1-2).

R1's cold start is a few thousand curated chains of thought; most of its gains
come from the reasoning RL that follows. In experiments/r1/tiny.py the cold start
(60 steps × 32 worked solutions) already reaches the model's ceiling on the toy
task (pass@1 0.96, pass@8 0.99), so reasoning RL has nothing left to add. Here
the cold start is cut to a half or a third of its steps, so that it leaves
headroom, and the arms show how much of the accuracy the reasoning RL then
adds. Arms: full (r1/tiny.py's 60 steps), cold starts of 30 and 20 steps, and
the 30-step cold start followed by the main job's RL schedule (30 steps at 2e-4
instead of 20 at 1e-4), and the 30- and 20-step cold starts followed by reasoning
RL whose rollouts sample at T 0.6 (the eval stages' temperature) instead of 1.0:
at T 1 the 30-step cold start's rollouts have format 0.15-0.25 and accuracy
0.08-0.15 while its T 0.6 samples have 0.97 and 0.82, so RL at T 1 spends its
steps on samples the eval never draws.
(At 10 steps, one seed, the cold start wrote the reasoning but not the boxed
answer: format 0, pass@1 0, and with no reward signal the reasoning RL stayed
at 0.) Each arm stops after the reasoning RL's eval stage; compare
`eval_cold_start` with `eval_reasoning_rl` (held_out/pass@1, pass@8, format).
Measured with 3 seeds (experiments/results/cold_start_size/): with rollouts at
T 1.0 the reasoning RL added nothing in any arm, headroom or not (30 steps:
0.824 → 0.795 with pass@8 at 0.94-0.97; with the main job's schedule 0.802 ±
0.123, per seed +0.044, −0.106, −0.004; sweep_steps30_zero_rl.json). With
rollouts at T 0.6 it adds: 0.824 → 0.853 ± 0.049, paired over seeds +0.029 ±
0.010 SE, cons@8 0.859 → 0.901, pass@8 unchanged (sweep_steps30_t06.json);
after the 20-step cold start 0.113 → 0.326 ± 0.208, paired +0.213 ± 0.078 SE,
format 0.14 → 0.48 (sweep_steps20_t06.json; at T 1.0: 0.113 → 0.075).

  python -m r1jax.tools.sweep --ablation=experiments/ablations/cold_start_size.py \
      --workdir=/tmp/abl --seeds=3 --reuse_from=/tmp/abl/r1_stages/r1/seed0,...
(the r1_stages sweep's runs: the full arm is r1/tiny.py's own stages)
"""

from r1jax import configs

VARIANTS = ("full", "steps30", "steps20", "steps30_zero_rl", "steps30_t06", "steps20_t06")
_STEPS = {"full": 60, "steps30": 30, "steps20": 20, "steps30_zero_rl": 30, "steps30_t06": 30,
          "steps20_t06": 20}


def _apply(c, variant):
  c.pipeline = ("pretrain", "cold_start", "eval_cold_start", "reasoning_rl",
                "eval_reasoning_rl")
  steps = _STEPS[variant]
  if steps != 60:
    c.stages.cold_start.steps = steps
    c.stages.cold_start.optim.update(dict(total_steps=steps, warmup_steps=min(5, steps // 2)))
  if variant.endswith("_zero_rl"):  # the main job's RL schedule: 30 steps at 2e-4
    rl = c.stages.reasoning_rl
    rl.steps = 30
    rl.optim.update(dict(learning_rate=2e-4, total_steps=60))
  if variant.endswith("_t06"):  # rollouts at the eval temperature instead of 1.0
    c.stages.reasoning_rl.grpo.temperature = 0.6


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply, base="r1/tiny.py")
