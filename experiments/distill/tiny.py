"""Distillation at toy scale, as R1 §2.4 does it: the R1-Zero tiny model, after
GRPO, writes reasoning traces; a smaller pretrained dense student learns them by
SFT alone (no RL).

The teacher is the main job's (pretrain, grpo; `eval` scores it). The student is
a Qwen2-shaped dense GQA model (q/k/v bias, tied embeddings, no experts) with
about a third of the teacher's parameters. Like R1's Qwen2.5 and Llama-3 bases,
it is pretrained first (`student_pretrain`: the teacher's pretraining corpus and
schedule, its own smaller model), so it knows the sums but, in the R1-Zero
template, often answers without working them out (`eval_student_base`). The
distill stage then fine-tunes it on the teacher's correct, clean traces and
`eval_student` benchmarks the result. experiments/ablations/distill_vs_rl.py
trains the same student with GRPO instead.

  python -m r1jax.main --config=experiments/distill/tiny.py --workdir=/tmp/r1jax_distill
"""

from r1jax import configs


def student_model() -> dict:
  """The student's ModelConfig fields: 2 layers of d_model 96, 4 query / 2 kv heads."""
  return configs.model_fields("tiny_gqa", vocab_size=512, max_seq_len=256, d_model=96,
                              n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, d_ff=256)


def get_config(arg: str | None = None):
  zero = configs.experiment("r1_zero/tiny.py")
  c = zero.get_config()
  with c.unlocked():
    c.pipeline = ("pretrain", "grpo", "eval", "student_pretrain", "eval_student_base",
                  "distill", "eval_student")
    # The teacher's pretraining corpus (the same problems, the same mix of templates
    # and direct answers) and schedule.
    student = c.stages.pretrain.to_dict()
    student.pop("kind")
    student["model"] = student_model()
    c.stages.student_pretrain = configs.pretrain_stage(**student)
    c.stages.eval_student_base = zero.eval_stage("stage:student_pretrain", "r1_zero")
    # The teacher answers every training prompt twice; its correct, clean traces
    # are the distillation data.
    c.stages.distill = configs.distill_stage(
        teacher="stage:grpo", init="stage:student_pretrain", prompts=4096,
        samples_per_prompt=2, keep_per_prompt=2, temperature=0.6, max_prompt_len=112,
        max_new_tokens=64, steps=200, batch_size=32, seq_len=176, eval_prompts=0,
        optim=dict(learning_rate=1e-3, warmup_steps=10, total_steps=200, weight_decay=0.01))
    c.stages.eval_student = zero.eval_stage("stage:distill", "r1_zero")
    if arg == "smoke":
      zero.shrink(c)
  c.lock()
  return c
