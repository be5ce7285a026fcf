"""GRPO's update, pure and jitted: sequence layout, log-probs, the loss, one optimizer step.

The orchestration (rollout, rewards, minibatches) lives in r1jax/rl/step.py;
everything here is a function of arrays and parameters. A sequence is
[prompt (left-padded to P slots); completion (N slots)]; a slot's RoPE
position is slot − pad count, as in the sampler.

Glossary: B completions, b minibatch rows, P prompt slots, N new tokens,
L = P + N, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from r1jax.model import ModelConfig, Transformer
from r1jax.model import head as head_lib
from r1jax.rl import grpo
from r1jax.train import optim, sft

@flax.struct.dataclass
class RLState:
  """What a GRPO run carries between steps (orbax saves it as is).

  step counts GRPO iterations; ref_params is None when β = 0 and no KL is needed.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ref_params: Any


# ----------------------------------------------------------------------------
# Pure pieces: sequence layout, log-probs, the loss and the update.

def completion_layout(prompts_BxP: np.ndarray, prompt_lengths_B: np.ndarray,
                      tokens_BxN: np.ndarray, mask_BxN: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """[left-padded prompt; completion] as (tokens, positions, valid), each [B, L]."""
  B, Pn = prompts_BxP.shape
  L = Pn + tokens_BxN.shape[1]
  pad_Bx1 = (Pn - np.asarray(prompt_lengths_B))[:, None]
  slots_1xL = np.arange(L)[None]
  tokens_BxL = np.concatenate([prompts_BxP, tokens_BxN], axis=1).astype(np.int32)
  positions_BxL = np.maximum(slots_1xL - pad_Bx1, 0).astype(np.int32)
  valid_BxL = np.concatenate([slots_1xL[:, :Pn] >= pad_Bx1, np.asarray(mask_BxN, bool)], axis=1)
  return tokens_BxL, positions_BxL, valid_BxL


def training_arrays(batch: Mapping[str, np.ndarray], advantages_B: np.ndarray, *,
                    mask_truncated: bool) -> dict[str, np.ndarray]:
  """The update's inputs from a scored rollout: layout, loss mask, advantages.

  The loss mask is the rollout's (tokens up to and including EOS); with
  `mask_truncated` a completion that never emitted EOS is dropped whole (DAPO's
  overlong filtering), though it still runs through the model.
  """
  loss_mask_BxN = np.asarray(batch["mask"], bool).copy()
  if mask_truncated:
    loss_mask_BxN &= np.asarray(batch["finished"], bool)[:, None]
  tokens_BxL, positions_BxL, valid_BxL = completion_layout(
      batch["prompts"], batch["prompt_lengths"], batch["tokens"], batch["mask"])
  return dict(tokens=tokens_BxL, positions=positions_BxL, valid=valid_BxL, mask=loss_mask_BxN,
              advantages=np.asarray(advantages_B, np.float32))


def completion_logits(cfg: ModelConfig, params, tokens_BxL: jax.Array, positions_BxL: jax.Array,
                      valid_BxL: jax.Array, *, completion_len: int, temperature: float = 1.0
                      ) -> tuple[jax.Array, dict]:
  """(float32 logits / temperature predicting the last `completion_len` tokens [B, N, V],
  the model's aux outputs). Logits at slot P−1+j predict completion token j.

  The full-logits reference; training and log-probs use `completion_hidden`
  and the chunked head instead."""
  L = tokens_BxL.shape[1]
  N = completion_len
  # RL trains no MTP head: build the model without it (its params are ignored).
  model = Transformer(cfg.replace(mtp_depth=0))
  logits_BxLxV, aux = model.apply({"params": params}, tokens_BxL, positions_BxL, valid_BxL,
                                  return_aux=True)
  return logits_BxLxV[:, L - N - 1:L - 1].astype(jnp.float32) / temperature, aux


def completion_hidden(cfg: ModelConfig, params, tokens_BxL: jax.Array, positions_BxL: jax.Array,
                      valid_BxL: jax.Array, *, completion_len: int) -> tuple[jax.Array, dict]:
  """(final-normed hidden states at the slots predicting the last `completion_len`
  tokens [B, N, D], the model's aux outputs): `completion_logits` before the head."""
  L = tokens_BxL.shape[1]
  N = completion_len
  # RL trains no MTP head: build the model without it (its params are ignored).
  model = Transformer(cfg.replace(mtp_depth=0))
  h_BxLxD, aux = model.apply({"params": params}, tokens_BxL, positions_BxL, valid_BxL,
                             return_aux=True, return_hidden=True)
  return h_BxLxD[:, L - N - 1:L - 1], aux


def token_logprobs(logits_BxNxV: jax.Array, tokens_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log-softmax of the logits at the given tokens [B, N], the entropy at each step [B, N])."""
  logp_BxNxV = jax.nn.log_softmax(logits_BxNxV, axis=-1)
  logp_BxN = jnp.take_along_axis(logp_BxNxV, tokens_BxN[..., None], axis=-1)[..., 0]
  # exp(-inf) · -inf is nan: tokens cut by top-k/top-p add 0 to the entropy.
  entropy_BxN = -jnp.sum(jnp.where(jnp.isfinite(logp_BxNxV),
                                   jnp.exp(logp_BxNxV) * logp_BxNxV, 0.0), axis=-1)
  return logp_BxN, entropy_BxN


def sequence_logprobs(cfg: ModelConfig, params, tokens_BxL: jax.Array, positions_BxL: jax.Array,
                      valid_BxL: jax.Array, *, completion_len: int, temperature: float = 1.0,
                      entropy: bool = True) -> tuple[jax.Array, jax.Array | None, dict]:
  """Teacher-forced log-probs of the last `completion_len` tokens under softmax(logits / T).

  T is the sampling temperature: π_old, π_θ and π_ref are then the distribution
  the completions were drawn from (before top-k/top-p, as in TRL and verl), not
  the raw model's. Returns (logp [B, N], entropy of that policy at each of
  those steps [B, N] or None without `entropy`, the model's aux outputs). The
  head runs cfg.logits_chunk positions at a time (no [B, N, V] logits).
  """
  N = completion_len
  h_BxNxD, aux = completion_hidden(cfg, params, tokens_BxL, positions_BxL, valid_BxL,
                                   completion_len=N)
  logp_BxN, entropy_BxN = head_lib.target_logprobs(
      h_BxNxD, head_lib.head_weights(cfg, params), tokens_BxL[:, -N:], chunk=cfg.logits_chunk,
      temperature=temperature, entropy=entropy)
  return logp_BxN, entropy_BxN, aux


def on_policy_checks(old_bxN, sampler_bxN, mask_bxN, tis_cap: float):
  """(TIS weights or None, metrics) from π_old (the trainer's, here π_θ itself) and
  the sampler's log-probs of the same tokens, over the loss mask: what the step
  computes on the host when it runs π_old as a separate forward."""
  m = mask_bxN.astype(bool)
  n = jnp.maximum(jnp.sum(m), 1).astype(jnp.float32)
  old = jnp.where(m, old_bxN, 0.0)
  sampler = jnp.where(m, sampler_bxN.astype(jnp.float32), 0.0)
  metrics = {"logp_mismatch/mean": jnp.sum(jnp.abs(old - sampler)) / n,
             "logp_mismatch/max": jnp.max(jnp.abs(old - sampler)),
             "logp_mismatch/outside_frac": jnp.zeros((), jnp.float32),
             "logp_truncation/mean": jnp.sum(sampler - old) / n}
  if tis_cap <= 0:
    return None, metrics
  w_bxN = jnp.minimum(jnp.exp(old - sampler), tis_cap)
  metrics["tis/capped_frac"] = jnp.sum((w_bxN >= tis_cap) & m) / n
  return w_bxN, metrics


def make_loss_fn(cfg: ModelConfig, *, temperature: float = 1.0, tis_cap: float = 0.0,
                 **loss_options) -> Callable:
  """loss_fn(params, batch, rng) -> (loss, metrics) over one minibatch.

  batch: tokens/positions/valid [b, L]; mask, old_logp [b, N]; advantages [b];
  optional ref_logp and tis_weights [b, N]. π_θ is taken at the sampling
  `temperature`, like old_logp and ref_logp. Adds the V3 sequence-wise balance
  loss (α = cfg.seq_aux_loss_alpha); MTP's loss is not used in RL.

  Without old_logp the update is on-policy (one update per rollout, so π_old is
  π_θ): π_old = stop_gradient(log π_θ), the ratio is exactly 1 and only its
  gradient acts, as in TRL; a `sampler_logp` [b, N] then gives the mismatch
  metrics and, with tis_cap > 0, the TIS weights (`on_policy_checks`).
  """

  def loss_fn(params, batch: dict, rng: jax.Array):
    del rng  # nothing stochastic in the forward pass; kept for the common signature
    N = batch["mask"].shape[1]
    logp_bxN, entropy_bxN, aux = sequence_logprobs(
        cfg, params, batch["tokens"], batch["positions"], batch["valid"], completion_len=N,
        temperature=temperature)
    old_bxN, tis_bxN, checks = batch.get("old_logp"), batch.get("tis_weights"), {}
    if old_bxN is None:
      old_bxN = jax.lax.stop_gradient(logp_bxN)
      if "sampler_logp" in batch:
        tis_bxN, checks = on_policy_checks(old_bxN, batch["sampler_logp"], batch["mask"], tis_cap)
    loss, metrics = grpo.grpo_loss(
        logp_bxN, old_bxN, batch["ref_logp"] if "ref_logp" in batch else None,
        batch["advantages"], batch["mask"], entropy_BxT=entropy_bxN,
        tis_weights_BxT=tis_bxN, **loss_options)
    metrics.update(checks)
    if "balance" in aux:
      balance = jnp.sum(aux["balance"])
      loss = loss + cfg.seq_aux_loss_alpha * balance
      metrics["balance_loss"] = balance
      metrics["expert_load"] = aux["expert_load"]
    return loss, metrics

  return loss_fn


# Metrics that are means over the minibatch's unmasked tokens (grpo_loss's).
TOKEN_MEAN_METRICS = ("kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy",
                      "tis_weight_mean", "logp_mismatch/mean", "logp_truncation/mean",
                      "tis/capped_frac")


def grpo_micro_weights(micro_M: dict, aggregation: str) -> dict:
  """Each micro-batch's share of the whole minibatch's normaliser: "tok" for token
  means, "agg" for the policy loss under `aggregation` (grpo.aggregate)."""
  grpo._check_name("aggregation", aggregation, grpo.AGGREGATIONS)
  mask_MxbxN = micro_M["mask"].astype(bool)
  tok_M = sft.share(jnp.sum(mask_MxbxN, axis=(1, 2)))
  M = mask_MxbxN.shape[0]
  if aggregation == "token-mean":
    agg_M = tok_M
  elif aggregation == "seq-mean-token-sum-norm":  # constant normaliser b · max_len
    agg_M = jnp.full((M,), 1.0 / M, jnp.float32)
  else:  # the count of sequences with at least one token
    agg_M = sft.share(jnp.sum(jnp.any(mask_MxbxN, axis=2), axis=1))
  return {"tok": tok_M, "agg": agg_M, "has_tokens": jnp.any(mask_MxbxN, axis=(1, 2))}


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    loss_fn: Callable, micro_batches: int = 1,
                    aggregation: str = "seq-mean-token-mean") -> Callable:
  """train_step(state, batch, rng) -> (state, metrics); jit it with donated state.

  micro_batches > 1 sums float32 gradients over that many row chunks
  (sft.split_micro_batches) before one update, equal to the one-shot step: the
  policy loss (loss_fn's metrics["loss"]) is weighted by each chunk's share of
  the `aggregation`'s normaliser, the rest of the loss (the balance loss, a row
  mean) by 1/M; token-mean metrics by the token share; expert loads are summed."""
  if micro_batches < 1:
    raise ValueError(f"micro_batches={micro_batches} must be at least 1")
  M = micro_batches

  def objective(params, micro: dict, w: dict, rng: jax.Array):
    loss, metrics = loss_fn(params, micro, rng)
    policy = w["agg"] * metrics["loss"]
    obj = loss / M + policy - metrics["loss"] / M
    metrics["loss"] = policy
    for k in TOKEN_MEAN_METRICS:
      if k in metrics:
        metrics[k] = w["tok"] * metrics[k]
    for k, empty in (("ratio_min", jnp.inf), ("ratio_max", -jnp.inf)):
      if k in metrics:  # a chunk without tokens says nothing about the ratio
        metrics[k] = jnp.where(w["has_tokens"], metrics[k], empty)
    return obj, metrics

  def train_step(state: RLState, batch: dict, rng: jax.Array):
    if M == 1:
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch,
                                                                          rng)
    else:
      micro_M = sft.split_micro_batches(batch, M)
      loss, grads, metrics_M = sft.accumulate_gradients(
          objective, state.params, micro_M, grpo_micro_weights(micro_M, aggregation), rng)
      rules = dict.fromkeys(("loss", "tokens", "expert_load") + TOKEN_MEAN_METRICS, "sum")
      metrics = sft.combine_metrics(metrics_M, {**rules, "ratio_min": "min", "ratio_max": "max",
                                                "logp_mismatch/max": "max"})
      for k in ("ratio_min", "ratio_max"):
        if k in metrics:
          metrics[k] = jnp.where(jnp.isfinite(metrics[k]), metrics[k], 1.0)
    # A non-finite loss or gradient refuses the update (metrics["skipped_nonfinite"]).
    params, opt_state, metrics = sft.apply_gradients(cfg, optimizer, state.params,
                                                     state.opt_state, grads, loss, metrics)
    return state.replace(params=params, opt_state=opt_state), metrics

  return train_step


def make_logprob_fn(cfg: ModelConfig, temperature: float = 1.0, top_p: float = 1.0,
                    top_k: int = 0) -> Callable:
  """logprob_fn(params, ref_params, batch) -> (old_logp, ref_logp or None, sampled_logp), [b, N].

  old_logp and ref_logp are at the sampling temperature (the loss's π_old and
  π_ref). sampled_logp is π_old's log-prob under the distribution the sampler
  actually drew from, top-k/top-p applied as in `rollout.select_tokens`; it
  equals old_logp without truncation. Only the sampler/trainer mismatch reads it.
  """

  def logprob_fn(params, ref_params, batch: dict):
    N = batch["mask"].shape[1]
    args = (batch["tokens"], batch["positions"], batch["valid"])
    tokens_bxN = batch["tokens"][:, -N:]
    h_bxNxD = completion_hidden(cfg, params, *args, completion_len=N)[0]
    head = head_lib.head_weights(cfg, params)
    logprobs = functools.partial(head_lib.target_logprobs, h_bxNxD, head, tokens_bxN,
                                 chunk=cfg.logits_chunk, temperature=temperature, entropy=False)
    old = logprobs()[0]
    sampled = old
    if top_k or top_p < 1.0:
      # The sampler's own cut (rollout._truncate), so both sides truncate by one rule.
      sampled = logprobs(top_k=top_k, top_p=top_p)[0]
    ref = None if ref_params is None else ref_fn(ref_params, batch)
    return old, ref, sampled

  ref_fn = make_ref_logprob_fn(cfg, temperature)
  return logprob_fn


def make_ref_logprob_fn(cfg: ModelConfig, temperature: float = 1.0) -> Callable:
  """ref_fn(ref_params, batch) -> π_ref's log-probs [b, N] at the sampling temperature
  (an on-policy step's only forward before its update)."""

  def ref_fn(ref_params, batch: dict):
    N = batch["mask"].shape[1]
    return sequence_logprobs(cfg, ref_params, batch["tokens"], batch["positions"], batch["valid"],
                             completion_len=N, temperature=temperature, entropy=False)[0]

  return ref_fn


# Jitted programs are shared by every GRPOStep built with the same model, loss and
# optimizer (tests, notebooks, pipeline stages), so each compiles once.

@functools.lru_cache(maxsize=8)
def _programs(cfg: ModelConfig, ocfg: optim.OptimConfig, temperature: float = 1.0,
              top_p: float = 1.0, top_k: int = 0):
  """(optimizer, logprob_fn, ref_fn, copy); the log-probs follow the sampling settings."""
  optimizer = optim.make_optimizer(ocfg)
  logprob_fn = jax.jit(make_logprob_fn(cfg, temperature, top_p, top_k))
  ref_fn = jax.jit(make_ref_logprob_fn(cfg, temperature))
  # A real copy: params and ref_params must not share buffers when the state is donated.
  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
  return optimizer, logprob_fn, ref_fn, copy


@functools.lru_cache(maxsize=8)
def _train_step(cfg: ModelConfig, loss_options: tuple, ocfg: optim.OptimConfig,
                state_treedef, state_shardings: tuple, micro_batches: int = 1):
  """The jitted update, its state pinned to the shardings it came in with (left to
  itself, XLA may hand back replicated parameters); gradients accumulated over
  `micro_batches` chunks of the minibatch."""
  optimizer = _programs(cfg, ocfg)[0]
  options = dict(loss_options)
  step = make_train_step(cfg, optimizer, make_loss_fn(cfg, **options), micro_batches,
                         aggregation=options.get("aggregation", "seq-mean-token-mean"))
  out = (jax.tree.unflatten(state_treedef, state_shardings), None)  # None: metrics unpinned
  return jax.jit(step, donate_argnums=0, out_shardings=out)
