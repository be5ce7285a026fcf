"""SFT of the tiny DeepSeek-V3 on generated multi-step arithmetic (EN + ZH).

The model learns the R1-Zero template's format and worked solutions from
scratch. Runs in a couple of minutes on a laptop CPU:

  python -m r1jax.main --config=experiments/sft_tiny.py --workdir=/tmp/r1jax
"""

from r1jax import configs


def get_config(arg: str | None = None):
  c = configs.base()
  c.job = "sft"
  configs.with_model_preset(c, "tiny", vocab_size=512, max_seq_len=256)
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 10
  c.optim.total_steps = 120
  c.optim.weight_decay = 0.01
  c.train.steps = 120
  c.train.batch_size = 32
  c.train.log_every = 10
  c.train.checkpoint_every = 40
  if arg == "smoke":  # a few steps, for the test suite
    c.data.n_train, c.data.n_eval = 256, 32
    c.train.steps = c.optim.total_steps = 4
    c.train.batch_size = 8
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.optim.warmup_steps = 1
  c.lock()
  return c
