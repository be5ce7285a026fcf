"""The device mesh and the one table that maps logical axes to mesh axes.

Mesh axes: data (pure data parallel), fsdp (data parallel with sharded
parameters and optimizer state), expert (routed experts; also a batch axis
outside the MoE layers), tensor (heads and MLP hidden units). Parameters name
logical axes only (see r1jax/model); `RULES` decides where they live.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "tensor")
BATCH = ("data", "fsdp", "expert")

# logical axis -> mesh axis (or axes, or None = replicated). The one rule table.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mtp_embed", None),
    ("heads", "tensor"),
    # GQA's key/value heads: few (2 in Qwen2.5-1.5B, 8 in Llama-3-8B), often fewer
    # than the tensor axis, so their small projections stay whole on every device.
    ("kv_heads", None),
    ("head_dim", None),
    # The low-rank inputs of wq_b / wkv_b shard over fsdp (flax leaves a mesh axis
    # out when an earlier dimension already took it, so wq_a / wkv_a stay [fsdp, -]).
    ("q_lora", "fsdp"),
    ("kv_lora", "fsdp"),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("exp_mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(shape: Sequence[int] | Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry to "the rest of the devices" and checks the product."""
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(AXES)
    if unknown:
      raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the axes are {AXES}.")
    shape = [shape.get(a, 1) for a in AXES]
  shape = list(shape)
  if len(shape) != len(AXES):
    raise ValueError(f"mesh shape {shape} must have {len(AXES)} entries for axes {AXES}.")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f"mesh shape {shape} does not divide {n_devices} devices.")
    shape[shape.index(-1)] = n_devices // known
  if int(np.prod(shape)) != n_devices:
    raise ValueError(f"mesh shape {tuple(shape)} uses {int(np.prod(shape))} devices, "
                     f"but {n_devices} are present; use -1 for one axis to take the rest.")
  return tuple(shape)


def make_mesh(shape: Sequence[int] | Mapping[str, int] = (-1, 1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  resolved = mesh_shape(shape, len(devices))
  return jax.make_mesh(resolved, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def logical_sharding(mesh: Mesh, logical_spec_tree):
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, RULES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading axis over every data-parallel mesh axis, the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def batch_axes(mesh) -> tuple[tuple[str, ...], int]:
  """(the batch axes `mesh` has, the devices they span); ((), 1) for no mesh."""
  if mesh is None or mesh.empty:
    return (), 1
  axes = tuple(a for a in BATCH if a in mesh.axis_names)
  return axes, int(np.prod([mesh.shape[a] for a in axes]))


def shard_batch(x: jax.Array) -> jax.Array:
  """Pins x's leading (batch or token) axis to the batch axes of the ambient mesh
  (`jax.set_mesh`); a no-op without one or where the axis does not divide."""
  mesh = jax.sharding.get_abstract_mesh()
  axes, n = batch_axes(mesh)
  if not axes or x.shape[0] % n:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def shard_sequence(x: jax.Array) -> jax.Array:
  """Sequence parallelism's layout of the residual stream [B, T, D]: the batch over
  the batch axes and T over `tensor` of the ambient mesh (Megatron's SP, so each
  layer's saved input is 1/tensor of the sequence); `shard_batch` where the
  mesh has no tensor axis > 1 or the shape does not divide."""
  mesh = jax.sharding.get_abstract_mesh()
  axes, n = batch_axes(mesh)
  tp = mesh.shape["tensor"] if axes and "tensor" in mesh.axis_names else 1
  if tp == 1 or x.shape[0] % n or x.shape[1] % tp:
    return shard_batch(x)
  return jax.lax.with_sharding_constraint(x, P(axes, "tensor", *([None] * (x.ndim - 2))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
