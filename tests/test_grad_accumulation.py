"""Gradient accumulation: M micro-batches then one update equals the one-shot step
(loss, metrics, parameters) for SFT and for each GRPO aggregation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax.parallel import mesh as mesh_lib
from r1jax.pipeline.context import Context
from r1jax.rl import grpo, update
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import optim, sft, trainer

TOL = dict(rtol=1e-5, atol=1e-5)
# SGD: the parameters are then a linear function of the gradient, so a parameter
# gap is a gradient gap (Adam's first step, ~lr·sign(g), would amplify rounding).
SGD = optax.sgd(0.5)


def _close_trees(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **TOL,
                               err_msg=jax.tree_util.keystr(path))


def _close_metrics(m1, mM):
  assert set(m1) == set(mM), (sorted(m1), sorted(mM))
  for k in m1:
    np.testing.assert_allclose(np.asarray(mM[k]), np.asarray(m1[k]), **TOL, err_msg=k)


@pytest.fixture(scope="module")
def sft_batch(tiny_cfg):
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, tiny_cfg.vocab_size, (8, 20))
  # Rows with very different target counts (one with none), and padding.
  prompt = np.array([2, 15, 5, 19, 3, 8, 1, 12])[:, None]
  length = np.array([20, 20, 14, 19, 9, 20, 17, 11])[:, None]
  slots = np.arange(20)[None]
  valid = slots < length
  return {"tokens": jnp.asarray(tokens, jnp.int32),
          "loss_mask": jnp.asarray((slots >= prompt) & valid, jnp.int32),
          "valid": jnp.asarray(valid, jnp.int32)}


def test_sft_accumulation_equals_the_one_shot_step(tiny_cfg, tiny_params, sft_batch):
  state = sft.init_state(tiny_params, SGD)
  one, m1 = jax.jit(sft.make_train_step(tiny_cfg, SGD))(state, sft_batch)
  assert {"lm_loss", "mtp_loss", "balance_loss", "max_vio", "tokens"} <= set(m1)
  acc, m4 = jax.jit(sft.make_train_step(tiny_cfg, SGD, micro_batches=4))(state, sft_batch)
  _close_metrics(m1, m4)
  _close_trees(one.params, acc.params)
  # The bias rule saw the summed loads: same bias as the one-shot step, and it moved.
  bias = acc.params["moe_layers"]["moe"]["router"]["bias"]
  assert float(jnp.abs(bias).max()) > 0


def test_micro_batches_must_divide_the_rows(tiny_cfg, tiny_params, sft_batch):
  step = sft.make_train_step(tiny_cfg, SGD, micro_batches=3)
  with pytest.raises(ValueError, match="micro_batches=3 must divide the batch's 8 rows"):
    step(sft.init_state(tiny_params, SGD), sft_batch)
  with pytest.raises(ValueError, match="micro_batches=0"):
    sft.make_train_step(tiny_cfg, SGD, micro_batches=0)


@pytest.fixture(scope="module")
def grpo_batch(tiny_cfg, tiny_params):
  rng = np.random.default_rng(1)
  B, P, N = 8, 6, 10
  prompts = rng.integers(4, tiny_cfg.vocab_size, (B, P))
  prompt_lengths = np.array([6, 4, 5, 6, 3, 6, 2, 5])
  prompts = np.where(np.arange(P)[None] >= P - prompt_lengths[:, None], prompts, 0)
  tokens = rng.integers(4, tiny_cfg.vocab_size, (B, N))
  # Varied completion lengths; rows 3 and 7 have none, so with M = 4 (rows i, i+4)
  # the last micro-batch has no token at all.
  n_gen = np.array([10, 3, 7, 0, 5, 10, 1, 0])
  mask = np.arange(N)[None] < n_gen[:, None]
  arrays = update.training_arrays(
      dict(prompts=prompts, prompt_lengths=prompt_lengths, tokens=tokens, mask=mask,
           finished=np.ones(B, bool)),
      rng.normal(size=B).astype(np.float32), mask_truncated=False)
  batch = {k: jnp.asarray(v) for k, v in arrays.items()}
  logp = update.sequence_logprobs(tiny_cfg, tiny_params, batch["tokens"], batch["positions"],
                                  batch["valid"], completion_len=N)[0]
  # π_old and π_ref off π_θ, so ratios clip and the KL is not zero.
  batch["old_logp"] = logp + jnp.asarray(rng.normal(scale=0.3, size=(B, N)), jnp.float32)
  batch["ref_logp"] = logp + jnp.asarray(rng.normal(scale=0.2, size=(B, N)), jnp.float32)
  batch["tis_weights"] = jnp.asarray(rng.uniform(0.5, 1.0, (B, N)), jnp.float32)
  return batch


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_grpo_accumulation_equals_the_one_shot_step(tiny_cfg, tiny_params, grpo_batch,
                                                    aggregation):
  loss_fn = update.make_loss_fn(tiny_cfg, beta=0.04, aggregation=aggregation, max_len=10,
                                eps_low=0.2, eps_high=0.28)
  state = update.RLState(step=jnp.zeros((), jnp.int32), params=tiny_params,
                         opt_state=SGD.init(tiny_params), ref_params=None)
  rng = jax.random.key(0)
  one, m1 = jax.jit(update.make_train_step(tiny_cfg, SGD, loss_fn))(state, grpo_batch, rng)
  assert 0 < float(m1["clip_frac_low"] + m1["clip_frac_high"]) < 1
  # M = 4: micro-batch i holds rows i and i + 4; the last one has no token.
  step = update.make_train_step(tiny_cfg, SGD, loss_fn, micro_batches=4,
                                aggregation=aggregation)
  acc, m4 = jax.jit(step)(state, grpo_batch, rng)
  _close_metrics(m1, m4)
  _close_trees(one.params, acc.params)


def test_the_aggregations_weigh_micro_batches_differently(grpo_batch):
  # So the equality above tells the rules apart: each weighting is its own.
  micro = sft.split_micro_batches(grpo_batch, 4)
  w = {a: np.asarray(update.grpo_micro_weights(micro, a)["agg"]) for a in grpo.AGGREGATIONS}
  np.testing.assert_allclose(w["token-mean"], [15 / 36, 13 / 36, 8 / 36, 0], rtol=1e-6)
  np.testing.assert_allclose(w["seq-mean-token-mean"], [2 / 6, 2 / 6, 2 / 6, 0], rtol=1e-6)
  np.testing.assert_allclose(w["seq-mean-token-sum-norm"], [0.25] * 4, rtol=1e-6)


def test_the_loop_accumulates_and_stops_on_refusals_read_at_log_points(tiny_cfg, tmp_path):
  # micro_batches reaches the loop's step; with log_every 5 and checkpoints rare, the
  # refusals of steps 1-2 are read back at step 5 (step 1 at orbax's first save), yet
  # the stop names step 2 and both refused steps are logged, as with a per-step read.
  mesh = mesh_lib.make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])
  ctx = Context(c=None, workdir=str(tmp_path), mesh=mesh, tok=None, train_examples=[],
                eval_examples=[], model_cfg=tiny_cfg)
  tokens = (np.arange(4 * 8).reshape(4, 8) % 500 + 4).astype(np.int32)
  poisoned = tokens.copy()
  poisoned[:, -1] = tiny_cfg.vocab_size  # out of the vocabulary: a NaN loss
  rows = lambda t: {"tokens": t, "loss_mask": np.ones_like(t), "valid": np.ones_like(t)}
  ocfg = optim.OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=20,
                           max_nonfinite_steps=2)
  kw = dict(cfg=tiny_cfg, params=None, eval_rows=rows(tokens), ocfg=ocfg, steps=10,
            batch_size=4, seed=0, log_every=5, checkpoint_every=100)
  with pytest.raises(ValueError, match="micro_batches=3 must divide batch_size=4"):
    trainer.train_supervised(ctx, str(tmp_path / "bad"), rows=rows(tokens), micro_batches=3,
                             **kw)
  stage_dir = tmp_path / "sft"
  stage_dir.mkdir()
  with pytest.raises(ckpt_lib.NonFiniteError, match=r"^stage sft: stopped at step 2: 2 "):
    trainer.train_supervised(ctx, str(stage_dir), rows=rows(poisoned), micro_batches=2, **kw)
  with open(stage_dir / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert [(r["step"], r["skipped_nonfinite"]) for r in logged] == [(1, 1.0), (2, 1.0)]


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_on_policy_update_equals_the_update_with_a_recomputed_pi_old(
    tiny_cfg, tiny_params, grpo_batch, micro_batches):
  """One update per rollout: π_old is π_θ. Given by a separate forward (old_logp, TIS
  weights and mismatch from the host) or taken inside the loss (sampler_logp only),
  the update, the TIS weights and the sampler checks agree."""
  N = grpo_batch["mask"].shape[1]
  logp = update.sequence_logprobs(tiny_cfg, tiny_params, grpo_batch["tokens"],
                                  grpo_batch["positions"], grpo_batch["valid"], completion_len=N)[0]
  noise = np.random.default_rng(1).normal(scale=0.05, size=logp.shape)
  sampler = np.asarray(logp) + noise.astype(np.float32)
  mask = np.asarray(grpo_batch["mask"], bool)
  cap = 1.02
  w_host = np.minimum(np.exp(np.where(mask, np.asarray(logp) - sampler, 0.0)), cap)
  base = {k: v for k, v in grpo_batch.items() if k not in ("old_logp", "tis_weights")}
  recomputed = {**base, "old_logp": logp, "tis_weights": jnp.asarray(w_host, jnp.float32)}
  on_policy = {**base, "sampler_logp": jnp.asarray(sampler)}
  loss_fn = update.make_loss_fn(tiny_cfg, beta=0.04, max_len=10, tis_cap=cap)
  state = update.RLState(step=jnp.zeros((), jnp.int32), params=tiny_params,
                         opt_state=SGD.init(tiny_params), ref_params=None)
  step = jax.jit(update.make_train_step(tiny_cfg, SGD, loss_fn, micro_batches=micro_batches))
  want, m_want = step(state, recomputed, jax.random.key(0))
  got, m_got = step(state, on_policy, jax.random.key(0))
  _close_trees(want.params, got.params)
  for k in ("loss", "kl", "tis_weight_mean", "entropy"):
    np.testing.assert_allclose(m_got[k], m_want[k], **TOL, err_msg=k)
  assert float(m_got["ratio_mean"]) == 1.0 and float(m_got["ratio_max"]) == 1.0
  d = np.abs(np.asarray(logp) - sampler)[mask]
  np.testing.assert_allclose(m_got["logp_mismatch/mean"], d.mean(), rtol=1e-4)
  np.testing.assert_allclose(m_got["logp_mismatch/max"], d.max(), rtol=1e-4)
  np.testing.assert_allclose(m_got["logp_truncation/mean"],
                             (sampler - np.asarray(logp))[mask].mean(), atol=1e-5)
  np.testing.assert_allclose(m_got["tis/capped_frac"], (w_host >= cap)[mask].mean(), atol=1e-6)
  assert 0 < float(m_got["tis/capped_frac"]) < 1  # the cap binds on some tokens, not all
