"""The GRPO rollout in slices: the same samples and step whatever the slice, and clear errors.

Shares test_rl_step.py's bucket (Q, G, P, N) and settings; the whole rollout is
one sample call of B = 16 rows, the sliced one four calls of 4 rows each.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.parallel.mesh import make_mesh
from r1jax.rl.rollout import SamplingConfig, generate
from r1jax.rl.step import GRPOConfig
from tests.test_rl_step import GCFG, G, N, PAD, Q, examples, make_step

EOS = 475  # drawn in a few rows of the first rollout below: those rows stop early


@pytest.fixture(scope="module")
def params(tiny_params):
  return jax.device_put(tiny_params, jax.devices()[0])


def _timing(key: str) -> bool:
  return key.startswith("time/") or key.endswith("_per_s")


def test_sliced_rollout_gives_the_same_step(tiny_cfg, params):
  whole = make_step(tiny_cfg, eos_id=EOS)
  sliced = make_step(tiny_cfg, dataclasses.replace(GCFG, rollout_slice=Q * G // 4), eos_id=EOS)
  assert sliced.gcfg.slice_size == 4
  rng = jax.random.key(5)
  want, _, _ = whole._collect(params, examples(2), rng)
  got, rounds, _ = sliced._collect(params, examples(2), rng)
  for key in ("tokens", "mask", "finished", "rewards"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # A 4-row matmul rounds differently from a 16-row one on XLA:CPU (~1e-6).
  np.testing.assert_allclose(got["sampler_logp"], want["sampler_logp"], atol=1e-5)
  assert 0 < rounds[0]["lengths"].min() < N  # some row stopped early, in some slice
  # The whole GRPO step (advantages, log-probs, μ·minibatch updates) then agrees:
  # exactly where only the tokens matter, to rounding where the sampler's
  # log-probs enter (the mismatch metrics, and the loss through the TIS weights).
  state_w, m_w = whole(whole.init_state(params), examples(3), jax.random.key(8))
  state_s, m_s = sliced(sliced.init_state(params), examples(3), jax.random.key(8))
  assert sorted(m_s) == sorted(m_w)
  for key in ("reward/mean", "reward/std", "response_len/mean", "truncation_rate",
              "zero_adv_group_frac", "step"):
    assert m_s[key] == m_w[key], key
  for key in m_w:
    if not _timing(key):
      assert m_s[key] == pytest.approx(m_w[key], rel=1e-4, abs=1e-5), key
  # Adam moves each parameter by up to lr = 3e-2 per update, whatever its gradient's
  # size, so rounding-level gradient differences show as ~1e-6 absolute.
  for a, b in zip(jax.tree.leaves(state_s.params), jax.tree.leaves(state_w.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def _uniform(logits_V, tokens_BxT, positions_BxT, start, valid_BxS):
  """A fake decode: the same logits for every row and step."""
  return jnp.broadcast_to(logits_V, tokens_BxT.shape + logits_V.shape), logits_V


def test_a_row_samples_by_its_global_index():
  """Rows 4..7 of an 8-row batch draw what a 4-row batch with row_offset=4 draws."""
  logits_V = jnp.zeros(64, jnp.float32)
  draw = jax.jit(lambda rows, offset: generate(
      _uniform, logits_V, jnp.ones((rows, 2), jnp.int32), jnp.full((rows,), 2),
      jax.random.key(1), max_new_tokens=16, settings=SamplingConfig(), eos_id=None, pad_id=PAD,
      row_offset=offset), static_argnums=0)
  whole, tail = draw(8, 0), draw(4, 4)
  np.testing.assert_array_equal(tail.tokens, whole.tokens[4:])
  assert (np.asarray(whole.tokens[:4]) != np.asarray(tail.tokens)).mean() > 0.5
  assert (np.asarray(draw(4, 0).tokens) != np.asarray(tail.tokens)).mean() > 0.5


def test_bad_slice_and_micro_batches_are_one_line_errors(tiny_cfg):
  cases = [
      (dict(rollout_slice=3), r"rollout_slice=3 must divide the 16 completions"),
      (dict(rollout_slice=-4), r"rollout_slice=-4 must divide"),
      (dict(micro_batches=3), r"micro_batches=3 must divide the minibatch of 8"),
      (dict(micro_batches=0), r"micro_batches must be >= 1"),
      (dict(ref_reset_every=6), r"ref_reset_every=6 counts updates .* multiple of the 4 "),
  ]
  for change, message in cases:
    with pytest.raises(ValueError, match=message) as e:
      dataclasses.replace(GCFG, **change)
    assert "\n" not in str(e.value)
  assert dataclasses.replace(GCFG, ref_reset_every=12).ref_reset_every == 12
  mesh = make_mesh((8, 1, 1, 1))
  with pytest.raises(ValueError, match=r"rollout_slice=4 is not a multiple of the 8 "):
    make_step(tiny_cfg, dataclasses.replace(GCFG, n_minibatches=1, rollout_slice=4), mesh=mesh)
  with pytest.raises(ValueError, match=r"micro_batches=2 leaves 4 completions per micro-batch"):
    make_step(tiny_cfg, dataclasses.replace(GCFG, n_minibatches=2, micro_batches=2), mesh=mesh)
  assert GRPOConfig().slice_size == GRPOConfig().batch_size  # 0: all at once
