"""Checkpoint tensors block by block, sharded arrays tensor by tensor.

The I/O half of r1jax.interop.hf; which checkpoint tensor lands where, and in
which layout, stays in hf_names.py's name table (its `Slot`s, which know how to
read any block of themselves from a sliceable tensor).

  tensor_files  which file holds each tensor;
  Reader        slices of checkpoint tensors, one open handle per file, the
                bytes read counted;
  read_block    any block of an r1jax leaf, assembled from only the tensors
                (and the slices of them) that overlap it;
  make_array    a leaf on a mesh, each process reading only the blocks its
                devices hold, each block read once however many replicas
                (check_sharding first: every axis must split evenly);
  fetch         one stacked slice of a sharded array (one checkpoint tensor)
                on every host, without gathering the rest of the leaf.

A block is a [start, stop) pair per axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import warnings
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open

Block = tuple[tuple[int, int], ...]

INDEX = "model.safetensors.index.json"


class Slot(Protocol):
  """A checkpoint tensor's place in its leaf (hf_names.Slot)."""

  def read(self, tensor: Any, block: Sequence[tuple[int, int]]) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Leaf:
  """An r1jax leaf and the checkpoint tensors it is assembled from."""
  label: str  # for messages: "moe_layers/moe/experts/wo"
  shape: tuple[int, ...]
  dtype: np.dtype
  parts: dict[tuple[int, ...], tuple[str, Slot]]  # stacked position -> (tensor, slot)
  copies: tuple[tuple[str, Slot], ...] = ()  # tensors equal to the (unstacked) leaf

  @property
  def n_stacked(self) -> int:
    return len(next(iter(self.parts)))


class _Counted:
  """A safetensors slice whose reads add to the reader's counts."""

  def __init__(self, reader: Reader, name: str, tensor: Any):
    self._reader, self._name, self._tensor = reader, name, tensor

  def __getitem__(self, index) -> np.ndarray:
    x = self._tensor[index]
    self._reader.bytes_read += x.nbytes
    self._reader.opened.add(self._name)
    return x


class Reader:
  """Reads slices of checkpoint tensors: one handle per file, bytes counted."""

  def __init__(self, files: dict[str, str]):
    self.files = files  # tensor name -> file
    self.bytes_read = 0
    self.opened: set[str] = set()  # tensors read from, wholly or in part
    self.differing: set[str] = set()  # copies already warned about
    self._handles: dict[str, Any] = {}
    self._stack = contextlib.ExitStack()

  def __enter__(self) -> Reader:
    return self

  def __exit__(self, *exc) -> None:
    self._handles.clear()
    self._stack.close()

  def _slice(self, name: str) -> Any:
    file = self.files[name]
    if file not in self._handles:
      self._handles[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
    return self._handles[file].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    """From the file's header; reads no data."""
    return tuple(self._slice(name).get_shape())

  def tensor(self, name: str) -> _Counted:
    return _Counted(self, name, self._slice(name))


def tensor_files(path: str) -> dict[str, str]:
  """Tensor name -> file, from the shard index or every *.safetensors file."""
  index = os.path.join(path, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {path}")
  names: dict[str, str] = {}
  for file in files:
    with safe_open(os.path.join(path, file), framework="numpy") as f:
      for name in f.keys():
        if name in names:
          raise ValueError(f"tensor {name} is in both {names[name]} and {file}")
        names[name] = os.path.join(path, file)
  return names


def read_block(reader: Reader, leaf: Leaf, block: Block) -> np.ndarray:
  """The block of `leaf` in leaf.dtype, reading only what overlaps it; warns
  once per copy that differs from the leaf there."""
  k = leaf.n_stacked
  out = np.empty([b - a for a, b in block], leaf.dtype)
  for pos in itertools.product(*(range(a, b) for a, b in block[:k])):
    name, slot = leaf.parts[pos]
    out[tuple(p - a for p, (a, _) in zip(pos, block))] = slot.read(reader.tensor(name), block[k:])
  for name, slot in leaf.copies:
    if name in reader.differing:
      continue
    copy = slot.read(reader.tensor(name), block).astype(out.dtype)
    if not np.array_equal(copy, out):
      reader.differing.add(name)
      warnings.warn(f"{name} differs from the main model's copy; r1jax shares the main "
                    "embedding and output head, so it is ignored")
  return out


def _block(index: tuple[slice, ...], shape: Sequence[int]) -> Block:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _mesh_axes(entry: Any) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def check_sharding(leaf: Leaf, sharding: NamedSharding) -> None:
  """Raises ValueError unless `sharding` splits every axis of `leaf` evenly."""
  spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
  for n, entry in zip(leaf.shape, spec):
    ways = math.prod(sharding.mesh.shape[a] for a in _mesh_axes(entry))
    if n % ways:
      raise ValueError(f"{leaf.label} {leaf.shape} cannot be split evenly by {P(*spec)} "
                       f"on mesh {dict(sharding.mesh.shape)}: an axis of {n} into {ways}; "
                       "choose mesh axis sizes that divide it")


def make_array(reader: Reader, leaf: Leaf, sharding: NamedSharding) -> jax.Array:
  """`leaf` as a jax.Array with `sharding`, reading only this process's blocks."""
  # make_array_from_callback keeps every addressable shard's value until it has
  # them all, so host arrays would pile up to this process's whole share of the
  # leaf; each block goes onto its first device as soon as it is read instead
  # (replicas are then copied device to device), and the transfer is waited
  # for so that reading never runs ahead of it: the host holds one block.
  first: dict[Block, jax.Device] = {}
  for device, index in sharding.addressable_devices_indices_map(leaf.shape).items():
    first.setdefault(_block(index, leaf.shape), device)
  blocks: dict[Block, jax.Array] = {}

  def callback(index: tuple[slice, ...]) -> jax.Array:
    block = _block(index, leaf.shape)
    if block not in blocks:
      x = jax.device_put(read_block(reader, leaf, block), first[block])
      blocks[block] = x.block_until_ready()
    return blocks[block]

  return jax.make_array_from_callback(leaf.shape, sharding, callback, dtype=leaf.dtype)


# ----------------------------------------------------------------------------
# Fetch: one checkpoint tensor out of a sharded leaf.

def _bits(dtype: np.dtype) -> tuple[Any, Any]:
  """(same-width unsigned dtype, the wider one a cross-device sum runs in)."""
  same = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[np.dtype(dtype).itemsize]
  return same, (jnp.uint64 if same == jnp.uint64 else jnp.uint32)


@functools.lru_cache(maxsize=None)
def _sharded_take(mesh: jax.sharding.Mesh, spec: tuple[Any, ...], k: int):
  """A jitted (x, pos_k) -> x[pos] replicated on every device of `mesh`.

  A jitted dynamic slice would all-gather x along any sharded stacked axis
  first (the offset is unknown at compile time), and a static one compiles
  once per tensor. Here each device slices its own shard, the owner's bits
  are summed with zeros from the others over the stacked axes (bits, so the
  result is exact: -0.0 and NaN payloads survive), and the inner axes are
  gathered: one tensor of traffic and memory, one compile per leaf.
  """
  axes = [_mesh_axes(e) for e in spec]
  stacked = tuple(a for ax in axes[:k] for a in ax)

  def body(x, pos_k):
    start, mine = [], jnp.bool_(True)
    for d in range(k):
      n = x.shape[d]
      lo = lax.axis_index(axes[d]) * n if axes[d] else 0
      mine = mine & (pos_k[d] >= lo) & (pos_k[d] < lo + n)
      start.append(jnp.clip(pos_k[d] - lo, 0, n - 1))
    part = lax.dynamic_slice(x, start + [0] * (x.ndim - k), (1,) * k + x.shape[k:])
    part = part.reshape(x.shape[k:])
    if stacked:
      same, wide = _bits(part.dtype)
      bits = lax.bitcast_convert_type(part, same).astype(wide)
      bits = lax.psum(jnp.where(mine, bits, 0), stacked)
      part = lax.bitcast_convert_type(bits.astype(same), part.dtype)
    for d, ax in enumerate(axes[k:]):
      if ax:
        part = lax.all_gather(part, ax, axis=d, tiled=True)
    return part

  # check_vma off: shard_map types an all_gather's result as still varying
  # over the gathered axes, though every device then holds the same tensor.
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(*spec), P()), out_specs=P(),
                               check_vma=False))


@jax.jit
def _take(x: jax.Array, pos_k: jax.Array) -> jax.Array:
  k = pos_k.shape[0]
  start = [pos_k[d] for d in range(k)] + [0] * (x.ndim - k)
  return lax.dynamic_slice(x, start, (1,) * k + x.shape[k:]).reshape(x.shape[k:])


def fetch(x: Any, pos: tuple[int, ...]) -> np.ndarray:
  """x[pos] as a host array, pos indexing x's leading axes.

  For a jax.Array only that slice moves; with a NamedSharding it is a
  collective, so every process must fetch the same slices in the same order.
  """
  if not isinstance(x, jax.Array):
    return np.asarray(x[pos])
  if not pos and x.is_fully_addressable:
    return np.asarray(x)  # the whole leaf is the tensor: no program to compile
  pos_k = np.asarray(pos, np.int32)
  sharding = x.sharding
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return np.asarray(_sharded_take(sharding.mesh, spec, len(pos))(x, pos_k).addressable_data(0))
  if not x.is_fully_addressable:
    raise ValueError(f"cannot fetch from an array with {type(sharding).__name__} across "
                     "processes; give it a NamedSharding")
  return np.asarray(_take(x, pos_k))
