"""Ablation: distillation versus reinforcement learning on the same student (R1 §4.1).

The paper trains Qwen-32B-Base with large-scale RL and finds that distilling
DeepSeek-R1 into the same base does better, for less compute. Here the student is
experiments/distill/tiny.py's pretrained dense GQA model, and the teacher the
main job's R1-Zero model. Both arms share the teacher's stages, the student's
pretraining and `eval_student_base`; then
  distill: SFT on the teacher's filtered traces (the distill stage, sampling included);
  rl:      GRPO on the student, R1-Zero style (the main job's GRPO settings, for
           twice its steps: about the distill arm's wall time).
Each arm ends with `eval_student`; the stages' wall_s give each arm's cost.

  python -m r1jax.tools.sweep --ablation=experiments/ablations/distill_vs_rl.py --workdir=/tmp/abl
"""

from r1jax import configs

VARIANTS = ("distill", "rl")
SHARED = ("pretrain", "grpo", "eval", "student_pretrain", "eval_student_base")


def _apply(c, variant):
  if variant == "rl":
    rl = c.stages.grpo.to_dict()
    rl.pop("kind")
    rl["init"] = "stage:student_pretrain"
    # Twice the teacher's 30 rollouts: about the distill stage's wall time (its
    # teacher sampling included) on 2 CPU cores, so the arms cost about the same.
    rl["steps"] = 2 * rl["steps"]
    rl["optim"]["total_steps"] = 2 * rl["optim"]["total_steps"]
    c.stages.student_rl = configs.grpo_stage(**rl)
    c.stages.eval_student.init = "stage:student_rl"
    c.pipeline = SHARED + ("student_rl", "eval_student")


def get_config(arg: str | None = None):
  return configs.ablation(arg, VARIANTS, _apply, base="distill/tiny.py")
