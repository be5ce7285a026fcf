"""DeepSeekMoE: group-limited routing with a correction bias, dropless dispatch.

Routing (V3 report §2.1.2): scores s = sigmoid(x·W_g) (softmax for V2-style
configs). Selection uses s + b, b the per-expert correction bias; experts are
split into groups, a group's score is the sum of its two best biased scores,
only the n_limited_groups best groups stay in play, and the top-k experts are
chosen among them. The combine weights are the *unbiased* s of the chosen
experts, normalised to sum 1, times route_scale. The bias is never trained by
gradient: after each step b_i += γ·sign(mean_load − load_i).

Dispatch is dropless. `moe_impl` (the one "auto" rule) picks the routed-expert
path from the token count, expert count, top-k and backend: a per-token weight
gather for the smallest decode batches, every expert on every token for
XLA:CPU's decode sizes, a sorted grouped matmul for training
(`jax.lax.ragged_dot` on GPU/TPU; on XLA:CPU loops over each expert's blocks of
rows with a hand-written backward); "blocked" (the blocks as one batched einsum
over weight copies) is selectable, and `cfg.grouped_matmul` overrides the rule. Under an ambient mesh
(`jax.set_mesh`) whose `expert` axis is > 1 the routed experts run
expert-parallel (r1jax/parallel/expert_parallel.py), each device's local
experts by the same rule. `dense_reference` computes every expert for every
token, for tests only.

Glossary: N tokens, D d_model, E routed experts, K experts per token,
G expert groups (routing) or groups of rows (grouped matmul), F expert hidden
size, B batch, T sequence, M (token, choice) rows, P expert-sorted slots, Q blocks,
b block rows.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig
from r1jax.model.grouped import GROUPED, dropless_dispatch
from r1jax.model.layers import MLP, dtypes, fan_in_init
from r1jax.parallel import expert_parallel


def route(logits_NxE: jnp.ndarray, bias_E: jnp.ndarray, cfg: ModelConfig):
  """Returns (scores [N,E], expert ids [N,K], combine weights [N,K]) in float32."""
  logits = logits_NxE.astype(jnp.float32)
  if cfg.score_func == "sigmoid":
    scores_NxE = jax.nn.sigmoid(logits)
  else:
    scores_NxE = jax.nn.softmax(logits, axis=-1)
  choice_NxE = scores_NxE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
  N, E = choice_NxE.shape
  G = cfg.n_expert_groups
  if G > 1:
    grouped_NxGxM = choice_NxE.reshape(N, G, E // G)
    if cfg.score_func == "sigmoid":
      group_NxG = jax.lax.top_k(grouped_NxGxM, 2)[0].sum(-1)
    else:  # DeepSeek-V2: a group's score is its best expert
      group_NxG = grouped_NxGxM.max(-1)
    _, keep_group_NxL = jax.lax.top_k(group_NxG, cfg.n_limited_groups)
    keep_NxG = jnp.zeros((N, G), bool).at[jnp.arange(N)[:, None], keep_group_NxL].set(True)
    choice_NxE = jnp.where(jnp.repeat(keep_NxG, E // G, axis=1), choice_NxE, -jnp.inf)
  _, idx_NxK = jax.lax.top_k(choice_NxE, cfg.n_activated_experts)
  weights_NxK = jnp.take_along_axis(scores_NxE, idx_NxK, axis=1)
  if cfg.norm_topk_prob:
    weights_NxK = weights_NxK / weights_NxK.sum(-1, keepdims=True)
  return scores_NxE, idx_NxK, weights_NxK * cfg.route_scale


def expert_load(idx_NxK: jnp.ndarray, valid_N: jnp.ndarray, n_experts: int) -> jnp.ndarray:
  """Number of (valid token, expert) assignments per expert, float32 [E]."""
  one_hot_NxKxE = jax.nn.one_hot(idx_NxK, n_experts, dtype=jnp.float32)
  return jnp.einsum("nke,n->e", one_hot_NxKxE, valid_N.astype(jnp.float32))


def sequence_balance_loss(scores_BxTxE, idx_BxTxK, valid_BxT, n_active: int) -> jnp.ndarray:
  """V3's sequence-wise balance loss Σ_i f_i·P_i, averaged over sequences (α applied by the caller).

  f_i = E/(K·T) · #{t: i in top-k(t)}, P_i = mean_t s_{i,t}/Σ_j s_{j,t}, over valid tokens.
  """
  E = scores_BxTxE.shape[-1]
  valid = valid_BxT.astype(jnp.float32)
  n_tok_B = jnp.maximum(valid.sum(-1), 1.0)
  chosen_BxTxE = jax.nn.one_hot(idx_BxTxK, E, dtype=jnp.float32).sum(-2)
  f_BxE = E / (n_active * n_tok_B[:, None]) * jnp.einsum("bte,bt->be", chosen_BxTxE, valid)
  norm_BxTxE = scores_BxTxE / scores_BxTxE.sum(-1, keepdims=True)
  p_BxE = jnp.einsum("bte,bt->be", norm_BxTxE, valid) / n_tok_B[:, None]
  return jnp.mean(jnp.sum(f_BxE * p_BxE, -1))


def update_router_bias(bias_E: jnp.ndarray, load_E: jnp.ndarray, rate: float) -> jnp.ndarray:
  """Auxiliary-loss-free balancing: b_i += γ·sign(mean_load − load_i)."""
  load = load_E.astype(jnp.float32)
  return (bias_E + rate * jnp.sign(load.mean() - load)).astype(bias_E.dtype)


class Experts(nn.Module):
  """The routed experts' SwiGLU weights, stacked on a leading expert axis."""
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    _, pdt = dtypes(c)
    E, D, F = c.n_routed_experts, c.d_model, c.moe_d_ff
    init = fan_in_init(1, batch_axes=(0,))
    part = nn.with_logical_partitioning
    self.wi_gate = self.param("wi_gate", part(init, ("exp", "embed", "exp_mlp")), (E, D, F), pdt)
    self.wi_up = self.param("wi_up", part(init, ("exp", "embed", "exp_mlp")), (E, D, F), pdt)
    self.wo = self.param("wo", part(init, ("exp", "exp_mlp", "embed")), (E, F, D), pdt)

  def weights(self) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(wi_gate [E,D,F], wi_up [E,D,F], wo [E,F,D]) in the compute dtype."""
    dt = jnp.dtype(self.cfg.dtype)
    return self.wi_gate.astype(dt), self.wi_up.astype(dt), self.wo.astype(dt)


# ----------------------------------------------------------------------------
# Routed-expert paths: y = Σ_k gate_k · SwiGLU_{idx_k}(x) per token. An expert
# id ≥ E means "no expert" (expert parallelism pads with it); such choices add 0.
#
#   "gather"      each token reads its K experts' weights ([N,K,D,F] copies):
#                 decode, where N·K ≤ E reads less than all the weights.
#   "dense"       every expert on every token, batched over experts, the
#                 combine weights folded into the hidden units (E/K times the
#                 useful FLOPs, but no sort, gather or scatter).
#   "sorted"      rows sorted by expert, each expert's run padded to blocks of
#                 ≤ gmm_block_size rows, a loop over experts and their blocks
#                 reading each expert's weights in place (XLA:CPU).
#   "blocked"     the same blocks as one batched einsum over per-block copies
#                 of the weights.
#   "ragged_dot"  `jax.lax.ragged_dot` on the sorted rows, unpadded (GPU/TPU;
#                 XLA:CPU does G full matmuls).
#
# The last three sort rows by expert: r1jax/model/grouped.py.

PATHS = ("gather", "dense", "sorted", "blocked", "ragged_dot")


# XLA:CPU: "dense" while n_tokens · n_experts stays at or under this (decode).
_CPU_DENSE_MAX_TOKEN_EXPERTS = 512


def moe_impl(cfg: ModelConfig, n_tokens: int, backend: str | None = None,
             n_experts: int | None = None, top_k: int | None = None) -> str:
  """The routed-expert path for `n_tokens` tokens on one device: the one "auto" rule.

  backend: "cpu", "gpu", "tpu" or "accelerator" (None: jax.default_backend()).
  n_experts / top_k default to the config's (expert parallelism passes its
  local experts and per-row choices). An explicit `cfg.grouped_matmul` wins.

  Accelerators: "gather" while N·K ≤ E (decode reads the fewest weights), else
  "ragged_dot". XLA:CPU: "gather" while 2·N·K ≤ E with E ≥ 32, "dense" while
  N·E ≤ 512, else "sorted". Measured there on one MoE layer of `bench.peer`
  (D 256, F 128, top-4; shared expert and router included), forward ms for
  gather / dense / sorted: E 16: N 1 0.46/0.26/0.75, N 8 2.20/0.56/1.26, N 32
  10.8/1.44/1.53, N 64 16.6/1.88/1.86, N 512 132/13.4/7.6; E 64: N 1
  0.45/1.06/2.45, N 8 1.93/2.96/3.67, N 16 3.77/3.25/3.46, N 32 10.2/5.40/3.99.
  Forward + backward, 2048 tokens, E 16: sorted 72 ms (`sorted_swiglu`),
  blocked ~94, dense ~186; ragged_dot does G full matmuls there.
  """
  if cfg.grouped_matmul != "auto":
    return cfg.grouped_matmul
  E = n_experts or cfg.n_routed_experts
  K = top_k or cfg.n_activated_experts
  backend = backend or jax.default_backend()
  if backend == "cpu":
    if 2 * n_tokens * K <= E and E >= 32:
      return "gather"
    if n_tokens * E <= _CPU_DENSE_MAX_TOKEN_EXPERTS:
      return "dense"
    return "sorted"
  if n_tokens * K <= E:
    return "gather"
  return grouped_impl(cfg, backend)


def grouped_impl(cfg: ModelConfig, backend: str | None = None) -> str:
  """The path for many tokens (what `moe_impl` picks past decode sizes, and what the
  memory plan counts): cfg.grouped_matmul, or for "auto" "sorted" on XLA:CPU and
  "ragged_dot" elsewhere."""
  if cfg.grouped_matmul != "auto":
    return cfg.grouped_matmul
  return "sorted" if (backend or jax.default_backend()) == "cpu" else "ragged_dot"


def exchange_impl(exchange: str, backend: str | None = None) -> str:
  """The expert-parallel exchange for `cfg.ep_exchange` ("auto": by backend)."""
  if exchange != "auto":
    return exchange
  backend = backend or jax.default_backend()
  return "all_to_all" if backend == "cpu" else "ragged_all_to_all"


def gather_experts(w: tuple, x_NxD, idx_NxK, gate_NxK, n_experts: int):
  wi_gate, wi_up, wo = w
  i_NxK = jnp.minimum(idx_NxK, n_experts - 1)
  gate_NxK = jnp.where(idx_NxK < n_experts, gate_NxK, 0)
  gate_NxKxF = jnp.einsum("nd,nkdf->nkf", x_NxD, wi_gate[i_NxK])
  up_NxKxF = jnp.einsum("nd,nkdf->nkf", x_NxD, wi_up[i_NxK])
  return jnp.einsum("nkf,nkfd,nk->nd", nn.silu(gate_NxKxF) * up_NxKxF, wo[i_NxK], gate_NxK)


def dense_experts(w: tuple, x_NxD, idx_NxK, gate_NxK, n_experts: int):
  wi_gate, wi_up, wo = w
  (E, D, F), N = wi_gate.shape, x_NxD.shape[0]
  comb_ExN = jnp.einsum("nk,nke->en", gate_NxK, jax.nn.one_hot(idx_NxK, E, dtype=x_NxD.dtype))
  # Batched over experts, so each expert's [D, F] weights are read where they lie
  # (a [D, E·F] view of [E, D, F] would be a transposed copy of all of them).
  x_ExNxD = jnp.broadcast_to(x_NxD, (E, N, D))
  a_ExNxF = jnp.einsum("end,edf->enf", x_ExNxD, wi_gate)
  b_ExNxF = jnp.einsum("end,edf->enf", x_ExNxD, wi_up)
  h_ExNxF = nn.silu(a_ExNxF) * b_ExNxF * comb_ExN[:, :, None]
  return jnp.einsum("enf,efd->nd", h_ExNxF, wo)


def pack_dense(experts: dict, shared: dict | None, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The "dense" path's weights (one layer's `experts` and `shared` params) as two
  matrices: w_in [D, 2H] (every routed expert's gate units, then the shared MLP's;
  then the same for the up units) and w_out [H, D], H = E·F + shared units. A
  decode loop packs them once, before the loop: packed inside it, XLA:CPU
  transposed every MoE layer's expert weights on every token (bench.peer generate)."""
  E, D, F = experts["wi_gate"].shape
  own = lambda k: [shared[k]["kernel"]] if shared else []  # noqa: E731

  def units(k):  # [D, E·F (+ shared units)]
    return jnp.concatenate([experts[k].transpose(1, 0, 2).reshape(D, E * F)] + own(k), axis=1)

  w_in = jnp.concatenate([units("wi_gate"), units("wi_up")], axis=1)
  w_out = jnp.concatenate([experts["wo"].reshape(E * F, D)] + own("wo"))
  return w_in.astype(dtype), w_out.astype(dtype)


def packed_experts(packed: tuple, x_NxD, idx_NxK, gate_NxK, n_experts: int, d_ff: int):
  """Σ_k gate_k · expert_{idx_k}(x) + shared(x) on `pack_dense`'s matrices: the
  "dense" path (every expert on every token) as two matrix products."""
  w_in, w_out = packed
  N, H, EF = x_NxD.shape[0], w_out.shape[0], n_experts * d_ff
  comb_NxE = jnp.einsum("nk,nke->ne", gate_NxK, jax.nn.one_hot(idx_NxK, n_experts,
                                                               dtype=x_NxD.dtype))
  h_Nx2H = x_NxD @ w_in
  a_NxH = nn.silu(h_Nx2H[:, :H]) * h_Nx2H[:, H:]
  # The gates scale each expert's units through a reshape, not a repeated [N, H]
  # gate (bench.peer decode: one MoE layer 433 -> 350 µs).
  routed_NxEF = (a_NxH[:, :EF].reshape(N, n_experts, d_ff) * comb_NxE[:, :, None]).reshape(N, EF)
  return jnp.concatenate([routed_NxEF, a_NxH[:, EF:]], axis=1) @ w_out


def routed_experts(cfg: ModelConfig, w: tuple, x_NxD, idx_NxK, gate_NxK, n_experts: int):
  """Σ_k gate_k · expert_{idx_k}(x) by the path `moe_impl` picks for these shapes."""
  N, K = idx_NxK.shape
  impl = moe_impl(cfg, N, n_experts=n_experts, top_k=K)
  x = x_NxD.astype(w[0].dtype)
  gate = gate_NxK.astype(x.dtype)
  if impl == "gather":
    return gather_experts(w, x, idx_NxK, gate, n_experts)
  if impl == "dense":
    return dense_experts(w, x, idx_NxK, gate, n_experts)
  if impl not in GROUPED:
    raise ValueError(f"grouped_matmul must be 'auto' or one of {PATHS}, got {impl!r}")
  return dropless_dispatch(w, x, idx_NxK, gate, n_experts, impl, cfg.gmm_block_size)


def dense_reference(experts: tuple, x_NxD, idx_NxK, weights_NxK, n_experts: int):
  """Every expert on every token, combined with a dense [N, E] gate. Tests only."""
  wi_gate, wi_up, wo = experts
  gate_NxE = jnp.zeros((x_NxD.shape[0], n_experts), x_NxD.dtype)
  gate_NxE = gate_NxE.at[jnp.arange(x_NxD.shape[0])[:, None], idx_NxK].add(
      weights_NxK.astype(x_NxD.dtype))
  h_NxExF = nn.silu(jnp.einsum("nd,edf->nef", x_NxD, wi_gate)) * jnp.einsum("nd,edf->nef", x_NxD, wi_up)
  y_NxExD = jnp.einsum("nef,efd->ned", h_NxExF, wo)
  return jnp.einsum("ned,ne->nd", y_NxExD, gate_NxE)


class MoE(nn.Module):
  """Shared experts + routed experts. Returns (y, aux) with aux = {load [E], balance}.

  `load` counts valid (token, expert) assignments from the router's choices over
  the whole batch (GSPMD sums it across devices), the same with or without
  expert parallelism; the bias update reads it.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, valid_BxT):
    c = self.cfg
    dt, pdt = dtypes(c)
    B, T, D = x_BxTxD.shape
    E = c.n_routed_experts
    router = Router(c, name="router")
    scores_NxE, idx_NxK, weights_NxK = router(x_BxTxD.reshape(B * T, D))
    w = Experts(c, name="experts").weights()
    x_NxD = x_BxTxD.reshape(B * T, D).astype(dt)
    mesh = expert_parallel.ambient_mesh()
    routed = functools.partial(routed_experts, c)
    # A sampler's decode loop may hand in the dense path's packed weights (shared
    # expert included): r1jax/rl/rollout.py, `pack_dense`.
    packed = self.get_variable("decode", "packed")
    if (packed is not None and expert_parallel.expert_axis_size(mesh) <= 1
        and moe_impl(c, B * T) == "dense"):
      y_NxD = packed_experts(packed, x_NxD, idx_NxK, weights_NxK.astype(dt), E, c.moe_d_ff)
      return y_NxD.reshape(B, T, D).astype(dt), self._aux(scores_NxE, idx_NxK, valid_BxT)
    if expert_parallel.expert_axis_size(mesh) > 1:
      # Experts live on their own devices: move the tokens, not the weights.
      y_NxD = expert_parallel.ep_dispatch(routed, w, x_NxD, idx_NxK, weights_NxK, mesh,
                                          exchange=c.ep_exchange,
                                          capacity_factor=c.ep_capacity_factor,
                                          chunk_tokens=c.ep_chunk_tokens)
    else:
      y_NxD = routed(w, x_NxD, idx_NxK, weights_NxK, E)
    y_BxTxD = y_NxD.reshape(B, T, D)
    if c.n_shared_experts:
      y_BxTxD = y_BxTxD + MLP(D, c.n_shared_experts * c.moe_d_ff, dtype=dt, param_dtype=pdt,
                              name="shared")(x_BxTxD)
    return y_BxTxD.astype(dt), self._aux(scores_NxE, idx_NxK, valid_BxT)

  def _aux(self, scores_NxE, idx_NxK, valid_BxT) -> dict:
    B, T = valid_BxT.shape
    E = self.cfg.n_routed_experts
    return {
        "load": expert_load(idx_NxK, valid_BxT.reshape(-1), E),
        "balance": sequence_balance_loss(scores_NxE.reshape(B, T, E),
                                         idx_NxK.reshape(B, T, -1), valid_BxT,
                                         self.cfg.n_activated_experts),
    }


class Router(nn.Module):
  """Gate weights [D, E] and the correction bias [E] (kept in params, no gradient)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_NxD):
    c = self.cfg
    _, pdt = dtypes(c)
    kernel = self.param("kernel", nn.with_logical_partitioning(fan_in_init(1), ("embed", "exp")),
                        (c.d_model, c.n_routed_experts), pdt)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("exp",)),
                      (c.n_routed_experts,), jnp.float32)
    logits_NxE = jnp.dot(x_NxD.astype(jnp.float32), kernel.astype(jnp.float32))
    return expert_parallel.per_device_rows(functools.partial(route, cfg=c),
                                           expert_parallel.ambient_mesh(), (logits_NxE,), (bias,))
