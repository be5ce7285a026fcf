"""Fail closed on NaN/inf: a non-finite loss or gradient refuses the update (and is
logged), a run of refusals stops the loop, and no checkpoint holds a NaN.

The poison is a target token one past the vocabulary: its log-prob gathers
out of bounds, which JAX fills with NaN, so the loss and every gradient are NaN.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax.model import ModelConfig
from r1jax.parallel import mesh as mesh_lib
from r1jax.pipeline.context import Context
from r1jax.rl import update
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import optim, sft, trainer

B, T = 2, 8
OCFG = optim.OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=20, max_nonfinite_steps=2)


def _rows(cfg: ModelConfig, poisoned: bool) -> dict:
  tokens = (np.arange(B * T).reshape(B, T) % (cfg.vocab_size - 4) + 4).astype(np.int32)
  if poisoned:
    tokens[:, -1] = cfg.vocab_size
  return {"tokens": tokens, "loss_mask": np.ones_like(tokens), "valid": np.ones_like(tokens)}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  # One device: the loop's own jitted step is compiled once and shared by the tests below.
  mesh = mesh_lib.make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])
  return Context(c=None, workdir=str(tmp_path_factory.mktemp("run")), mesh=mesh, tok=None,
                 train_examples=[], eval_examples=[], model_cfg=ModelConfig.tiny())


def _host(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_nonfinite_sft_update_is_refused_and_logged(ctx):
  cfg = ctx.model_cfg
  _, optimizer, init, _ = trainer._programs(cfg, OCFG, ctx.mesh)
  state = trainer._new_state(init(cfg, jax.random.key(0)), optimizer, ctx.mesh)
  leaves, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, state))
  step = trainer._step(cfg, OCFG, treedef, tuple(leaves))  # the loop's own program
  before = _host((state.params, state.opt_state))

  state, m = step(state, ctx.put_batch(_rows(cfg, poisoned=True)))
  assert np.isnan(float(m["loss"]))
  assert float(m["skipped_nonfinite"]) == 1.0
  assert int(state.step) == 1  # the batch is consumed: the step stays the data position
  _assert_same(_host((state.params, state.opt_state)), before)

  # The next, clean batch is applied as usual (the moments move; the learning rate
  # is still warmup's 0, as the refused step did not advance the schedule either).
  state, m = step(state, ctx.put_batch(_rows(cfg, poisoned=False)))
  assert float(m["skipped_nonfinite"]) == 0.0 and np.isfinite(float(m["loss"]))
  after = jax.tree.leaves(_host(state.opt_state))
  assert any(not np.array_equal(a, b) for a, b in zip(after, jax.tree.leaves(before[1])))


def test_consecutive_refusals_stop_the_supervised_loop(ctx):
  cfg = ctx.model_cfg
  stage_dir = os.path.join(ctx.workdir, "sft")
  os.makedirs(stage_dir)
  with pytest.raises(ckpt_lib.NonFiniteError, match=r"^stage sft: stopped at step 2: 2 "):
    trainer.train_supervised(ctx, stage_dir, cfg=cfg, params=None, rows=_rows(cfg, True),
                             eval_rows=_rows(cfg, False), ocfg=OCFG, steps=10, batch_size=B,
                             seed=0, log_every=5, checkpoint_every=1)
  # Refused steps are logged whatever log_every says.
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [(r["step"], r["skipped_nonfinite"]) for r in rows] == [(1, 1.0), (2, 1.0)]


def test_a_nonfinite_grpo_update_is_refused_and_logged(tiny_cfg, tiny_params):
  optimizer = optim.make_optimizer(OCFG)
  state = update.RLState(step=jnp.zeros((), jnp.int32), params=tiny_params,
                         opt_state=optimizer.init(tiny_params), ref_params=None)
  P, N = 4, 4
  batch = dict(tokens=np.full((B, P + N), 5, np.int32),
               positions=np.tile(np.arange(P + N, dtype=np.int32), (B, 1)),
               valid=np.ones((B, P + N), bool), mask=np.ones((B, N), bool),
               old_logp=np.zeros((B, N), np.float32),
               advantages=np.array([np.nan, 1.0], np.float32))  # e.g. a NaN reward
  step = jax.jit(update.make_train_step(tiny_cfg, optimizer, update.make_loss_fn(tiny_cfg)))
  before = _host((state.params, state.opt_state))
  state, m = step(state, batch, jax.random.key(0))
  assert np.isnan(float(m["loss"])) and float(m["skipped_nonfinite"]) == 1.0
  _assert_same(_host((state.params, state.opt_state)), before)


@pytest.mark.parametrize("lr, grad, loss, refused", [
    (0.1, [1.0, 1.0], 1.0, False),
    (0.1, [1.0, np.inf], 1.0, True),  # an inf gradient under a finite loss
    (0.1, [1.0, 1.0], np.nan, True),
    (1e38, [10.0, 10.0], 1.0, True),  # finite inputs, but the update overflows
])
def test_apply_gradients_refuses_any_nonfinite_update(lr, grad, loss, refused):
  opt = optax.sgd(lr, momentum=0.9)
  params = {"w": jnp.ones(2)}
  opt_state = opt.init(params)
  fn = jax.jit(lambda p, s, g, l: sft.apply_gradients(None, opt, p, s, g, l, {}))
  new_params, new_state, m = fn(params, opt_state, {"w": jnp.array(grad)}, jnp.float32(loss))
  assert float(m["skipped_nonfinite"]) == float(refused)
  unchanged = np.array_equal(new_params["w"], params["w"])
  assert unchanged == refused
  if refused:
    _assert_same(_host(new_state), _host(opt_state))


def test_no_checkpoint_is_written_from_nonfinite_params(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), every=1)
  good = {"step": jnp.int32(1), "params": {"w": jnp.ones((3,)), "b": jnp.zeros((2,))}}
  bad = {"step": jnp.int32(2), "params": {"w": jnp.array([1.0, jnp.inf, 0.0]),
                                          "b": jnp.zeros((2,))}}
  assert ckpt.save(1, good, {"seen": 1})
  ckpt.wait()
  with pytest.raises(ckpt_lib.NonFiniteError, match=r"step 2 .*\['params'\]\['w'\]"):
    ckpt.save(2, bad, {"seen": 2}, force=True)
  assert ckpt.latest_step == 1
  ckpt.close()


def test_the_refusal_limit_is_at_least_one():
  with pytest.raises(ValueError, match="max_nonfinite_steps"):
    optim.OptimConfig(max_nonfinite_steps=0)


def test_stage_weights_are_never_saved_with_nonfinite_values(tmp_path):
  """The end-of-stage save (what the next stage starts from) refuses NaN/inf too."""
  import types

  params = {"w": jnp.ones((2, 2)), "b": jnp.array([0.0, jnp.inf])}
  with pytest.raises(ckpt_lib.NonFiniteError, match=r"refusing to save weights.*\['b'\]"):
    Context.save_params(types.SimpleNamespace(), str(tmp_path), ModelConfig.tiny(), params)
  assert not (tmp_path / "params").exists()
