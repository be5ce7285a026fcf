"""The rollout sampler: exact against the full forward pass, padding, sampling, EOS, sharding.

Real-model tests share one (B, P, N) bucket so each sampling setting compiles
once; the sampling-statistics tests run the same core over fake models whose
logits they control.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.interop import hf
from r1jax.model import Transformer, logical_axes
from r1jax.parallel.mesh import logical_sharding, make_mesh
from r1jax.rl.rollout import SamplingConfig, generate, init_cache, sample

B, P, N = 8, 8, 12
LENGTHS = np.array([8, 3, 5, 8, 1, 6, 7, 4], np.int32)
PAD = 0
SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.9)
HF_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _layout(lengths: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
  """RoPE positions and validity of a left-padded batch over `slots` slots."""
  pad_Bx1 = (P - lengths)[:, None]
  s = np.arange(slots)[None]
  return np.maximum(s - pad_Bx1, 0).astype(np.int32), s >= pad_Bx1


@pytest.fixture(scope="module")
def prompts(tiny_cfg) -> np.ndarray:
  """Left-padded random prompts [B, P] (no pad id inside a prompt)."""
  tok = np.asarray(jax.random.randint(jax.random.key(7), (B, P), 1, tiny_cfg.vocab_size))
  return np.where(np.arange(P)[None] >= (P - LENGTHS)[:, None], tok, PAD).astype(np.int32)


@pytest.fixture(scope="module")
def greedy(tiny_cfg, tiny_params, prompts):
  return sample(tiny_cfg, tiny_params, prompts, LENGTHS, max_new_tokens=N, rng=jax.random.key(0),
                temperature=0.0, eos_id=None, pad_id=PAD)


@pytest.fixture(scope="module")
def sampled(tiny_cfg, tiny_params, prompts):
  return sample(tiny_cfg, tiny_params, prompts, LENGTHS, max_new_tokens=N, rng=jax.random.key(3),
                eos_id=None, pad_id=PAD, **SAMPLING)


# ----------------------------------------------------------------------------
# Exactness against the training-form forward pass.

def test_greedy_matches_step_by_step_full_forward(tiny_params, tiny_forward, prompts, greedy):
  """Argmax of the full forward pass over the growing sequence, one step at a time."""
  seq = np.concatenate([prompts, np.full((B, N), PAD, np.int32)], 1)
  pos, valid = _layout(LENGTHS, P + N)
  want_logp = np.zeros((B, N))
  for i in range(N):  # one compilation: the sequence buffer keeps its shape
    logits, _ = tiny_forward(tiny_params, seq, pos, valid)
    step_V = np.asarray(logits[:, P - 1 + i])
    seq[:, P + i] = step_V.argmax(-1)
    want_logp[:, i] = np.take_along_axis(_log_softmax(step_V), seq[:, P + i, None], 1)[:, 0]
  np.testing.assert_array_equal(greedy.tokens, seq[:, P:])
  np.testing.assert_allclose(greedy.model_logprobs, want_logp, atol=1e-4, rtol=0)
  np.testing.assert_allclose(greedy.logprobs, want_logp, atol=1e-4, rtol=0)
  assert greedy.mask.all() and (greedy.lengths == N).all() and not greedy.finished.any()
  assert int(greedy.steps) == N


def test_sampled_logprobs_match_full_forward(tiny_params, tiny_forward, prompts, sampled):
  """Both log-prob kinds of sampled tokens, from one teacher-forced forward pass."""
  seq = np.concatenate([prompts, np.asarray(sampled.tokens)], 1)
  pos, valid = _layout(LENGTHS, P + N)
  logits, _ = tiny_forward(tiny_params, seq, pos, valid)
  logits_BxNxV = np.asarray(logits[:, P - 1:P + N - 1], np.float64)
  tok_BxNx1 = np.asarray(sampled.tokens)[..., None]
  model_logp = np.take_along_axis(_log_softmax(logits_BxNxV), tok_BxNx1, -1)[..., 0]
  np.testing.assert_allclose(sampled.model_logprobs, model_logp, atol=1e-4, rtol=0)
  # The sampling distribution, rebuilt here: temperature, then top-k, then top-p.
  scaled = logits_BxNxV / SAMPLING["temperature"]
  order = np.argsort(-scaled, -1)
  sorted_ = np.take_along_axis(scaled, order, -1)[..., :SAMPLING["top_k"]]
  probs = np.exp(_log_softmax(sorted_))
  n_keep = ((np.cumsum(probs, -1) - probs) < SAMPLING["top_p"]).sum(-1, keepdims=True)
  kept = np.arange(sorted_.shape[-1]) < n_keep
  allowed = np.zeros_like(scaled, bool)
  np.put_along_axis(allowed, order[..., :SAMPLING["top_k"]], kept, -1)
  assert np.take_along_axis(allowed, tok_BxNx1, -1).all()
  sample_logp = np.take_along_axis(_log_softmax(np.where(allowed, scaled, -np.inf)), tok_BxNx1,
                                   -1)[..., 0]
  np.testing.assert_allclose(sampled.logprobs, sample_logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["yarn_qlora_mtp", "yarn_noqlora", "rope_qlora", "rope_noqlora"])
def test_greedy_matches_transformers_generate(variant):
  cfg, params = hf.load(os.path.join(HF_FIXTURES, variant))
  ref = np.load(os.path.join(HF_FIXTURES, variant, "reference.npz"))
  prompt_ids, want = ref["prompt_ids"], ref["greedy_ids"]
  out = sample(cfg, params, prompt_ids, np.full(len(prompt_ids), prompt_ids.shape[1]),
               max_new_tokens=want.shape[1], rng=jax.random.key(0), temperature=0.0,
               eos_id=None, pad_id=0)
  np.testing.assert_array_equal(out.tokens, want)


# ----------------------------------------------------------------------------
# Padding and sharding.

def test_prompt_alone_matches_batched(tiny_cfg, tiny_params, prompts, greedy):
  row = 1  # a 3-token prompt batched with prompts up to 8 tokens long
  alone = sample(tiny_cfg, tiny_params, prompts[row:row + 1, P - LENGTHS[row]:], LENGTHS[row:row + 1],
                 max_new_tokens=N, rng=jax.random.key(0), temperature=0.0, eos_id=None, pad_id=PAD)
  np.testing.assert_array_equal(alone.tokens[0], greedy.tokens[row])
  np.testing.assert_allclose(alone.logprobs[0], greedy.logprobs[row], atol=1e-5, rtol=0)


def test_right_padded_prompts_match_left_padded(tiny_cfg, tiny_params, prompts, greedy):
  right = np.full_like(prompts, PAD)
  for b, n in enumerate(LENGTHS):
    right[b, :n] = prompts[b, P - n:]
  out = sample(tiny_cfg, tiny_params, right, LENGTHS, max_new_tokens=N, rng=jax.random.key(0),
               temperature=0.0, eos_id=None, pad_id=PAD, padding="right")
  np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_sharded_matches_single_device(tiny_cfg, tiny_params, prompts, sampled):
  mesh = make_mesh((2, 2, 2, 1))  # batch over data×fsdp×expert; embed over fsdp, experts over expert
  params = jax.device_put(tiny_params, logical_sharding(mesh, logical_axes(tiny_cfg)))
  out = sample(tiny_cfg, params, prompts, LENGTHS, max_new_tokens=N, rng=jax.random.key(3),
               eos_id=None, pad_id=PAD, mesh=mesh, **SAMPLING)
  assert len(out.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(out.tokens, sampled.tokens)
  np.testing.assert_allclose(out.logprobs, sampled.logprobs, atol=1e-5, rtol=0)
  np.testing.assert_allclose(out.model_logprobs, sampled.model_logprobs, atol=1e-5, rtol=0)


def test_cache_holds_only_the_latents(tiny_cfg):
  cache = jax.eval_shape(lambda: init_cache(tiny_cfg, B, P + N))
  per_token = tiny_cfg.n_layers * (tiny_cfg.kv_lora_rank + tiny_cfg.qk_rope_head_dim) * 4
  assert sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache)) == B * (P + N) * per_token


def test_bad_inputs_are_refused(tiny_cfg, tiny_params, prompts):
  kw = dict(max_new_tokens=N, rng=jax.random.key(0), eos_id=None, pad_id=PAD)
  with pytest.raises(ValueError, match="prompt_lengths must lie"):
    sample(tiny_cfg, tiny_params, prompts, np.zeros(B, np.int32), **kw)
  with pytest.raises(ValueError, match="not divisible"):
    sample(tiny_cfg, tiny_params, prompts[:6], LENGTHS[:6], mesh=make_mesh((-1, 1, 1, 1)), **kw)
  with pytest.raises(ValueError, match="max_seq_len"):
    sample(tiny_cfg, tiny_params, prompts, LENGTHS, **dict(kw, max_new_tokens=1000))
  with pytest.raises(ValueError, match="top_p"):
    sample(tiny_cfg, tiny_params, prompts, LENGTHS, top_p=0.0, **kw)


# ----------------------------------------------------------------------------
# Sampling, on models whose logits we control.

def _fixed_logits(logits_V, tokens_BxT, positions_BxT, start, valid_BxS):
  """A fake decode whose logits are `logits_V` (its state) at every position."""
  return jnp.broadcast_to(logits_V, tokens_BxT.shape + logits_V.shape), logits_V


_generate = jax.jit(generate, static_argnums=0, static_argnames=(
    "max_new_tokens", "settings", "eos_id", "pad_id"))


def _draw(logits_V, rows: int, steps: int, settings: SamplingConfig, seed: int = 0):
  prompts = jnp.ones((rows, 2), jnp.int32)
  return _generate(_fixed_logits, jnp.asarray(logits_V, jnp.float32), prompts,
                   jnp.full((rows,), 2), jax.random.key(seed), max_new_tokens=steps,
                   settings=settings, eos_id=None, pad_id=0)


def test_sampling_is_deterministic_per_rng(tiny_cfg, tiny_params, prompts, sampled):
  again = sample(tiny_cfg, tiny_params, prompts, LENGTHS, max_new_tokens=N,
                 rng=jax.random.key(3), eos_id=None, pad_id=PAD, **SAMPLING)
  other = sample(tiny_cfg, tiny_params, prompts, LENGTHS, max_new_tokens=N,
                 rng=jax.random.key(4), eos_id=None, pad_id=PAD, **SAMPLING)
  np.testing.assert_array_equal(again.tokens, sampled.tokens)
  np.testing.assert_array_equal(again.logprobs, sampled.logprobs)
  assert (np.asarray(other.tokens) != np.asarray(sampled.tokens)).mean() > 0.3
  # Rows draw independently: two rows with the same prompt still differ.
  same = _draw(np.zeros(16), 2, 32, SamplingConfig())
  assert (np.asarray(same.tokens[0]) != np.asarray(same.tokens[1])).mean() > 0.5


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.6), (5, 0.5)])
def test_top_k_top_p_stay_in_the_allowed_set(top_k, top_p):
  logits_V = np.array([0.5, 3.0, -1.0, 2.5, 0.0, 2.0, 1.5, -2.0, 1.0, 0.2, -0.5, 2.2])
  order = np.argsort(-logits_V)
  probs = np.exp(_log_softmax(logits_V[order]))
  allowed = order[:top_k or len(order)]
  if top_p < 1.0:
    p = probs[:len(allowed)] / probs[:len(allowed)].sum()
    allowed = allowed[:int(((np.cumsum(p) - p) < top_p).sum())]
  out = _draw(logits_V, 64, 32, SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p))
  tokens = np.asarray(out.tokens)
  assert set(np.unique(tokens)) == set(allowed.tolist())  # nothing outside, every one reached
  renorm = _log_softmax(np.where(np.isin(np.arange(len(logits_V)), allowed), logits_V, -np.inf))
  np.testing.assert_allclose(out.logprobs, renorm[tokens], atol=1e-5)
  np.testing.assert_allclose(out.model_logprobs, _log_softmax(logits_V)[tokens], atol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_distribution(temperature):
  logits_V = np.array([2.0, 1.0, 0.0, -1.0])
  rows, steps = 200, 100  # 20,000 draws
  out = _draw(logits_V, rows, steps, SamplingConfig(temperature=temperature), seed=11)
  freq = np.bincount(np.asarray(out.tokens).ravel(), minlength=4) / (rows * steps)
  want = np.exp(_log_softmax(logits_V / temperature))
  se = np.sqrt(want * (1 - want) / (rows * steps))
  assert (np.abs(freq - want) <= 6 * se + 1e-4).all(), (freq, want)
  untempered = np.exp(_log_softmax(logits_V))
  assert (np.abs(freq - untempered) > 20 * se).any()  # the scaling is visible


# ----------------------------------------------------------------------------
# EOS.

EOS = 3


def _stop_at(stop_B, tokens_BxT, positions_BxT, start, valid_BxS):
  """A fake decode: after position p it predicts EOS if p == stop_B, else token 10 + p % 5."""
  want_BxT = jnp.where(positions_BxT == stop_B[:, None], EOS, 10 + positions_BxT % 5)
  return 10.0 * jax.nn.one_hot(want_BxT, 16), stop_B


@pytest.mark.parametrize("stops", [[5, 2, 30, 8], [5, 2, 3, 4]])
def test_rows_stop_independently_at_eos(stops):
  lengths = np.array([3, 1, 4, 2])
  prompts = np.where(np.arange(4)[None] >= 4 - lengths[:, None], 1, PAD).astype(np.int32)
  out = _generate(_stop_at, jnp.asarray(stops), jnp.asarray(prompts), jnp.asarray(lengths),
                  jax.random.key(0), max_new_tokens=8, settings=SamplingConfig(temperature=0.0),
                  eos_id=EOS, pad_id=PAD)
  for b, (n, stop) in enumerate(zip(lengths, stops)):
    # Token j follows the token at position n-1+j; positions show RoPE is right under padding.
    pos = n - 1 + np.arange(8)
    want = np.where(pos == stop, EOS, 10 + pos % 5)
    length = min(stop - (n - 1) + 1, 8)
    want[length:] = PAD
    np.testing.assert_array_equal(out.tokens[b], want)
    np.testing.assert_array_equal(out.mask[b], np.arange(8) < length)
    assert out.lengths[b] == length and bool(out.finished[b]) == (stop - (n - 1) < 8)
    assert (np.asarray(out.logprobs[b, length:]) == 0).all()
  # The loop stops once every row is done, not at max_new_tokens.
  assert int(out.steps) == min(int(np.max(out.lengths)), 8)


def test_rollout_module_path():
  """`r1jax.rl.rollout` is the sampler's module, not a function shadowing it."""
  import r1jax.rl  # noqa: PLC0415
  assert r1jax.rl.rollout.sample is sample
  assert r1jax.rl.rollout.init_cache is init_cache
