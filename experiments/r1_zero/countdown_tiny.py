"""R1-Zero on Countdown at toy scale, with the R1 paper's "aha" count.

Countdown (TinyZero's task): make a target from 3 numbers with + - * /, each
used exactly once. The base model is pretrained as in the main job on worked
searches: each is a few attempts, a miss checked in reflective words ("Wait, 14
is not 12. Try again.") and then the hit; 60% of the R1-Zero-template documents
answer at once instead. GRPO with the accuracy (the equation is checked, not
compared as text) and format rewards then decides how often the model searches.

Every GRPO step logs rollout accuracy, response length and
`reflect/words_per_response` (reflective words per completion: wait, check,
verify, again, ... and their Chinese forms; `reflect/rate`: the share of
completions with any), the curves the R1 paper reads its "aha moment" from.
The eval stages score the base and the RL model the R1 way (8 samples at T 0.6).
Unlike R1's base model, this one saw every reflective word it can use in its
pretraining documents: what RL can change is how often it uses them.

  python -m r1jax.main --config=experiments/r1_zero/countdown_tiny.py --workdir=/tmp/r1jax_countdown
"""

from r1jax import configs


def eval_stage(init: str):
  return configs.eval_stage(init=init, benchmarks=(("held_out", "task:held_out"),),
                            max_prompts=64, samples=8, temperature=0.6, top_p=0.95,
                            template="r1_zero", max_prompt_len=160, max_new_tokens=160,
                            batch_rows=512)


def get_config(arg: str | None = None):
  zero = configs.experiment("r1_zero/tiny.py")
  c = zero.get_config()
  with c.unlocked():
    # Three numbers up to 12, targets up to 40, up to two misses before the hit.
    c.data.update(dict(task="countdown", min_numbers=3, max_numbers=3, max_value=12,
                       max_target=40, max_misses=2, zh_fraction=0.25, n_train=4096,
                       n_eval=200))
    # Countdown prompts and searches are longer than the sums: with the toy
    # tokenizer a prompt is up to ~140 tokens and a worked search up to ~145.
    c.model.max_seq_len = 512
    c.stages.pretrain.seq_len = 320
    c.stages.grpo.grpo.max_prompt_len = 160
    c.stages.grpo.grpo.max_new_tokens = 160
    c.stages.eval_base = eval_stage("stage:pretrain")
    c.stages.eval = eval_stage("stage:grpo")
    if arg == "smoke":
      zero.shrink(c)
  c.lock()
  return c
