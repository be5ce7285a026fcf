"""Rotary position embedding with YaRN or Llama-3 context extension.

The rotated dims are `cfg.rope_dim`: MLA's qk_rope_head_dim, or a whole GQA head.

YaRN (Peng et al. 2023, as used by DeepSeek-V3): each rotary frequency is
interpolated between its original value (high frequencies, kept) and the value
divided by `factor` (low frequencies, stretched), with a linear ramp between the
dimensions `low` and `high` where the original context covers `beta_fast` and
`beta_slow` full turns. Attention logits are sharpened by mscale² (in MLA's
softmax scale, see `ModelConfig.softmax_scale`).

Llama-3 ("llama3", Llama-3.1): wavelengths longer than original/low_freq_factor
are divided by `factor`, shorter than original/high_freq_factor kept, and those
between blended by a ramp in original/wavelength; no attention temperature.

Glossary: B batch, T sequence, H heads, R rotary dims.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from r1jax.model.config import ModelConfig, yarn_mscale


def _correction_dim(n_turns: float, dim: int, base: float, max_pos: int) -> float:
  """The rotary dimension whose wavelength fits `n_turns` times into `max_pos`."""
  return dim * math.log(max_pos / (n_turns * 2 * math.pi)) / (2 * math.log(base))


def yarn_ramp_range(cfg: ModelConfig) -> tuple[int, int]:
  """[low, high] pair indices of the interpolation ramp (floor/ceil, clamped)."""
  dim = cfg.rope_dim
  low = math.floor(_correction_dim(cfg.beta_fast, dim, cfg.rope_theta, cfg.original_max_position))
  high = math.ceil(_correction_dim(cfg.beta_slow, dim, cfg.rope_theta, cfg.original_max_position))
  return max(low, 0), min(high, dim - 1)


def _llama3_frequencies(inv_freq: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """Llama-3.1's piecewise rescaling of the rotary frequencies."""
  wavelen = 2 * np.pi / inv_freq
  old = cfg.original_max_position
  lo, hi = cfg.low_freq_factor, cfg.high_freq_factor
  smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
  # smooth = 0 (long wavelengths): divide by factor; 1 (short ones): keep.
  return inv_freq / cfg.rope_factor * (1.0 - smooth) + inv_freq * smooth


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Per-pair angular frequencies [R/2] in float64, rescaled if enabled."""
  dim = cfg.rope_dim
  inv_freq = cfg.rope_theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  if cfg.use_llama3_rope:
    return _llama3_frequencies(inv_freq, cfg)
  if not cfg.use_yarn:
    return inv_freq
  low, high = yarn_ramp_range(cfg)
  if low == high:
    high += 0.001  # avoids 0/0 in the ramp, as the reference implementations do
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  # ramp = 0: keep the original frequency (extrapolate); 1: divide by factor.
  return inv_freq * (1.0 - ramp) + (inv_freq / cfg.rope_factor) * ramp


def rotary_amplitude(cfg: ModelConfig) -> float:
  """Scale applied to cos/sin: mscale(mscale)/mscale(mscale_all_dim) (1 for V3)."""
  if not cfg.use_yarn:
    return 1.0
  return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)


def apply_rope(x_BxTxHxR: jnp.ndarray, pos_BxT: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
  """Rotates the last dimension by position; computed in float32.

  `cfg.rope_interleaved` picks the pair layout: adjacent pairs (x[2i], x[2i+1])
  as in the official checkpoints, or halves (x[i], x[i + R/2]).
  """
  inv_freq = jnp.asarray(inverse_frequencies(cfg), jnp.float32)
  angle_BxTxK = pos_BxT.astype(jnp.float32)[..., None] * inv_freq
  amp = rotary_amplitude(cfg)
  cos = (jnp.cos(angle_BxTxK) * amp)[:, :, None, :]
  sin = (jnp.sin(angle_BxTxK) * amp)[:, :, None, :]
  x = x_BxTxHxR.astype(jnp.float32)
  if cfg.rope_interleaved:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
  else:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxR.dtype)
