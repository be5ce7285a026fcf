"""DeepSeek-R1-Zero on DeepSeek-V3-671B with the paper's GRPO settings (pod config).

R1 (Nature version, Methods): lr 3e-6, KL coefficient 0.001 (k3), temperature 1,
G = 16, 32 questions per update, rollouts of 512 questions (8,192 outputs) split
into 16 minibatches with one pass, reference reset every 400 updates, max
length 32,768, 10,400 steps. The paper's steps are updates: 16 per rollout, so
10,400 updates are 650 rollouts (this config's `steps`, a GRPOStep call each)
and the reference is reset every 25 rollouts. The base model is DeepSeek-V3-Base
in Hugging Face format (bf16 safetensors; convert the released FP8 files first), read by
r1jax.interop.hf on every host.

  python launch/tpu_pod.py --tpu=NAME --zone=ZONE --config=experiments/r1_zero/v3_671b.py \
      --workdir=gs://BUCKET/r1_zero_671b

On a CPU it only builds and validates (the test suite does that).
"""

from r1jax import configs


def get_config(arg: str | None = None):
  c = configs.base()
  # Each device exchanges its 33,792 tokens with its expert peers in chunks of
  # 512, so the dropless exchange buffers are sized by the chunk, not by the
  # sequence; sequence parallelism keeps each layer's saved input to 1/8 of it.
  configs.with_model_preset(c, "deepseek_v3_671b", ep_chunk_tokens=512, sequence_parallel=True)
  # 512 devices: experts over expert × fsdp × tensor (all 512), other weights over
  # fsdp × tensor, heads and hidden units over tensor = 8. On 256 devices
  # (1 × 32 × 8 × 1) the sharded state (bf16 weights, gradients and reference,
  # f32 master and moments) is 55.6 GB a device before any activation; see
  # `plan --compile` in README.
  c.mesh = (1, 8, 8, 8)
  c.data.update(dict(task="math_jsonl", train_path="gs://BUCKET/data/math_train.jsonl",
                     eval_path="gs://BUCKET/data/aime24.jsonl", n_train=0, n_eval=30,
                     vocab_size=129280,
                     # the Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json
                     # with its chat template), as DeepSeek ships it beside the weights
                     tokenizer_path="gs://BUCKET/deepseek_v3"))
  c.pipeline = ("grpo",)
  c.stages.grpo = configs.grpo_stage(
      init="hf:/mnt/checkpoints/DeepSeek-V3-Base-bf16",
      rewards=(("accuracy", 1.0), ("format", 1.0)),
      steps=650,  # rollouts: 10,400 updates / 16 updates per rollout
      log_every=1, checkpoint_every=50, eval_prompts=30, eval_samples=16, eval_temperature=0.6,
      reward_workers=64, reward_timeout_s=30.0,
      # The latent cache is 2.4 GB a completion (33,792 slots × 576 × 61 layers, bf16),
      # split over the 64 data-parallel devices only: all 8,192 at once would be
      # 303 GB a device; slices of 512 (8 a device) take 19 GB.
      grpo=dict(group_size=16, prompts_per_step=512, max_prompt_len=1024, max_new_tokens=32_768,
                # An update's 512 completions are 8 per data-parallel device (64 of
                # them): one 33k-token sequence a device per micro-step.
                micro_batches=8,
                rollout_slice=512, temperature=1.0, n_minibatches=16, num_iterations=1, beta=0.001,
                kl_estimator="k3", eps_low=0.2, eps_high=0.2,
                ref_reset_every=400),  # updates (= 25 rollouts)
      # The schedule counts updates: 650 rollouts × 16 minibatches × 1 pass.
      optim=dict(learning_rate=3e-6, warmup_steps=0, total_steps=10_400,
                 end_lr_fraction=1.0, weight_decay=0.1, grad_clip_norm=1.0))
  c.lock()
  return c
