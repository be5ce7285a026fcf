"""DeepSeek-R1's four stages at toy scale (R1 §2.3), after a pretrained base model:

  pretrain (the task's worked solutions)
  → cold-start SFT (R1-chat template, readable worked solutions)
  → reasoning GRPO (accuracy + format + language consistency)
  → rejection sampling (correct, single-language, non-repetitive samples)
  → SFT of the base model on them, with general requests answered without a chain
    of thought (R1 §2.3.3's non-reasoning data)
  → alignment GRPO on reasoning and general prompts (lower temperature; the rule
    rewards plus a preference-style proxy on the general ones, R1 §2.3.4),
with an eval stage (R1's benchmark settings in its chat template: pass@1 and
cons@8, on the held-out problems and the general slice's held-out requests)
after cold start, reasoning RL, the SFT and alignment RL, so that each stage's
contribution can be read off (experiments/ablations/r1_stages.py runs it with
seeds).

  python -m r1jax.main --config=experiments/r1/tiny.py --workdir=/tmp/r1jax_r1
"""

from r1jax import configs


def get_config(arg: str | None = None):
  zero = configs.experiment("r1_zero/tiny.py")
  c = zero.get_config()
  with c.unlocked():
    template = "r1_chat"
    # The non-reasoning slice (r1jax.data.tasks.general): short requests that R1's SFT
    # data answers without a chain of thought (about 1 row in 4, as R1's 200K of 800K)
    # and alignment RL mixes with reasoning prompts under a preference-style reward
    # (r1jax.rewards.preference). The base model and the toy tokenizer do not read
    # them: 2,048 of them among the pre-training documents cut the cold start's pass@1
    # from 0.96 to 0.45 (one seed), and a tokenizer trained with them too gave cold
    # starts of 0.94, 0.59 and 0.82 (seeds 0-2) where the task's own gives 0.96 ± 0.01.
    c.data.general_n_train, c.data.general_n_eval = 1024, 64
    rl = dict(template=template, eval_prompts=128, eval_samples=2, eval_temperature=0.6,
              grpo=dict(max_prompt_len=48, max_new_tokens=64))
    # An eval stage after each of R1's stages (R1's benchmark settings: 64 held-out
    # prompts × 8 samples at T 0.6), so that what each stage adds can be read off.
    c.pipeline = ("pretrain", "cold_start", "eval_cold_start", "reasoning_rl",
                  "eval_reasoning_rl", "rejection", "sft", "eval_sft", "alignment_rl", "eval")
    c.stages.cold_start = configs.sft_stage(
        init="stage:pretrain", data="task", template=template, steps=60, batch_size=32,
        seq_len=128, eval_template=template, eval_max_prompt_len=48,
        optim=dict(learning_rate=1e-3, warmup_steps=5, total_steps=60, weight_decay=0.0))
    # Language consistency joins accuracy as a summed reward (R1 §2.3.2).
    c.stages.reasoning_rl = configs.grpo_stage(
        init="stage:cold_start", rewards=(("accuracy", 1.0), ("format", 0.5),
                                          ("language", 0.5)),
        steps=20, **rl)
    c.stages.reasoning_rl.grpo.update(dict(group_size=8, prompts_per_step=16, n_minibatches=2,
                                           ref_reset_every=0))
    c.stages.reasoning_rl.optim.update(dict(learning_rate=1e-4, warmup_steps=2,
                                            total_steps=40, weight_decay=0.0))
    c.stages.rejection = configs.rejection_sample_stage(
        init="stage:reasoning_rl", template=template, prompts=512, samples_per_prompt=4,
        keep_per_prompt=2, temperature=0.8, max_prompt_len=48, max_new_tokens=64,
        # R1 §2.3.3's filters, scaled to this task's reasoning (a few dozen characters).
        max_paragraph_chars=300, reject_code_blocks=True)
    # R1 retrains the *base* model on the curated data (R1 §2.3.3).
    c.stages.sft = configs.sft_stage(
        init="stage:pretrain", data="stage:rejection", extra_task_rows=256, general_rows=384,
        template=template, steps=80,
        batch_size=32, seq_len=128, eval_template=template, eval_max_prompt_len=48,
        optim=dict(learning_rate=1e-3, warmup_steps=5, total_steps=80, weight_decay=0.0))
    # R1 §2.3.4: rule rewards on reasoning prompts, a preference reward on general ones
    # (here a rule-based proxy: the answer alone after the thinking, and little thinking).
    c.stages.alignment_rl = configs.grpo_stage(
        init="stage:sft", rewards=(("accuracy", 1.0), ("format", 0.5), ("language", 0.5),
                                   ("preference", 0.5)),
        steps=10, general_prompts=1024, **rl)
    c.stages.alignment_rl.grpo.update(dict(group_size=8, prompts_per_step=16, n_minibatches=2,
                                           temperature=0.7, ref_reset_every=0))
    c.stages.alignment_rl.optim.update(dict(learning_rate=1e-4, warmup_steps=1,
                                            total_steps=20, weight_decay=0.0))
    for stage in ("cold_start", "reasoning_rl", "sft"):
      c.stages[f"eval_{stage}"] = zero.eval_stage(f"stage:{stage}", template)
    c.stages.eval = zero.eval_stage("stage:alignment_rl", template)
    for stage in ("eval_cold_start", "eval_reasoning_rl", "eval_sft", "eval"):
      c.stages[stage].benchmarks += (("general", "task:general"),)
    if arg == "smoke":
      zero.shrink(c)
  c.lock()
  return c
