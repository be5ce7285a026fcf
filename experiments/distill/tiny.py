"""Distillation at toy scale (R1 §2.4): the R1-Zero tiny model, after GRPO, writes
reasoning traces; a smaller dense student learns them by SFT alone; an eval stage
benchmarks the student (pass@1 and cons@8, held-out and the MATH-500-layout file).

  python -m r1jax.main --config=experiments/distill/tiny.py --workdir=/tmp/r1jax_distill
"""

from r1jax import configs
from r1jax.model import ModelConfig


def get_config(arg: str | None = None):
  zero = configs.experiment("r1_zero/tiny.py")
  c = zero.get_config()
  with c.unlocked():
    c.pipeline = ("pretrain", "grpo", "distill", "eval")
    # A dense student, two layers narrower than the teacher's three: no routed
    # experts, no MTP; about a third of the teacher's parameters.
    student = ModelConfig.tiny(vocab_size=512, max_seq_len=256, d_model=96, n_layers=2,
                               n_dense_layers=2, n_heads=4, q_lora_rank=48, kv_lora_rank=48,
                               d_ff=192, mtp_depth=0)
    # The teacher answers every training prompt twice; the correct, clean traces
    # are the student's only data.
    c.stages.distill = configs.distill_stage(
        teacher="stage:grpo", student={f: getattr(student, f) for f in c.model.keys()},
        prompts=4096, samples_per_prompt=2, keep_per_prompt=2, temperature=0.6,
        max_prompt_len=112, max_new_tokens=64, steps=400, batch_size=32, seq_len=176,
        eval_prompts=128, eval_samples=2,
        optim=dict(learning_rate=3e-3, warmup_steps=10, total_steps=400, weight_decay=0.01))
    c.stages.eval = zero.eval_stage("stage:distill", "r1_zero")
    if arg == "smoke":
      zero.shrink(c)
  c.lock()
  return c
