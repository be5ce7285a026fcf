"""Host-side work on global arrays when each process sees only its own devices.

On a pod every process runs the same program but holds only the rows its
devices hold. Host work on a batch (detokenising, scoring rewards) is split by
row: each row has one owner, the lowest-numbered process holding it, and only
the owner works on it. What the whole job needs afterwards (rewards for group
advantages, metrics, kept datasets) is made global explicitly, here, with
`process_allgather`. With one process every function here is a no-op.

Glossary: R rows (axis 0 of a batch array), Pn processes.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils


def single_process() -> bool:
  return jax.process_count() == 1


def row_owners(x: jax.Array) -> np.ndarray:
  """[R] the process that works on each row of `x`: the lowest-numbered one holding it."""
  n = x.shape[0]
  if single_process() or not isinstance(x, jax.Array):
    return np.zeros(n, np.int32)
  owners = np.full(n, np.iinfo(np.int32).max, np.int32)
  for device, index in x.sharding.devices_indices_map(x.shape).items():
    rows = range(n)[index[0]] if index else range(n)
    owners[rows.start:rows.stop:rows.step] = np.minimum(owners[rows.start:rows.stop:rows.step],
                                                        device.process_index)
  return owners


def my_rows(x: jax.Array) -> np.ndarray:
  """Sorted indices of the rows of `x` this process works on."""
  return np.flatnonzero(row_owners(x) == jax.process_index())


def gather_rows(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
  """The global [n, ...] array on every process, from each owner's `values` at `rows`.

  Every row must have exactly one owner across processes (`my_rows` gives that).
  """
  values = np.asarray(values)
  full = np.zeros((n,) + values.shape[1:], values.dtype)
  full[rows] = values
  if single_process():
    if len(rows) != n:
      raise ValueError(f"one process owns {len(rows)} of {n} rows")
    return full
  owned = np.zeros(n, np.int32)
  owned[rows] = 1
  full_PxR, owned_PxR = _stack(full), _stack(owned)
  counts = owned_PxR.sum(0)
  if np.any(counts != 1):
    raise ValueError(f"rows {np.flatnonzero(counts != 1)[:8].tolist()} have "
                     f"{counts[counts != 1][:8].tolist()} owners; each needs exactly one")
  return full_PxR[owned_PxR.argmax(0), np.arange(n)]


def _stack(x: np.ndarray) -> np.ndarray:
  """[Pn, ...]: every process's host array, bit-exact (sent as bytes: JAX would
  round float64 to float32)."""
  x = np.ascontiguousarray(x)
  raw = x.reshape(-1).view(np.uint8)
  out = np.asarray(multihost_utils.process_allgather(raw))
  return out.view(x.dtype).reshape((out.shape[0],) + x.shape)


def allgather(tree: Any) -> Any:
  """Global jax arrays -> the whole value as numpy on every process."""
  if single_process():
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def sum_over_processes(values: Mapping[str, float]) -> dict[str, float]:
  """Adds up per-process counters (same keys on every process)."""
  keys = sorted(values)
  if single_process() or not keys:
    return {k: float(values[k]) for k in keys}
  local = np.array([float(values[k]) for k in keys], np.float64)
  total = _stack(local).sum(0)
  return dict(zip(keys, map(float, total)))


def barrier(name: str) -> None:
  """Every process waits here until all arrive (e.g. after process 0 wrote a file
  that the others read next)."""
  if not single_process():
    multihost_utils.sync_global_devices(name)
