"""Can GRPO move a trained model's answers? A probe on a few fixed training prompts.

  python -m r1jax.tools.grpo_probe --config=experiments/r1_zero/tiny.py \
      --workdir=/tmp/r1jax --init=pretrain --prompts=4 --steps=15 --lr=1e-4

Loads the weights a finished stage of `workdir` saved, then runs GRPO with the
accuracy reward alone on the first `prompts` training prompts, printing the
rollout accuracy per step as JSON lines. Accuracy that climbs here but not in
the full stage points at scale or budget rather than at the update itself.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from r1jax import storage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory with a finished stage.")
_INIT = flags.DEFINE_string("init", "pretrain", "The stage whose weights to start from.")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "Fixed training prompts to train on.")
_STEPS = flags.DEFINE_integer("steps", 15, "GRPO steps.")
_LR = flags.DEFINE_float("lr", 1e-4, "Learning rate.")
_GROUP = flags.DEFINE_integer("group_size", 16, "Completions per prompt.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from r1jax.data import pipelines
  from r1jax.pipeline import context as context_lib
  from r1jax.rewards import RewardEvaluator, RewardSpec
  from r1jax.rl.step import GRPOConfig, GRPOStep
  from r1jax.train.optim import OptimConfig

  c = _CONFIG.value
  train, held_out = context_lib.load_splits(c)
  tok = context_lib.prepare_tokenizer(c, _WORKDIR.value, train)
  ctx = context_lib.Context.create(c, _WORKDIR.value, tok, train, held_out)
  with storage.path(f"{_WORKDIR.value}/{_INIT.value}/outputs.json").open() as f:
    cfg, params = ctx.load_params(json.load(f))
  template = c.stages.grpo.template if "grpo" in c.stages else "r1_zero"
  g = GRPOConfig(group_size=_GROUP.value, prompts_per_step=_PROMPTS.value,
                 max_prompt_len=112, max_new_tokens=64, n_minibatches=2, beta=0.0,
                 ref_reset_every=0)
  examples, _ = pipelines.prompt_examples(ctx.tok, ctx.train_examples[:_PROMPTS.value],
                                          template=template, max_prompt_len=g.max_prompt_len,
                                          seed=0)
  ocfg = OptimConfig(learning_rate=_LR.value, warmup_steps=1, total_steps=max(_STEPS.value, 2),
                     weight_decay=0.0, end_lr_fraction=1.0)
  with jax.set_mesh(ctx.mesh), RewardEvaluator(RewardSpec.create([("accuracy", 1.0)])) as ev:
    step = GRPOStep(cfg, g, ocfg, ev, decode=ctx.tok.decode, eos_id=ctx.tok.eos_id,
                    pad_id=ctx.tok.pad_id, mesh=ctx.mesh)
    state = step.init_state(params)
    for _ in range(_STEPS.value):
      state, m = step(state, examples, jax.random.key(0))
      print(json.dumps({"step": int(state.step), "accuracy": round(m["accuracy"], 4),
                        "kl": round(m.get("kl", 0.0), 5)}), flush=True)


if __name__ == "__main__":
  app.run(main)
