"""Expert parallelism: routed experts sharded over the `expert` mesh axis, tokens moved to them.

How the model finds the mesh: it does not take one. `jax.set_mesh(mesh)` (the
JAX ≥ 0.7 way to make a mesh ambient for tracing) is read at trace time with
`jax.sharding.get_abstract_mesh()`; when that mesh has an `expert` axis > 1 the
MoE layer calls `ep_dispatch`, which runs the routed experts inside
`jax.shard_map` over the whole mesh. Without an ambient mesh (or with expert
axis 1) the layer stays the single-program dropless dispatch and GSPMD places
it. So `with jax.set_mesh(mesh): step(state, batch)` is all a trainer does.

Inside the shard_map every device holds n tokens (the batch rule splits tokens
over data×fsdp×expert), its L = E/X experts (sliced over `expert`; their hidden
units over `tensor`, partial outputs summed with one psum), and:
  1. marks which of the X peers each token needs (a token routed to several
     experts on one peer travels there once, with up to J = min(K, L) local
     expert ids and combine weights);
  2. lays the (token, peer) pairs out by destination and exchanges them;
  3. runs its local experts on what arrived, by the path `moe.moe_impl` picks
     for that many rows (ids L mark unused choices);
  4. sends the weighted results back, where each token sums its peers' parts.

Two exchanges, `exchange=`:
  "all_to_all"  fixed capacity C rows per peer, `jax.lax.all_to_all`; runs on
      every backend (XLA:CPU included). Dropless by construction at C = n: a
      token is sent to a peer at most once, so no device ever sends more than n
      rows to one peer. Cost: send and receive buffers of X·n rows each, X times
      the layer's input — fine for tests and small X, too much for X = 64.
  "ragged_all_to_all"  `jax.lax.ragged_all_to_all` (GPU/TPU; XLA:CPU rejects
      it): sends exactly the n·min(K, X)-bounded rows it has, and receives into
      R rows, dropless at R = X·n (all peers send all their tokens here).
  "auto" picks ragged_all_to_all on GPU/TPU and all_to_all elsewhere
      (`moe.exchange_impl`, next to the rule for the expert path).

`capacity_factor` > 0 sizes the buffers for the balanced case instead:
C = cf·n·min(K,X)/X per peer, R = cf·n·min(K,X) received rows. If any device
would overflow, a `lax.cond` (same predicate on every device, via pmax) takes
the worst-case-sized branch, so it stays dropless. This saves communication
and expert compute in the common case; the fallback branch's buffers still
count in the compiled peak memory, so it does not lower the worst case.

Glossary: N tokens (global), n tokens per device, D d_model, F expert hidden
size (per tensor shard), E routed experts, X expert-axis size (peers),
L = E/X local experts, K experts per token, J = min(K, L) local choices per
sent row, C rows per peer (all_to_all), S send rows, R receive rows.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P

from r1jax.parallel.mesh import batch_axes

EXPERT = "expert"
TENSOR = "tensor"
EXCHANGES = ("auto", "all_to_all", "ragged_all_to_all")

# Bound here so tests can swap in an all_to_all emulation on CPU.
_ragged_all_to_all = jax.lax.ragged_all_to_all

# routed(w, x [R, D], ids [R, J], gate [R, J], n_experts) -> Σ_j gate_j·expert_{ids_j}(x);
# ids ≥ n_experts add nothing (moe.routed_experts with the config bound).
Routed = Callable[[tuple, jnp.ndarray, jnp.ndarray, jnp.ndarray, int], jnp.ndarray]


def ambient_mesh() -> AbstractMesh | None:
  """The mesh set by `jax.set_mesh`, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def expert_axis_size(mesh) -> int:
  if mesh is None or EXPERT not in mesh.axis_names:
    return 1
  return int(mesh.shape[EXPERT])


def per_device_rows(fn: Callable, mesh, rows: tuple, shared: tuple = ()):
  """fn(*rows, *shared), each device on its own rows (leading axis over the batch
  axes; `shared` replicated), when the ambient mesh splits the rows evenly; else
  a plain call. For row-wise work GSPMD partitions badly: it all-gathers top_k's
  operand over the token axis (the router's [N, E] scores, 17.7 GB a device for
  one 671B minibatch)."""
  batch, n = batch_axes(mesh)
  if n == 1 or rows[0].shape[0] % n:
    return fn(*rows, *shared)
  out_shape = jax.eval_shape(fn, *rows, *shared)
  row_spec = lambda x: P(batch, *([None] * (x.ndim - 1)))  # noqa: E731
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(map(row_spec, rows)) + (P(),) * len(shared),
                       out_specs=jax.tree.map(row_spec, out_shape))(*rows, *shared)


def resolve_exchange(exchange: str) -> str:
  if exchange not in EXCHANGES:
    raise ValueError(f"ep_exchange must be one of {EXCHANGES}, got {exchange!r}")
  from r1jax.model.moe import exchange_impl  # the one "auto" rule (moe imports this module)
  return exchange_impl(exchange)


# ----------------------------------------------------------------------------
# Bookkeeping: pure functions of small integer arrays.

def peers_needed(idx_nxK: jnp.ndarray, n_local: int, n_peers: int) -> jnp.ndarray:
  """need[t, d]: token t is routed to at least one expert on peer d (experts are
  dealt to peers in contiguous runs of n_local)."""
  return jax.nn.one_hot(idx_nxK // n_local, n_peers, dtype=jnp.int32).max(1).astype(bool)


def send_layout(need_nxX: jnp.ndarray, base_X: jnp.ndarray, n_rows: int):
  """Buffer rows of the (token, peer) pairs: peer d's pairs, in token order, from base_X[d].

  Returns (tok_B source token, n for an empty row; dst_B destination peer).
  Pairs past n_rows are dropped; callers size buffers so that never happens.
  """
  n, X = need_nxX.shape
  slot_nxX = jnp.cumsum(need_nxX, 0, dtype=jnp.int32) - 1
  pos_nxX = jnp.where(need_nxX, base_X[None].astype(jnp.int32) + slot_nxX, n_rows).reshape(-1)
  tok_nxX = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, X)).reshape(-1)
  dst_nxX = jnp.broadcast_to(jnp.arange(X, dtype=jnp.int32)[None], (n, X)).reshape(-1)
  tok_B = jnp.full((n_rows,), n, jnp.int32).at[pos_nxX].set(tok_nxX, mode="drop")
  dst_B = jnp.zeros((n_rows,), jnp.int32).at[pos_nxX].set(dst_nxX, mode="drop")
  return tok_B, dst_B


def local_choices(idx_BxK, gate_BxK, dst_B, row_ok_B, n_local: int, n_slots: int):
  """Per buffer row, its destination's expert ids (local numbering, L = none),
  first J = n_slots of them, and their combine weights (0 where none)."""
  local_BxK = idx_BxK - dst_B[:, None] * n_local
  mine_BxK = (local_BxK >= 0) & (local_BxK < n_local) & row_ok_B[:, None]
  key_BxK = jnp.where(mine_BxK, local_BxK, n_local)
  # A token has at most min(K, L) experts on one peer: sorting puts them first.
  pick_BxJ = jnp.argsort(key_BxK, axis=-1, stable=True)[:, :n_slots]
  ids_BxJ = jnp.take_along_axis(key_BxK, pick_BxJ, axis=-1)
  gate_BxJ = jnp.where(ids_BxJ < n_local, jnp.take_along_axis(gate_BxK, pick_BxJ, axis=-1), 0)
  return ids_BxJ.astype(jnp.int32), gate_BxJ


def ragged_offsets(sizes_XxX: jnp.ndarray, me) -> tuple[jnp.ndarray, ...]:
  """`ragged_all_to_all` arguments for device `me` when device s sends sizes[s, d]
  rows to d, senders' rows are grouped by destination and receivers' by source.

  Returns (input_offsets, send_sizes, output_offsets, recv_sizes), each [X]. The
  return trip is the same call with sizes transposed.
  """
  sizes = sizes_XxX.astype(jnp.int32)
  exclusive = lambda a, axis: jnp.cumsum(a, axis) - a
  send_X = sizes[me]
  input_offsets_X = exclusive(send_X, 0)
  # Where my rows land on receiver d: after the rows of senders s < me.
  output_offsets_X = exclusive(sizes, 0)[me]
  recv_X = sizes[:, me]
  return input_offsets_X, send_X, output_offsets_X, recv_X


def capacities(n: int, k: int, n_peers: int, capacity_factor: float):
  """Static buffer sizes: (C per peer, R received rows, S sent rows, their worst cases)."""
  pairs = n * min(k, n_peers)  # (token, peer) pairs a device can make
  c_max, r_max = n, n_peers * n
  if capacity_factor <= 0:
    return c_max, r_max, pairs, c_max, r_max
  c = min(max(math.ceil(capacity_factor * pairs / n_peers), 1), c_max)
  r = min(max(math.ceil(capacity_factor * pairs), 1), r_max)
  return c, r, pairs, c_max, r_max


# ----------------------------------------------------------------------------
# The per-device program.

def _exchange(kind: str, x_nxD, idx_nxK, gate_nxK, need_nxX, sizes_XxX, w, routed, *,
              n_local: int, cap: int, n_send: int):
  """One round trip; returns this device's tokens' routed output [n, D] (partial over tensor)."""
  n, D = x_nxD.shape
  X = need_nxX.shape[1]
  J = min(idx_nxK.shape[1], n_local)
  if kind == "all_to_all":
    n_rows = X * cap
    base_X = jnp.arange(X, dtype=jnp.int32) * cap
  else:
    n_rows = n_send
    base_X = jnp.cumsum(need_nxX.sum(0, dtype=jnp.int32)) - need_nxX.sum(0, dtype=jnp.int32)
  tok_B, dst_B = send_layout(need_nxX, base_X, n_rows)
  row_ok_B = tok_B < n
  safe_B = jnp.minimum(tok_B, n - 1)
  x_BxD = jnp.where(row_ok_B[:, None], x_nxD[safe_B], 0)
  ids_BxJ, g_BxJ = local_choices(idx_nxK[safe_B], gate_nxK[safe_B], dst_B, row_ok_B, n_local, J)

  if kind == "all_to_all":
    def back(a):  # row block d goes to peer d; block s of the result came from s
      return jax.lax.all_to_all(a.reshape(X, cap, *a.shape[1:]), EXPERT, 0, 0).reshape(a.shape)

    def there(a, fill=0):  # empty slots already hold x = 0, id = L, gate = 0
      return back(a)
  else:
    me = jax.lax.axis_index(EXPERT)
    fwd, bwd = ragged_offsets(sizes_XxX, me), ragged_offsets(sizes_XxX.T, me)

    def there(a, fill=0):
      out = jnp.full((cap,) + a.shape[1:], fill, a.dtype)
      return _ragged_all_to_all(a, out, *fwd, axis_name=EXPERT)

    def back(a):
      out = jnp.zeros((n_rows,) + a.shape[1:], a.dtype)
      return _ragged_all_to_all(a, out, *bwd, axis_name=EXPERT)

  y_RxD = routed(w, there(x_BxD), there(ids_BxJ, n_local), there(g_BxJ), n_local)
  y_BxD = back(y_RxD)
  return jnp.zeros((n, D), y_BxD.dtype).at[tok_B].add(y_BxD, mode="drop")


def _ep_chunked(x_nxD, idx_nxK, gate_nxK, *w, chunk: int, **kw):
  """The round trip over chunks of `chunk` tokens, one after another.

  Every buffer of the exchange (and its dropless worst case, X·chunk received
  rows) scales with the chunk, not with this device's n tokens. Each chunk is
  rematerialised in the backward pass, so only its inputs are saved. Padding
  tokens carry expert id E (no peer needs them) and gate 0.
  """
  n, K = idx_nxK.shape
  if chunk <= 0 or chunk >= n:
    return _ep_local(x_nxD, idx_nxK, gate_nxK, *w, **kw)
  q = -(-n // chunk)
  pad = q * chunk - n
  E = w[0].shape[0] * kw["n_peers"]
  x = jnp.pad(x_nxD, ((0, pad), (0, 0))).reshape(q, chunk, -1)
  idx = jnp.pad(idx_nxK, ((0, pad), (0, 0)), constant_values=E).reshape(q, chunk, K)
  gate = jnp.pad(gate_nxK, ((0, pad), (0, 0))).reshape(q, chunk, K)
  one = jax.checkpoint(lambda xs, ids, gs: _ep_local(xs, ids, gs, *w, **kw))
  _, y_qxcxD = jax.lax.scan(lambda _, inp: (None, one(*inp)), None, (x, idx, gate))
  return y_qxcxD.reshape(q * chunk, -1)[:n]


def _ep_local(x_nxD, idx_nxK, gate_nxK, wi_gate, wi_up, wo, *, routed: Routed, kind: str,
              n_peers: int, capacity_factor: float, batch_axes: tuple[str, ...],
              tensor: bool):
  n, K = idx_nxK.shape
  L = wi_gate.shape[0]
  w = (wi_gate, wi_up, wo)
  need_nxX = peers_needed(idx_nxK, L, n_peers)
  sizes_XxX = None
  if kind == "ragged_all_to_all":  # the expert group's pair counts: [source, destination]
    sizes_XxX = jax.lax.all_gather(need_nxX.sum(0, dtype=jnp.int32), EXPERT)
  c, r, s, c_max, r_max = capacities(n, K, n_peers, capacity_factor)
  cap, cap_max = (c, c_max) if kind == "all_to_all" else (r, r_max)
  run = functools.partial(_exchange, kind, x_nxD, idx_nxK, gate_nxK, need_nxX, sizes_XxX, w,
                          routed, n_local=L, n_send=s)
  if cap >= cap_max:
    y_nxD = run(cap=cap_max)
  else:
    count_X = need_nxX.sum(0, dtype=jnp.int32)
    if kind == "all_to_all":  # the most rows any device sends one peer
      load = jax.lax.pmax(count_X.max(), batch_axes)
    else:  # the most rows any device receives
      load = jax.lax.pmax(jax.lax.psum(count_X, EXPERT).max(),
                          tuple(a for a in batch_axes if a != EXPERT))
    # One predicate on every device (tokens, hence counts, are equal across
    # `tensor`), so every collective group takes the same branch.
    y_nxD = jax.lax.cond(load > cap, lambda: run(cap=cap_max), lambda: run(cap=cap))
  return jax.lax.psum(y_nxD, TENSOR) if tensor else y_nxD


def ep_dispatch(routed: Routed, w: tuple, x_NxD, idx_NxK, gate_NxK, mesh, *,
                exchange: str = "auto", capacity_factor: float = 0.0,
                chunk_tokens: int = 0) -> jnp.ndarray:
  """Σ_k gate_k · expert_{idx_k}(x) with the routed experts sharded over `expert`.

  w = (wi_gate [E,D,F], wi_up [E,D,F], wo [E,F,D]); `routed` runs the local
  experts (see Routed). chunk_tokens > 0: each device exchanges its tokens in
  chunks of that many (`_ep_chunked`). Equals the single-device layer up to
  float summation order; drops nothing.
  """
  X = expert_axis_size(mesh)
  E, _, F = w[0].shape
  N = x_NxD.shape[0]
  batch, n_batch = batch_axes(mesh)
  tp = int(mesh.shape[TENSOR]) if TENSOR in mesh.axis_names else 1
  if E % X:
    raise ValueError(f"n_routed_experts={E} must be a multiple of the expert mesh axis ({X}); "
                     f"change the mesh or the expert count.")
  if N % n_batch:
    raise ValueError(f"{N} tokens do not split over the {n_batch} devices of mesh axes {batch}; "
                     f"use a batch size that is a multiple of {n_batch}.")
  if F % tp:
    raise ValueError(f"moe_d_ff={F} must be a multiple of the tensor mesh axis ({tp}).")
  tensor = TENSOR if TENSOR in mesh.axis_names else None
  tok = P(batch, None)
  fn = functools.partial(_ep_chunked, chunk=chunk_tokens, routed=routed,
                         kind=resolve_exchange(exchange), n_peers=X,
                         capacity_factor=capacity_factor, batch_axes=batch,
                         tensor=tensor is not None)
  return jax.shard_map(
      fn, mesh=mesh,
      in_specs=(tok, tok, tok, P(EXPERT, None, tensor), P(EXPERT, None, tensor),
                P(EXPERT, tensor, None)),
      out_specs=tok)(x_NxD, idx_NxK, gate_NxK.astype(x_NxD.dtype), *w)
