"""DeepSeek-R1 distilled into Qwen2.5-Math-1.5B (R1 §2.4, R1-Distill-Qwen-1.5B), pod config.

The teacher, DeepSeek-R1 in Hugging Face format (bf16 safetensors, DeepSeek's
tokenizer), answers 600K math prompts 4 times; rejection sampling keeps one
correct, clean trace a prompt. The student starts from the pretrained
Qwen2.5-Math-1.5B base (`init="hf:…"`, its own tokenizer: the traces reach it
as text) and is trained on the traces by SFT alone, with no RL: about 3 epochs
(9,400 steps of 256 sequences up to 32,768 tokens), lr 1e-5. `eval` benchmarks
the student on AIME 2024 as the paper reports it: 64 samples a problem at T 0.6,
top-p 0.95, pass@1 and cons@64.

  python launch/tpu_pod.py --tpu=NAME --zone=ZONE --config=experiments/distill/qwen2_5_1_5b.py \
      --workdir=gs://BUCKET/distill_qwen2_5_1_5b

On a CPU it only builds, validates and plans (the test suite does that):

  python -m r1jax.tools.plan --config=experiments/distill/qwen2_5_1_5b.py --devices=256
"""

import ml_collections

from r1jax import configs


def get_config(arg: str | None = None):
  # The R1-Zero pod config's model (the teacher's architecture, read from its
  # checkpoint when it loads), data and DeepSeek tokenizer, with its own stages.
  c = configs.experiment("r1_zero/v3_671b.py").get_config()
  c.unlock()
  c.mesh = (1, 32, 8, 1)
  c.stages = ml_collections.ConfigDict()
  c.pipeline = ("distill", "eval")
  c.stages.distill = configs.distill_stage(
      teacher="hf:/mnt/checkpoints/DeepSeek-R1-bf16",
      init="hf:/mnt/checkpoints/Qwen2.5-Math-1.5B",
      # The student's tokenizer directory, shipped beside its weights.
      tokenizer_path="gs://BUCKET/qwen2_5_math_1_5b",
      # The checkpoint's architecture, for the plan tool (loading reads config.json).
      student=configs.model_fields("qwen2_5_1_5b", max_seq_len=32_768),
      prompts=600_000, samples_per_prompt=4, keep_per_prompt=1, temperature=0.6, top_p=0.95,
      max_prompt_len=1024, max_new_tokens=32_768, batch_rows=512, min_language=0.95,
      max_paragraph_chars=2000, reject_code_blocks=True,
      steps=9_400, batch_size=256, seq_len=32_768, eval_prompts=0,
      optim=dict(learning_rate=1e-5, warmup_steps=100, total_steps=9_400, weight_decay=0.0))
  c.stages.eval = configs.eval_stage(
      init="stage:distill", benchmarks=(("aime24", "task:held_out"),), samples=64,
      temperature=0.6, top_p=0.95, template="r1_chat", max_prompt_len=1024,
      max_new_tokens=32_768, batch_rows=512, pass_ks=(1, 8, 64))
  c.lock()
  return c
