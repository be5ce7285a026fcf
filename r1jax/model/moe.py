"""DeepSeekMoE: group-limited routing with a correction bias, dropless dispatch.

Routing (V3 report §2.1.2): scores s = sigmoid(x·W_g) (softmax for V2-style
configs). Selection uses s + b, b the per-expert correction bias; experts are
split into groups, a group's score is the sum of its two best biased scores,
only the n_limited_groups best groups stay in play, and the top-k experts are
chosen among them. The combine weights are the *unbiased* s of the chosen
experts, normalised to sum 1, times route_scale. The bias is never trained by
gradient: after each step b_i += γ·sign(mean_load − load_i).

Dispatch is dropless: the N·K (token, expert) assignments are sorted by expert
and each expert's contiguous run goes through a grouped matmul, either
`jax.lax.ragged_dot` (GPU/TPU) or a blocked form for XLA:CPU (each expert's run
padded to whole blocks, one batched einsum); `cfg.grouped_matmul` picks, "auto"
by backend. Under an ambient mesh (`jax.set_mesh`) whose `expert` axis is > 1
the routed experts run expert-parallel (r1jax/parallel/expert_parallel.py).
`dense_reference` computes every expert for every token, for tests only.

Glossary: N tokens, D d_model, E routed experts, K experts per token,
G expert groups (routing) or groups of rows (grouped matmul), F expert hidden
size, B batch, T sequence, M sorted rows, P padded rows, Q blocks, b block rows.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig
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
# Grouped matmul: rows sorted by expert, group_sizes rows per expert. Rows past
# sum(group_sizes) belong to no expert and come out as zeros.

def grouped_matmul_impl(cfg: ModelConfig) -> str:
  """"ragged_dot" or "blocked"; "auto" picks by the default backend.

  XLA:CPU lowers ragged_dot to about one full [M,D]x[D,F] matmul per group (as
  if every row went to every expert), so CPU gets the blocked form.
  """
  if cfg.grouped_matmul != "auto":
    return cfg.grouped_matmul
  return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


def block_rows(n_rows: int, n_groups: int, max_block: int) -> int:
  """Rows per block: the power of two (≥ 8) nearest above the mean group size,
  capped at max_block, so padding (< n_groups·block rows) stays about n_rows."""
  mean = -(-n_rows // max(n_groups, 1))
  block = 8
  while block < mean and block < max_block:
    block *= 2
  return max(min(block, max_block), 1)


def block_layout(group_sizes_G: jnp.ndarray, n_rows: int, block: int):
  """Index maps between the sorted rows and a layout padding each group to whole blocks.

  The padded length is static: Σ_g ceil(m_g/b)·b ≤ M + G·(b−1), so no row is
  ever dropped. Returns (src_P row read by padded slot p, valid_P, dst_M padded
  slot of sorted row m, row_ok_M (row m is in some group), group_Q of block q).
  """
  G = group_sizes_G.shape[0]
  n_blocks = max((n_rows + G * (block - 1)) // block, 1)
  sizes_G = group_sizes_G.astype(jnp.int32)
  ends_G = jnp.cumsum(sizes_G)
  starts_G = ends_G - sizes_G
  padded_G = (sizes_G + block - 1) // block * block
  pad_ends_G = jnp.cumsum(padded_G)
  pad_starts_G = pad_ends_G - padded_G
  # Block q holds the first group whose padded run ends past q·b; trailing
  # unused blocks fall on the last group and are all invalid slots.
  q_Q = jnp.arange(n_blocks, dtype=jnp.int32) * block
  group_Q = jnp.minimum(jnp.searchsorted(pad_ends_G, q_Q, side="right"), G - 1)
  group_P = jnp.repeat(group_Q, block, total_repeat_length=n_blocks * block)
  off_P = jnp.arange(n_blocks * block, dtype=jnp.int32) - pad_starts_G[group_P]
  valid_P = (off_P >= 0) & (off_P < sizes_G[group_P])
  src_P = jnp.where(valid_P, starts_G[group_P] + off_P, 0)
  m_M = jnp.arange(n_rows, dtype=jnp.int32)
  group_M = jnp.searchsorted(ends_G, m_M, side="right")
  row_ok_M = group_M < G
  group_M = jnp.minimum(group_M, G - 1)
  dst_M = jnp.where(row_ok_M, pad_starts_G[group_M] + m_M - starts_G[group_M], 0)
  return src_P, valid_P, dst_M, row_ok_M, group_Q


def blocked_swiglu(w: tuple, x_sorted_MxD, group_sizes_G, max_block: int):
  """Grouped SwiGLU as one batched einsum over blocks, each block one expert's rows.

  Work is (M + G·(b−1))·D·F per matmul instead of ragged_dot's G·M·D·F on CPU.
  """
  wi_gate, wi_up, wo = w
  M, D = x_sorted_MxD.shape
  b = block_rows(M, wi_gate.shape[0], max_block)
  src_P, valid_P, dst_M, row_ok_M, group_Q = block_layout(group_sizes_G, M, b)
  x_QxbxD = jnp.where(valid_P[:, None], x_sorted_MxD[src_P], 0).reshape(-1, b, D)
  gate_QxbxF = jnp.einsum("qbd,qdf->qbf", x_QxbxD, wi_gate[group_Q])
  up_QxbxF = jnp.einsum("qbd,qdf->qbf", x_QxbxD, wi_up[group_Q])
  y_QxbxD = jnp.einsum("qbf,qfd->qbd", nn.silu(gate_QxbxF) * up_QxbxF, wo[group_Q])
  return jnp.where(row_ok_M[:, None], y_QxbxD.reshape(-1, D)[dst_M], 0)


def ragged_swiglu(w: tuple, x_sorted_MxD, group_sizes_G):
  wi_gate, wi_up, wo = w
  gate_MxF = jax.lax.ragged_dot(x_sorted_MxD, wi_gate, group_sizes_G)
  up_MxF = jax.lax.ragged_dot(x_sorted_MxD, wi_up, group_sizes_G)
  return jax.lax.ragged_dot(nn.silu(gate_MxF) * up_MxF, wo, group_sizes_G)


def grouped_swiglu(w: tuple, x_sorted_MxD, group_sizes_G, impl: str, max_block: int = 128):
  """Σ over groups of SwiGLU_g(rows of group g); `impl` is "ragged_dot" or "blocked"."""
  x = x_sorted_MxD.astype(w[0].dtype)
  group_sizes_G = group_sizes_G.astype(jnp.int32)
  if impl == "blocked":
    return blocked_swiglu(w, x, group_sizes_G, max_block)
  if impl == "ragged_dot":
    return ragged_swiglu(w, x, group_sizes_G)
  raise ValueError(f"grouped_matmul must be 'ragged_dot', 'blocked' or 'auto', got {impl!r}")


def swiglu_fn(cfg: ModelConfig):
  """grouped_swiglu with the config's grouped matmul: (w, x_sorted, group_sizes) -> y_sorted."""
  return functools.partial(grouped_swiglu, impl=grouped_matmul_impl(cfg),
                           max_block=cfg.gmm_block_size)


def dropless_dispatch(experts_fn, x_NxD, idx_NxK, weights_NxK, n_experts: int):
  """Σ_k weight_k · expert_{idx_k}(x) with a sort + grouped matmul; no token dropped."""
  N, K = idx_NxK.shape
  flat_e_M = idx_NxK.reshape(-1)
  order_M = jnp.argsort(flat_e_M, stable=True)
  token_M = order_M // K
  group_sizes_E = jnp.bincount(flat_e_M, length=n_experts).astype(jnp.int32)
  y_sorted_MxD = experts_fn(x_NxD[token_M], group_sizes_E)
  y_MxD = jnp.zeros_like(y_sorted_MxD).at[order_M].set(y_sorted_MxD)
  y_NxKxD = y_MxD.reshape(N, K, -1)
  return jnp.einsum("nkd,nk->nd", y_NxKxD, weights_NxK.astype(y_NxKxD.dtype))


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
    if expert_parallel.expert_axis_size(mesh) > 1:
      # Experts live on their own devices: move the tokens, not the weights.
      y_NxD = expert_parallel.ep_dispatch(swiglu_fn(c), w, x_NxD, idx_NxK, weights_NxK, mesh,
                                          exchange=c.ep_exchange,
                                          capacity_factor=c.ep_capacity_factor)
    else:
      y_NxD = dropless_dispatch(functools.partial(swiglu_fn(c), w), x_NxD, idx_NxK, weights_NxK, E)
    y_BxTxD = y_NxD.reshape(B, T, D)
    if c.n_shared_experts:
      y_BxTxD = y_BxTxD + MLP(D, c.n_shared_experts * c.moe_d_ff, dtype=dt, param_dtype=pdt,
                              name="shared")(x_BxTxD)
    aux = {
        "load": expert_load(idx_NxK, valid_BxT.reshape(-1), E),
        "balance": sequence_balance_loss(scores_NxE.reshape(B, T, E),
                                         idx_NxK.reshape(B, T, -1), valid_BxT,
                                         c.n_activated_experts),
    }
    return y_BxTxD.astype(dt), aux


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
    return route(logits_NxE, bias, c)
