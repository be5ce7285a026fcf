"""RoPE and YaRN against values worked out by hand, and rotation invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import ModelConfig
from r1jax.model.rope import apply_rope, inverse_frequencies, yarn_ramp_range


def test_v3_yarn_constants_by_hand():
  cfg = ModelConfig.deepseek_v3_671b()
  # mscale = 0.1·ln 40 + 1; softmax scale = 192^-1/2 · mscale² (PAPER_NOTES).
  assert math.isclose(0.1 * math.log(40) + 1, 1.3688879454113936)
  assert math.isclose(cfg.softmax_scale, 192 ** -0.5 * 1.3688879454113936 ** 2, rel_tol=1e-12)
  assert round(cfg.softmax_scale, 5) == 0.13523
  # Ramp ends: 64·ln(4096/(32·2π))/(2 ln 1e4) = 10.47 -> 10; with 1 turn: 22.51 -> 23.
  assert yarn_ramp_range(cfg) == (10, 23)
  inv = inverse_frequencies(cfg)
  base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
  np.testing.assert_allclose(inv[:11], base[:11], rtol=1e-12)  # high frequencies kept
  np.testing.assert_allclose(inv[23:], base[23:] / 40, rtol=1e-12)  # low ones stretched 40x
  ramp = (16 - 10) / 13
  np.testing.assert_allclose(inv[16], base[16] * (1 - ramp) + base[16] / 40 * ramp, rtol=1e-12)


def test_no_yarn_is_plain_rope():
  cfg = ModelConfig.tiny(rope_factor=1.0)
  R = cfg.qk_rope_head_dim
  np.testing.assert_allclose(inverse_frequencies(cfg), 1e4 ** (-np.arange(0, R, 2) / R))
  assert cfg.softmax_scale == cfg.qk_head_dim ** -0.5


@pytest.mark.parametrize("interleaved", [True, False])
def test_scores_depend_on_relative_position_only(interleaved):
  cfg = ModelConfig.tiny(rope_interleaved=interleaved)
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, cfg.qk_rope_head_dim))

  def score(pq, pk):
    rq = apply_rope(q, jnp.array([[pq]]), cfg)
    rk = apply_rope(k, jnp.array([[pk]]), cfg)
    return float(jnp.sum(rq * rk))

  assert abs(score(5, 2) - score(105, 102)) < 1e-4
  assert abs(score(5, 2) - score(5, 3)) > 1e-3
  # A rotation preserves the norm.
  np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, jnp.array([[77]]), cfg)),
                             jnp.linalg.norm(q), rtol=1e-5)


def test_interleaved_equals_half_split_under_permutation():
  cfg_i = ModelConfig.tiny(rope_interleaved=True)
  cfg_h = cfg_i.replace(rope_interleaved=False)
  R = cfg_i.qk_rope_head_dim
  perm = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)])  # pairs -> halves
  x = jax.random.normal(jax.random.key(1), (2, 5, 3, R))
  pos = jnp.arange(10).reshape(2, 5)
  np.testing.assert_allclose(apply_rope(x, pos, cfg_i)[..., perm],
                             apply_rope(x[..., perm], pos, cfg_h), atol=1e-6)
