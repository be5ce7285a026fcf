"""Expert parallelism on 8 CPU devices equals the single-device model.

The MoE layer (outputs and every gradient) and a whole SFT step (loss, grad
norm, updated params) are compared across meshes against no mesh at all. The
ragged_all_to_all path cannot run on XLA:CPU, so its bookkeeping is checked
against a NumPy model of the collective, and the whole path runs with the
collective emulated by all_to_all.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax.model import ModelConfig, init_params, logical_axes
from r1jax.model.moe import MoE
from r1jax.parallel import expert_parallel as ep
from r1jax.parallel import mesh as mesh_lib
from r1jax.train import sft

MESHES = [(8, 1, 1, 1), (2, 1, 4, 1), (1, 2, 4, 1), (1, 1, 4, 2), (1, 1, 8, 1)]
B, T = 8, 8


# ----------------------------------------------------------------------------
# Bookkeeping, without devices.

def _simulate_ragged_all_to_all(operands, outputs, args):
  """NumPy model of jax.lax.ragged_all_to_all over X devices (its docstring's pseudocode)."""
  X = len(operands)
  results = [o.copy() for o in outputs]
  for src in range(X):
    in_off, send, out_off, _ = args[src]
    for dst in range(X):
      rows = operands[src][in_off[dst]:in_off[dst] + send[dst]]
      results[dst][out_off[dst]:out_off[dst] + send[dst]] = rows
  for dst in range(X):  # recv_sizes must agree with what arrived
    np.testing.assert_array_equal([args[s][1][dst] for s in range(X)], args[dst][3])
  return results


def test_ragged_offsets_round_trip():
  rng = np.random.default_rng(0)
  X, n, L, K = 4, 6, 2, 3
  idx = [np.stack([rng.choice(X * L, K, replace=False) for _ in range(n)]) for _ in range(X)]
  need = [np.asarray(ep.peers_needed(jnp.asarray(i), L, X)) for i in idx]
  sizes = np.stack([nd.sum(0) for nd in need])  # [src, dst]
  send_rows = n * min(K, X)
  layouts = []
  for d in range(X):
    base = np.cumsum(sizes[d]) - sizes[d]
    tok, dst = ep.send_layout(jnp.asarray(need[d]), jnp.asarray(base), send_rows)
    layouts.append((np.asarray(tok), np.asarray(dst)))
  # Payload: (source device, token, destination) per row, -1 in empty rows.
  payload = [np.where((tok < n)[:, None], np.stack([np.full_like(tok, d), tok, dst], 1), -1)
             for d, (tok, dst) in enumerate(layouts)]
  fwd = [[np.asarray(a) for a in ep.ragged_offsets(jnp.asarray(sizes), d)] for d in range(X)]
  R = X * n
  got = _simulate_ragged_all_to_all(payload, [np.full((R, 3), -1)] * X, fwd)
  for d in range(X):
    want = [(s, t, d) for s in range(X) for t in range(n) if need[s][t, d]]  # by source, token
    np.testing.assert_array_equal(got[d][:len(want)], np.array(want).reshape(-1, 3))
    assert (got[d][len(want):] == -1).all()
  bwd = [[np.asarray(a) for a in ep.ragged_offsets(jnp.asarray(sizes.T), d)] for d in range(X)]
  back = _simulate_ragged_all_to_all(got, [np.full((send_rows, 3), -1)] * X, bwd)
  for d in range(X):
    np.testing.assert_array_equal(back[d], payload[d])


def test_local_choices_keep_only_the_destinations_experts():
  idx = jnp.array([[5, 0, 4], [1, 2, 3]])  # L = 2: peers 0:{0,1} 1:{2,3} 2:{4,5}
  gate = jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
  dst = jnp.array([2, 1])
  ids, g = ep.local_choices(idx, gate, dst, jnp.array([True, True]), 2, 2)
  np.testing.assert_array_equal(ids, [[0, 1], [0, 1]])  # ascending local ids
  np.testing.assert_allclose(g, [[0.2, 0.5], [0.6, 0.3]])


def test_capacities_are_dropless_bounds():
  c, r, s, c_max, r_max = ep.capacities(n=16, k=4, n_peers=8, capacity_factor=0.0)
  assert (c, r, s) == (16, 128, 64) and (c_max, r_max) == (16, 128)
  c, r, _, _, _ = ep.capacities(n=16, k=4, n_peers=8, capacity_factor=1.0)
  assert (c, r) == (8, 64)


# ----------------------------------------------------------------------------
# The MoE layer on meshes.

def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
  """ragged_all_to_all from all_to_all: each slice padded to the operand's length."""
  rows = operand.shape[0]
  r = jnp.arange(rows)
  src_XxN = jnp.minimum(input_offsets[:, None] + r, rows - 1)
  ok_XxN = r < send_sizes[:, None]
  trail = (slice(None), slice(None)) + (None,) * (operand.ndim - 1)
  packed = jnp.where(ok_XxN[trail], operand[src_XxN], 0)
  recv = jax.lax.all_to_all(packed, axis_name, 0, 0)
  at_X = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  dst_XxN = jnp.where(r < recv_sizes[:, None], at_X[:, None] + r, output.shape[0])
  return output.at[dst_XxN.reshape(-1)].set(recv.reshape((-1,) + operand.shape[1:]),
                                            mode="drop")


CFG = ModelConfig.tiny(grouped_matmul="blocked", gmm_block_size=8)


@functools.lru_cache(maxsize=None)
def _layer_fn(cfg: ModelConfig):
  """Jitted (params, x, valid, cot) -> (y, load, (dparams, dx)) of Σ y·cot."""
  def f(params, x, valid, cot):
    def loss(p, x):
      y, aux = MoE(cfg).apply({"params": p}, x, valid)
      return jnp.sum(y * cot), (y, aux["load"])
    (_, (y, load)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, load, grads
  return jax.jit(f)


@pytest.fixture(scope="module")
def layer_case():
  """MoE params and their logical specs, input, cotangent, and the no-mesh result."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (B, T, CFG.d_model))
  valid = jnp.ones((B, T), bool).at[1, 5:].set(False)
  boxed = jax.eval_shape(lambda k: MoE(CFG).init(k, x, valid), keys[1])["params"]
  params = jax.jit(lambda k: nn.unbox(MoE(CFG).init(k, x, valid)["params"]))(keys[1])
  cot = jax.random.normal(keys[2], x.shape)
  want = _layer_fn(CFG)(params, x, valid, cot)
  return params, nn.get_partition_spec(boxed), x, valid, cot, want


def _on_mesh(shape, cfg, case):
  params, specs, x, valid, cot, _ = case
  mesh = mesh_lib.make_mesh(shape)
  place = lambda a: jax.device_put(a, mesh_lib.batch_sharding(mesh, a.ndim))
  params = jax.device_put(params, mesh_lib.logical_sharding(mesh, specs))
  with jax.set_mesh(mesh):
    return _layer_fn(cfg)(params, place(x), place(valid), place(cot))


def _assert_trees_close(got, want, tol):
  paths, got_leaves = zip(*jax.tree_util.tree_leaves_with_path(got))
  for path, g, w in zip(paths, got_leaves, jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("shape", MESHES)
def test_moe_layer_matches_single_device(layer_case, shape):
  _assert_trees_close(_on_mesh(shape, CFG, layer_case), layer_case[-1], 1e-5)


@pytest.mark.parametrize("shape", [(2, 1, 2, 2), (1, 2, 4, 1)])
def test_sorted_path_matches_single_device(layer_case, shape):
  """XLA:CPU's "sorted" experts (a hand-written backward) on each device's local
  experts: the weight gradients are summed over data/fsdp and the row gradients
  over tensor as autodiff would, so every number equals the no-mesh run's."""
  _assert_trees_close(_on_mesh(shape, CFG.replace(grouped_matmul="sorted"), layer_case),
                      layer_case[-1], 1e-5)


# cf 0: worst-case receive buffer; cf 1.5: a smaller one with the fallback compiled in.
@pytest.mark.parametrize("shape,capacity_factor", [((1, 1, 8, 1), 0.0), ((1, 2, 4, 1), 1.5)])
def test_ragged_path_matches_single_device(layer_case, monkeypatch, shape, capacity_factor):
  monkeypatch.setattr(ep, "_ragged_all_to_all", _emulated_ragged_all_to_all)
  cfg = CFG.replace(ep_exchange="ragged_all_to_all", ep_capacity_factor=capacity_factor)
  _assert_trees_close(_on_mesh(shape, cfg, layer_case), layer_case[-1], 1e-5)


def test_capacity_fallback_stays_dropless(layer_case):
  # One row per peer (a quarter of the balanced load) overflows, so the worst-case branch runs.
  cfg = CFG.replace(ep_exchange="all_to_all", ep_capacity_factor=0.25)
  _assert_trees_close(_on_mesh((2, 1, 4, 1), cfg, layer_case), layer_case[-1], 1e-5)


# 8 tokens per device in chunks of 3 (the last one padded), worst-case and capacity buffers.
@pytest.mark.parametrize("exchange,capacity_factor", [("all_to_all", 0.0), ("all_to_all", 1.5)])
def test_chunked_exchange_matches_single_device(layer_case, exchange, capacity_factor):
  cfg = CFG.replace(ep_exchange=exchange, ep_capacity_factor=capacity_factor, ep_chunk_tokens=3)
  _assert_trees_close(_on_mesh((1, 2, 4, 1), cfg, layer_case), layer_case[-1], 1e-5)


def test_indivisible_tokens_are_reported(layer_case):
  params, _, x, valid, cot, _ = layer_case
  with jax.set_mesh(mesh_lib.make_mesh((1, 1, 8, 1))), pytest.raises(ValueError, match="multiple of 8"):
    _layer_fn(CFG)(params, x[:1, :3], valid[:1, :3], cot[:1, :3])


# ----------------------------------------------------------------------------
# A whole SFT step on meshes.

@pytest.fixture(scope="module")
def step_case():
  """Tiny-model state, batch, the jitted step, and its no-mesh result.

  Plain SGD, so updated params carry the gradients' differences (Adam's first
  step is ±lr whatever the gradient's size).
  """
  cfg = ModelConfig.tiny(grouped_matmul="blocked")
  optimizer = optax.sgd(0.5)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  state = sft.init_state(params, optimizer)
  tokens = jax.random.randint(jax.random.key(1), (B, 2 * T), 0, cfg.vocab_size)
  valid = jnp.ones((B, 2 * T), jnp.int32).at[2, 11:].set(0)
  batch = {"tokens": tokens, "loss_mask": valid, "valid": valid}
  step = jax.jit(sft.make_train_step(cfg, optimizer))
  want = step(state, batch)
  return cfg, state, batch, step, want


# Each mesh costs a compile of the whole step (~20 s on 2 idle cores), so the step
# runs on the meshes that mix axes; the MoE layer above runs on all of them, and
# the smoke experiments run whole stages on (8, 1, 1, 1) and (1, 1, 8, 1). One
# xdist worker runs these tests, so step_case (a compile too) is computed once.
STEP_MESHES = [(2, 1, 4, 1), (1, 2, 4, 1), (1, 1, 4, 2)]


@pytest.mark.xdist_group("ep_step")
@pytest.mark.parametrize("shape", STEP_MESHES)
def test_train_step_matches_single_device(step_case, shape):
  cfg, state, batch, step, (want_state, want_m) = step_case
  mesh = mesh_lib.make_mesh(shape)
  param_sharding = mesh_lib.logical_sharding(mesh, logical_axes(cfg))
  state = jax.device_put(state, sft.TrainState(
      step=mesh_lib.replicated(mesh), params=param_sharding,
      opt_state=jax.tree.map(lambda _: mesh_lib.replicated(mesh), state.opt_state)))
  batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    got_state, got_m = step(state, batch)
  for k in ("loss", "lm_loss", "mtp_loss", "grad_norm", "max_vio"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
  _assert_trees_close(got_state.params, want_state.params, 1e-5)


@pytest.mark.xdist_group("ep_step")
def test_sequence_parallel_step_matches_single_device(step_case):
  """The residual stream split over `tensor` along the sequence between blocks
  (B=8 over expert=4, 16 positions over tensor=2) changes no number."""
  cfg, state, batch, _, (want_state, want_m) = step_case
  sp_cfg = cfg.replace(sequence_parallel=True)
  mesh = mesh_lib.make_mesh((1, 1, 4, 2))
  param_sharding = mesh_lib.logical_sharding(mesh, logical_axes(sp_cfg))
  state = jax.device_put(state, sft.TrainState(
      step=mesh_lib.replicated(mesh), params=param_sharding,
      opt_state=jax.tree.map(lambda _: mesh_lib.replicated(mesh), state.opt_state)))
  batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
  step = jax.jit(sft.make_train_step(sp_cfg, optax.sgd(0.5)))
  with jax.set_mesh(mesh):
    lowered = step.lower(state, batch)
    got_state, got_m = step(state, batch)
  # The constraint is in the program: some value is split [batch, sequence over tensor].
  assert any("sharding_constraint" in line and '{"tensor"}, {}]>' in line
             for line in lowered.as_text().splitlines()), "no sequence-parallel constraint"
  for k in ("loss", "lm_loss", "mtp_loss", "grad_norm", "max_vio"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
  _assert_trees_close(got_state.params, want_state.params, 1e-5)
