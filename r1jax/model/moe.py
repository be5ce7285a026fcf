"""DeepSeekMoE: group-limited routing with a correction bias, dropless dispatch.

Routing (V3 report §2.1.2): scores s = sigmoid(x·W_g) (softmax for V2-style
configs). Selection uses s + b, b the per-expert correction bias; experts are
split into groups, a group's score is the sum of its two best biased scores,
only the n_limited_groups best groups stay in play, and the top-k experts are
chosen among them. The combine weights are the *unbiased* s of the chosen
experts, normalised to sum 1, times route_scale. The bias is never trained by
gradient: after each step b_i += γ·sign(mean_load − load_i).

Dispatch is dropless: the N·K (token, expert) assignments are sorted by expert
and each expert's contiguous run goes through a grouped matmul
(`jax.lax.ragged_dot`). `dense_reference` computes every expert for every token
and exists for tests only.

Glossary: N tokens, D d_model, E routed experts, K experts per token,
G expert groups, F expert hidden size, B batch, T sequence.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig
from r1jax.model.layers import MLP, dtypes, fan_in_init


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

  def weights(self):
    dt = jnp.dtype(self.cfg.dtype)
    return self.wi_gate.astype(dt), self.wi_up.astype(dt), self.wo.astype(dt)

  def __call__(self, x_sorted_MxD, group_sizes_E):
    """Grouped SwiGLU over rows already sorted by expert (group_sizes rows each)."""
    wi_gate, wi_up, wo = self.weights()
    x = x_sorted_MxD.astype(wi_gate.dtype)
    gate_MxF = jax.lax.ragged_dot(x, wi_gate, group_sizes_E)
    up_MxF = jax.lax.ragged_dot(x, wi_up, group_sizes_E)
    return jax.lax.ragged_dot(nn.silu(gate_MxF) * up_MxF, wo, group_sizes_E)


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
  """Shared experts + routed experts. Returns (y, aux) with aux = {load [E], balance}."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, valid_BxT):
    c = self.cfg
    dt, pdt = dtypes(c)
    B, T, D = x_BxTxD.shape
    E = c.n_routed_experts
    router = Router(c, name="router")
    scores_NxE, idx_NxK, weights_NxK = router(x_BxTxD.reshape(B * T, D))
    experts = Experts(c, name="experts")
    x_NxD = x_BxTxD.reshape(B * T, D).astype(dt)
    y_NxD = dropless_dispatch(experts, x_NxD, idx_NxK, weights_NxK, E)
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
