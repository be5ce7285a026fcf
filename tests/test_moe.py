"""DeepSeekMoE: routing by hand, every routed-expert path against the dense
reference (layer outputs, gradients and aux), the grouped matmuls against
ragged_dot, the "auto" rule."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from r1jax.model import ModelConfig, moe
from r1jax.model.layers import MLP
from r1jax.model.grouped import (block_layout, dispatch_layout, dropless_dispatch,
                                 permute_rows, take_rows)
from r1jax.model.moe import (MoE, PATHS, dense_reference, expert_load, moe_impl, route,
                             routed_experts, sequence_balance_loss, update_router_bias)

CFG = ModelConfig.tiny(n_routed_experts=8, n_expert_groups=4, n_limited_groups=2,
                       n_activated_experts=2, route_scale=2.5)
# Experts in groups of two: (e0 e1) (e2 e3) (e4 e5) (e6 e7).
SCORES = np.array([0.9, 0.1, 0.6, 0.5, 0.7, 0.2, 0.3, 0.3])
LOGITS = jnp.asarray(np.log(SCORES / (1 - SCORES)))[None]


def test_group_limited_routing_by_hand():
  # Group scores (sum of top-2): 1.0, 1.1, 0.9, 0.6 -> groups 1 and 0 stay. e4 (0.7)
  # beats e2 (0.6) but its group is out, so the top-2 are e0 and e2.
  _, idx, w = route(LOGITS, jnp.zeros(8), CFG)
  assert sorted(idx[0].tolist()) == [0, 2]
  np.testing.assert_allclose(jnp.sort(w[0]), [0.6 / 1.5 * 2.5, 0.9 / 1.5 * 2.5], rtol=1e-5)


def test_bias_changes_selection_not_weights():
  # +0.3 on e4, e5 lifts group 2 to 1.5: groups 2 and 1 stay; biased top-2 = e4 (1.0), e2 (0.6).
  bias = jnp.array([0, 0, 0, 0, 0.3, 0.3, 0, 0], jnp.float32)
  _, idx, w = route(LOGITS, bias, CFG)
  assert sorted(idx[0].tolist()) == [2, 4]
  # Weights use the unbiased scores 0.7 and 0.6.
  order = jnp.argsort(idx[0])
  np.testing.assert_allclose(w[0][order], [0.6 / 1.3 * 2.5, 0.7 / 1.3 * 2.5], rtol=1e-5)


def test_softmax_scoring_without_normalisation():
  cfg = CFG.replace(score_func="softmax", norm_topk_prob=False, route_scale=1.0)
  scores, idx, w = route(LOGITS, jnp.zeros(8), cfg)
  np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w, jnp.take_along_axis(scores, idx, 1), rtol=1e-6)


def test_bias_update_rule():
  load = jnp.array([3.0, 1.0, 2.0, 2.0])
  np.testing.assert_allclose(update_router_bias(jnp.zeros(4), load, 0.001),
                             [-0.001, 0.001, 0.0, 0.0])


def test_expert_load_and_balance_loss_by_numpy():
  rng = np.random.default_rng(0)
  B, T, E, K = 2, 5, 8, 2
  scores = rng.uniform(0.05, 1, (B, T, E)).astype(np.float32)
  idx = np.argsort(-scores, -1)[..., :K]
  valid = np.ones((B, T), bool)
  valid[1, 3:] = False
  load = expert_load(jnp.asarray(idx.reshape(-1, K)), jnp.asarray(valid.reshape(-1)), E)
  want_load = np.zeros(E)
  for b in range(B):
    for t in range(T):
      if valid[b, t]:
        want_load[idx[b, t]] += 1
  np.testing.assert_allclose(load, want_load)
  want = []
  for b in range(B):
    n = valid[b].sum()
    f = np.zeros(E)
    p = np.zeros(E)
    for t in range(T):
      if valid[b, t]:
        f[idx[b, t]] += E / (K * n)
        p += scores[b, t] / scores[b, t].sum() / n
    want.append((f * p).sum())
  got = sequence_balance_loss(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(valid), K)
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


@pytest.fixture(scope="module")
def dispatch_case():
  N, D, F, E, K = 24, 16, 8, 8, 2
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (N, D))
  experts = (jax.random.normal(keys[1], (E, D, F)) / 4, jax.random.normal(keys[2], (E, D, F)) / 4,
             jax.random.normal(keys[3], (E, F, D)) / 3)
  _, idx, w = route(jax.random.normal(keys[4], (N, E)), jnp.zeros(E), CFG)
  # Make some experts idle and one crowded, so empty and large groups are both covered.
  idx = idx.at[:10, 0].set(3)
  return x, experts, idx, w


def _ragged(x, experts, idx, w):
  return dropless_dispatch(experts, x, idx, w, 8, "ragged_dot")


def test_dropless_equals_dense_reference(dispatch_case):
  x, experts, idx, w = dispatch_case
  np.testing.assert_allclose(_ragged(x, experts, idx, w), dense_reference(experts, x, idx, w, 8),
                             atol=1e-5, rtol=1e-5)


def test_dropless_gradients_equal_dense_reference(dispatch_case):
  x, experts, idx, w = dispatch_case
  cot = jax.random.normal(jax.random.key(9), (x.shape[0], x.shape[1]))

  def loss(fn):
    return lambda x, e, w: jnp.sum(fn(x, e, w) * cot)

  got = jax.grad(loss(lambda x, e, w: _ragged(x, e, idx, w)), argnums=(0, 1, 2))(x, experts, w)
  want = jax.grad(loss(lambda x, e, w: dense_reference(e, x, idx, w, 8)), argnums=(0, 1, 2))(
      x, experts, w)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_block_layout_round_trips_every_row():
  # Empty groups, a group that is an exact block multiple, and 3 rows in no group.
  sizes = jnp.array([0, 5, 4, 0, 1], jnp.int32)
  M, b = 13, 4
  src, valid, dst, row_ok, group = block_layout(sizes, M, b)
  assert src.shape[0] == (M + 5 * (b - 1)) // b * b  # the static dropless bound
  np.testing.assert_array_equal(row_ok, np.arange(M) < 10)
  np.testing.assert_array_equal(src[dst[:10]], np.arange(10))  # padded slot of row m reads row m
  assert valid[dst[:10]].all() and int(valid.sum()) == 10
  ends = np.cumsum(sizes)
  for q, g in enumerate(np.asarray(group)):  # every valid slot of a block is its group's row
    rows = np.asarray(src[q * b:(q + 1) * b])[np.asarray(valid[q * b:(q + 1) * b])]
    assert all(ends[g] - sizes[g] <= r < ends[g] for r in rows)


@pytest.mark.parametrize("block", [0, 1, 4])
def test_dispatch_layout_maps_are_inverse(block):
  # 3 tokens × 2 choices over 4 experts; one choice is "no expert" (id 4).
  idx = jnp.array([[2, 0], [2, 4], [1, 2]])
  lay = dispatch_layout(idx, 4, block)
  flat = np.asarray(idx).reshape(-1)
  np.testing.assert_array_equal(lay.ok_M, flat < 4)
  np.testing.assert_array_equal(lay.group_sizes, [1, 1, 3, 0])
  read, valid, slot = map(np.asarray, (lay.read_P, lay.valid_P, lay.slot_M))
  assert int(valid.sum()) == 5 and len(set(slot[flat < 4])) == 5
  for m in np.flatnonzero(flat < 4):  # each row's slot reads that row back
    assert valid[slot[m]] and read[slot[m]] == m
  rows = read[valid]
  assert list(flat[rows]) == sorted(flat[rows])  # slots in expert order
  if block:  # every valid slot of a block holds its block's expert
    for q, e in enumerate(np.asarray(lay.group_Q)):
      assert (flat[read[q * block:(q + 1) * block][valid[q * block:(q + 1) * block]]] == e).all()


def test_permute_rows_gradient_is_the_scatter_gradient():
  # permute_rows' inverse-gather backward equals autodiff of the plain gather.
  idx = jnp.array([[2, 0], [2, 4], [1, 2]])
  lay = dispatch_layout(idx, 4, 4)
  x = jax.random.normal(jax.random.key(0), (3, 5))
  cot = jax.random.normal(jax.random.key(1), (lay.read_P.shape[0], 5))
  args = (lay.read_P // 2, lay.valid_P)
  inv = (lay.slot_M.reshape(3, 2), lay.ok_M.reshape(3, 2))
  got = jax.grad(lambda x: jnp.sum(permute_rows(x, *args, *inv) * cot))(x)
  want = jax.grad(lambda x: jnp.sum(take_rows(x, *args) * cot))(x)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("impl,max_block", [("blocked", 1), ("blocked", 4), ("blocked", 128),
                                             ("sorted", 4), ("sorted", 128)])
def test_grouped_matmul_equals_ragged_dot(dispatch_case, impl, max_block):
  x, experts, idx, w = dispatch_case
  cot = jax.random.normal(jax.random.key(9), x.shape)

  def run(impl):
    loss = lambda x, e, w: jnp.sum(dropless_dispatch(e, x, idx, w, 8, impl, max_block) * cot)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, experts, w)

  v_b, g_b = run(impl)
  v_r, g_r = run("ragged_dot")
  np.testing.assert_allclose(v_b, v_r, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_r)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def _dispatch_grads(fn, cot):
  """Jitted (x, experts, w, idx) -> value and grads (x, experts, w) of Σ fn(...)·cot."""
  loss = lambda x, e, w, idx: jnp.sum(fn(e, x, idx, w, 8) * cot)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.fixture(scope="module")
def dispatch_want(dispatch_case):
  """The reference, and the reference with the "no expert" choices' weights zeroed."""
  x, experts, idx, w = dispatch_case
  cot = jax.random.normal(jax.random.key(9), x.shape)
  none = jnp.zeros(idx.shape, bool).at[-3:, 1].set(True)
  ref = _dispatch_grads(dense_reference, cot)
  return cot, none, ref(x, experts, w, idx), ref(x, experts, jnp.where(none, 0, w), idx)


@pytest.mark.parametrize("impl", PATHS)
def test_path_equals_dense_reference(dispatch_case, dispatch_want, impl):
  # Outputs and gradients (inputs, expert weights, combine weights) to 1e-5; a
  # few choices carry id E ("no expert", as expert parallelism pads) and add 0.
  x, experts, idx, w = dispatch_case
  cot, none, want, want_none = dispatch_want
  cfg = CFG.replace(grouped_matmul=impl, gmm_block_size=4)
  run = _dispatch_grads(lambda *a: routed_experts(cfg, *a), cot)
  got = run(x, experts, w, idx)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
  v, (gx, ge, gw) = run(x, experts, w, jnp.where(none, 8, idx))
  v_r, (gx_r, ge_r, _) = want_none
  np.testing.assert_allclose(v, v_r, rtol=1e-5)
  for g, r in zip(jax.tree.leaves((gx, ge)), jax.tree.leaves((gx_r, ge_r))):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(gw[none], 0)


def _layer(cfg, x, valid, params, cot):
  def loss(p, x):
    y, aux = MoE(cfg).apply({"params": p}, x, valid)
    return jnp.sum(y * cot), (y, aux)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.fixture(scope="module")
def layer_case():
  """Input with padded tokens, params, cotangent, and the layer's result with
  the dense reference in place of the routed-expert path."""
  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(keys[0], (2, 12, CFG.d_model))
  valid = jnp.ones((2, 12), bool).at[1, 7:].set(False)
  case = (x, valid, MoE(CFG).init(keys[1], x, valid)["params"],
          jax.random.normal(keys[2], x.shape))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(moe, "routed_experts", lambda cfg, w, *a: dense_reference(w, *a))
    return case, _layer(CFG, *case)


@pytest.mark.parametrize("impl", PATHS)
def test_layer_path_equals_dense_reference(layer_case, impl):
  # Layer output, aux (load over valid tokens, balance) and gradients wrt params
  # and input, against the same layer with the dense reference for the experts.
  case, ((_, (y_r, aux_r)), grads_r) = layer_case
  (_, (y, aux)), grads = _layer(CFG.replace(grouped_matmul=impl), *case)
  np.testing.assert_allclose(y, y_r, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(aux["load"], aux_r["load"])
  assert float(aux["load"].sum()) == 19 * CFG.n_activated_experts  # valid tokens only
  np.testing.assert_allclose(aux["balance"], aux_r["balance"], rtol=1e-6)
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(grads))
  for path, g, r in zip(paths, leaves, jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_packed_weights_give_the_layer_output(layer_case):
  # A sampler packs the dense path's weights once (rollout.model_decode_fn); the
  # layer then runs its routed and shared experts as two products with them. Ids
  # of E ("no expert") add nothing there either.
  case, ((_, (y_r, aux_r)), _) = layer_case
  x, valid, params, _ = case
  params = nn.unbox(params)
  cfg = CFG.replace(grouped_matmul="dense")
  packed = moe.pack_dense(params["experts"], params.get("shared"), jnp.float32)
  assert packed[0].shape == (CFG.d_model, 2 * (CFG.n_routed_experts + CFG.n_shared_experts)
                             * CFG.moe_d_ff)
  y, aux = MoE(cfg).apply({"params": params, "decode": {"packed": packed}}, x, valid)
  np.testing.assert_allclose(y, y_r, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(aux["load"], aux_r["load"])
  n_none = 3
  xs = jax.random.normal(jax.random.key(5), (n_none, CFG.d_model))
  idx = jnp.full((n_none, CFG.n_activated_experts), CFG.n_routed_experts).at[:, 0].set(1)
  gate = jnp.full(idx.shape, 0.5)
  e = params["experts"]
  want = dense_reference((e["wi_gate"], e["wi_up"], e["wo"]), xs, jnp.minimum(idx, 1),
                         jnp.where(idx == 1, gate, 0.0), CFG.n_routed_experts)
  shared = MLP(CFG.d_model, CFG.n_shared_experts * CFG.moe_d_ff).apply(
      {"params": params["shared"]}, xs)
  got = moe.packed_experts(packed, xs, idx, gate, CFG.n_routed_experts, CFG.moe_d_ff)
  np.testing.assert_allclose(got, want + shared, atol=1e-5, rtol=1e-5)


def test_auto_rule():
  cfg = ModelConfig.tiny(n_routed_experts=16, n_activated_experts=4, d_model=512, moe_d_ff=256)
  assert moe_impl(cfg, 4, "gpu") == "gather"  # decode: 16 choices ≤ 16 experts
  # XLA:CPU: gather while 2·N·K ≤ E ≥ 32, all experts while N·E ≤ 512, else sorted.
  assert moe_impl(cfg, 1, "cpu") == "dense"
  assert moe_impl(cfg, 4, "cpu", n_experts=64) == "gather"
  assert moe_impl(cfg, 16, "cpu", n_experts=64) == "sorted"
  assert moe_impl(cfg, 4, "cpu") == "dense"
  assert moe_impl(cfg, 32, "cpu") == "dense"
  assert moe_impl(cfg, 33, "cpu") == "sorted"
  assert moe_impl(cfg, 2048, "cpu") == "sorted"
  assert moe_impl(cfg, 2048, "accelerator") == "ragged_dot"
  # Expert parallelism: 2 local experts, one choice per received row.
  assert moe_impl(cfg, 2, "tpu", n_experts=2, top_k=1) == "gather"
  assert moe_impl(cfg, 64, "tpu", n_experts=2, top_k=1) == "ragged_dot"
  assert moe_impl(cfg.replace(grouped_matmul="dense"), 4, "cpu") == "dense"
  assert moe.exchange_impl("auto", "cpu") == "all_to_all"
  assert moe.exchange_impl("auto", "gpu") == "ragged_all_to_all"


def test_unknown_path_is_reported():
  with pytest.raises(ValueError, match="grouped_matmul must be"):
    ModelConfig.tiny(grouped_matmul="segment")
