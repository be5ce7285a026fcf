"""Small building blocks: RMSNorm, a named-axis linear map, the SwiGLU MLP.

Every parameter is declared with logical axis names; `r1jax.parallel.mesh`
maps those names to mesh axes. Nothing here names a mesh axis.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig


def dtypes(cfg: ModelConfig) -> tuple[jnp.dtype, jnp.dtype]:
  """(compute dtype, parameter dtype) of a config."""
  return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def matmul_2d(x: jnp.ndarray, w: jnp.ndarray, n_in: int, w_in_first: bool = True) -> jnp.ndarray:
  """x's last `n_in` dims contracted with w's first `n_in` (or, w_in_first=False,
  its last `n_in`), as one 2-D matmul: [prod(lead), in] · [in, out].

  Not a tensordot over [B, T, …]: XLA:CPU copies a transposed operand for every
  dot with several contracting dims, which the weight gradient of a [B, T]
  input is, and folds the transpose of a 2-D one into the matmul (bench.peer's
  train step: every dense and head projection's gradient)."""
  lead, size_in = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
  x_2d = x.reshape(math.prod(lead), size_in)
  if w_in_first:
    out = w.shape[n_in:]
    y = x_2d @ w.reshape(size_in, math.prod(out))
  else:
    out = w.shape[:w.ndim - n_in]
    y = jax.lax.dot_general(x_2d, w.reshape(math.prod(out), size_in), (((1,), (1,)), ((), ())))
  return y.reshape(*lead, *out)


def fan_in_init(n_in: int, batch_axes: Sequence[int] = ()) -> nn.initializers.Initializer:
  """Truncated normal with variance 1/fan_in; fan-in is the product of the first `n_in` dims."""

  def init(key, shape, dtype=jnp.float32):
    offset = len(batch_axes)
    fan_in = 1
    for d in shape[offset:offset + n_in]:
      fan_in *= d
    std = fan_in ** -0.5 / 0.87962566103423978  # corrects truncation at ±2σ
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)

  return init


class RMSNorm(nn.Module):
  dim: int
  eps: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (self.dim,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32.astype(self.dtype) * scale.astype(self.dtype))


class Linear(nn.Module):
  """y = x ·(last len(in_shape) dims) kernel[in_shape + out_shape] (+ bias[out_shape])."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]  # logical names of the kernel's dims, inputs first
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  use_bias: bool = False

  def setup(self):
    assert len(self.axes) == len(self.in_shape) + len(self.out_shape), self.axes
    self.kernel = self.param(
        "kernel", nn.with_logical_partitioning(fan_in_init(len(self.in_shape)), self.axes),
        self.in_shape + self.out_shape, self.param_dtype)
    if self.use_bias:
      self.bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                               self.axes[len(self.in_shape):]),
          self.out_shape, self.param_dtype)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = matmul_2d(x.astype(self.dtype), self.kernel.astype(self.dtype), len(self.in_shape))
    return y + self.bias.astype(self.dtype) if self.use_bias else y


class MLP(nn.Module):
  """SwiGLU feed-forward: wo(silu(wi_gate x) * wi_up x)."""
  d_model: int
  d_ff: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Linear((self.d_model,), (self.d_ff,), ("embed", "mlp"), name="wi_gate", **kw)(x)
    up = Linear((self.d_model,), (self.d_ff,), ("embed", "mlp"), name="wi_up", **kw)(x)
    return Linear((self.d_ff,), (self.d_model,), ("mlp", "embed"), name="wo", **kw)(nn.silu(gate) * up)
