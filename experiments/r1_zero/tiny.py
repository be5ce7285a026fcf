"""R1-Zero at toy scale: pretrain a tiny DeepSeek-V3 base model, then GRPO it.

The base model learns one- to three-step sums of single digits from a corpus of
worked problems. 30% of the documents are in the R1-Zero template, and 60% of
those answer at once without working the sum out (web text often does), so the
base model can reason but in the template often does not; its blurted answers
to multi-step sums are mostly wrong. GRPO with the rule-based accuracy + format
rewards (R1 §2.2) on the training prompts then teaches it to think before it
answers: held-out pass@1 (temperature 1) and the response length both rise, as
in the paper's Figures 2 and 3. Eval stages before and after GRPO score both
models the way R1 reports benchmarks (8 samples per prompt at T 0.6, top-p 0.95:
pass@1 and cons@8) on the held-out split and on a MATH-500-layout file of the
same kind of problems (experiments/data/arith_math500.jsonl). The README's main
command:

  python -m r1jax.main --config=experiments/r1_zero/tiny.py --workdir=/tmp/r1jax
"""

from r1jax import configs


def get_config(arg: str | None = None):
  c = configs.base()
  # The tiny preset widened to d_model 128: the narrowest that learns the sums in
  # a few hundred steps. No multi-token prediction: it would cost a quarter of
  # every step, and R1's RL does not use it.
  configs.with_model_preset(c, "tiny", vocab_size=512, max_seq_len=256, d_model=128,
                            q_lora_rank=64, kv_lora_rank=64, d_ff=256, moe_d_ff=64,
                            mtp_depth=0)
  # Sums of one to three single digits: each step is a fact the tiny model can
  # learn, while answering a three-step sum at once is mostly a guess.
  c.data.update(dict(task="arithmetic", min_steps=1, max_steps=3, max_operand=9, ops="+",
                     zh_fraction=0.25, n_train=4096, n_eval=200))
  c.pipeline = ("pretrain", "eval_base", "grpo", "eval")
  c.stages.pretrain = configs.pretrain_stage(
      steps=600, batch_size=32, seq_len=160, r1_zero_fraction=0.3, direct_answer_rate=0.6,
      log_every=20, checkpoint_every=100,
      optim=dict(learning_rate=3e-3, warmup_steps=20, total_steps=600, weight_decay=0.01))
  c.stages.grpo = configs.grpo_stage(
      init="stage:pretrain", rewards=(("accuracy", 1.0), ("format", 0.5)),
      steps=30, log_every=1, checkpoint_every=10, eval_prompts=128, eval_samples=2,
      eval_temperature=1.0, eval_top_p=1.0,
      grpo=dict(group_size=8, prompts_per_step=16, max_prompt_len=112, max_new_tokens=64,
                temperature=1.0, n_minibatches=2, num_iterations=1, beta=0.001,
                ref_reset_every=0),
      optim=dict(learning_rate=2e-4, warmup_steps=2, total_steps=60, weight_decay=0.0))
  # The toy model is evaluated in the template it was trained in. 64 prompts per
  # benchmark × 8 samples: two sampler batches of 512 rows, 16-22 s a stage on
  # 2 idle cores (compilation and the reward workers' start are much of it).
  c.stages.eval_base = eval_stage("stage:pretrain", "r1_zero")
  c.stages.eval = eval_stage("stage:grpo", "r1_zero")
  if arg == "smoke":
    shrink(c)
  c.lock()
  return c


def eval_stage(init: str, template: str):
  """The experiments' benchmark stage: the held-out split and a MATH-500-layout file."""
  return configs.eval_stage(
      init=init, benchmarks=(("held_out", "task:held_out"),
                             ("arith_math500", "experiments/data/arith_math500.jsonl")),
      max_prompts=64, samples=8, temperature=0.6, top_p=0.95, template=template,
      max_prompt_len=112, max_new_tokens=64, batch_rows=512)


def shrink(c) -> None:
  """A couple of steps of every stage, for the test suite."""
  c.data.n_train, c.data.n_eval = 256, 32
  if c.data.general_n_train:
    c.data.general_n_train, c.data.general_n_eval = 32, 8
  for name in c.pipeline:
    sc = c.stages[name]
    if sc.kind == "eval":
      sc.max_prompts, sc.samples, sc.max_new_tokens, sc.batch_rows = 4, 4, 16, 16
      continue
    sc.steps = 2
    sc.log_every = 1
    sc.checkpoint_every = 1
    if "optim" in sc:
      sc.optim.warmup_steps, sc.optim.total_steps = 1, 2
    if "batch_size" in sc:
      sc.batch_size = 8
    if "eval_prompts" in sc and sc.eval_prompts:
      sc.eval_prompts, sc.eval_samples = 8, 1
    if "grpo" in sc:
      sc.grpo.prompts_per_step, sc.grpo.group_size, sc.grpo.n_minibatches = 4, 2, 1
      sc.grpo.max_new_tokens = 16
    if "extra_task_rows" in sc:  # an untrained smoke model keeps no samples
      sc.extra_task_rows = 16
    for key in ("general_rows", "general_prompts"):
      if sc.get(key):
        sc[key] = min(sc[key], c.data.general_n_train)
    if "prompts" in sc:
      sc.prompts, sc.samples_per_prompt, sc.batch_rows = 16, 2, 16
      sc.max_new_tokens = 16
