"""Distillation into a ~7B dense student (R1 §2.4: SFT only, 2-3 epochs on the
800K curated samples), pod config. The teacher is DeepSeek-R1 in Hugging Face
format (bf16 safetensors); the student is a dense MLA transformer of ~7B
parameters.

On a CPU it only builds and validates (the test suite does that).
"""

from r1jax import configs
from r1jax.model import ModelConfig


def student_config() -> ModelConfig:
  # 34 dense layers, d_model 4096, SwiGLU 11008, MLA with DeepSeek-V2-Lite-like ranks.
  return ModelConfig(vocab_size=129280, d_model=4096, n_layers=34, n_dense_layers=34,
                     n_heads=32, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, d_ff=11008, moe_d_ff=2048,
                     n_routed_experts=0, n_shared_experts=0, n_activated_experts=0,
                     n_expert_groups=1, n_limited_groups=1, mtp_depth=0, dtype="bfloat16",
                     param_dtype="bfloat16", remat=True)


def get_config(arg: str | None = None):
  c = configs.base()
  configs.with_model_preset(c, "deepseek_v3_671b")
  c.mesh = (1, 32, 8, 1)
  c.data.update(dict(task="math_jsonl", train_path="gs://BUCKET/data/math_train.jsonl",
                     eval_path="gs://BUCKET/data/aime24.jsonl", n_train=0, n_eval=30,
                     vocab_size=129280,
                     # the Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json
                     # with its chat template), as DeepSeek ships it beside the weights
                     tokenizer_path="gs://BUCKET/deepseek_v3"))
  c.pipeline = ("distill",)
  student = student_config()
  c.stages.distill = configs.distill_stage(
      teacher="hf:/mnt/checkpoints/DeepSeek-R1-bf16", student={f: getattr(student, f) for f in c.model.keys()},
      prompts=600_000, samples_per_prompt=4, keep_per_prompt=1, temperature=0.6, top_p=0.95,
      max_prompt_len=1024, max_new_tokens=32_768, batch_rows=512, steps=9_400, batch_size=256,
      seq_len=32_768, eval_prompts=30, eval_samples=16,
      optim=dict(learning_rate=1e-5, warmup_steps=100, total_steps=9_400, weight_decay=0.0))
  c.lock()
  return c
