"""Rollout: a jitted sampler over the model's decode cache (MLA's latents, or GQA's k/v).

One prefill pass over the (left-padded) prompts, then a `lax.while_loop` that
decodes one token per row per step and stops as soon as every row has emitted
EOS. Shapes are static, so there is one compilation per (B, P, N) bucket and
sampling setting. Under MLA the cache holds only c_kv and k_pe per layer
(`LatentCache`): B × (P+N) × (kv_lora_rank + qk_rope_head_dim) × layers × dtype
bytes; keys and values are never re-expanded. Under GQA (the dense students) it
holds each layer's n_kv_heads keys and values (`cache_bytes_per_token`).

Layout: prompts are LEFT-padded, so every row's last prompt token sits at slot
P-1 and token j is written at slot P+j in all rows; a row's RoPE position is
slot − pad_count. `left_pad` turns right-padded prompts into this layout.

`generate` is the pure core (usable inside a bigger jit, e.g. a GRPO step);
it takes a `DecodeFn` so tests can plug in a model whose logits they control.
`sample` is the user-facing wrapper over the Transformer, compiled once per
static configuration.

Glossary: B batch, P prompt slots, N new tokens, S = P+N cache slots,
T tokens in one decode call, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r1jax.model import LatentCache, ModelConfig, Transformer
from r1jax.model import moe as moe_lib
from r1jax.model.transformer import stack_unroll, write_entries
from r1jax.parallel import expert_parallel
from r1jax.parallel.mesh import BATCH, batch_sharding

# (state, tokens_BxT, positions_BxT, start, valid_BxS) -> (logits_BxTxV, state)
DecodeFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How a token is drawn from the logits. temperature=0 is greedy (top-k/p ignored)."""
  temperature: float = 1.0
  top_p: float = 1.0  # nucleus: smallest set with probability ≥ top_p; 1 = off
  top_k: int = 0  # 0 = off

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@flax.struct.dataclass
class Rollout:
  """Generated completions; positions after a row's EOS hold pad_id and mask=False.

  logprobs: log π of each token under the distribution actually sampled from
      (temperature, top-k, top-p applied). Greedy has no proper distribution,
      so there it equals `model_logprobs`.
  model_logprobs: log π under the raw model (temperature 1, untruncated), the
      π_old of GRPO's ratio.
  lengths: tokens generated per row, EOS included. finished: the row emitted
      EOS (False: cut at max_new_tokens). steps: token positions generated
      before the loop stopped (< N when every row hit EOS early).
  """
  tokens: jax.Array  # [B, N] int32
  logprobs: jax.Array  # [B, N] float32, 0 where masked
  model_logprobs: jax.Array  # [B, N] float32, 0 where masked
  mask: jax.Array  # [B, N] bool
  lengths: jax.Array  # [B] int32
  finished: jax.Array  # [B] bool
  steps: jax.Array  # [] int32


# ----------------------------------------------------------------------------
# Token selection.

def _truncate(scaled_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets logits outside the top-k and the top-p nucleus to -inf (ties at the cut stay)."""
  x = scaled_BxV
  if not top_k and top_p >= 1.0:
    return x
  if top_k:
    # Only the k best can survive either filter, so the nucleus is found among them.
    sorted_BxK = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0]
  else:
    sorted_BxK = -jnp.sort(-x, axis=-1)
  if top_p < 1.0:
    probs_BxK = jax.nn.softmax(sorted_BxK, axis=-1)
    mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
    n_keep_B = jnp.sum(mass_before_BxK < top_p, axis=-1)  # ≥ 1: the best token always stays
  else:
    n_keep_B = jnp.full(x.shape[:1], sorted_BxK.shape[-1])
  cut_B = jnp.take_along_axis(sorted_BxK, n_keep_B[:, None] - 1, axis=-1)
  return jnp.where(x >= cut_B, x, -jnp.inf)


def select_tokens(logits_BxV: jax.Array, keys_B: jax.Array, settings: SamplingConfig):
  """Draws one token per row. Returns (tokens [B], sampling logp [B], model logp [B])."""
  logits = logits_BxV.astype(jnp.float32)
  model_logp_BxV = jax.nn.log_softmax(logits, axis=-1)
  if settings.greedy:
    tok_B = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    model_lp_B = jnp.take_along_axis(model_logp_BxV, tok_B[:, None], axis=-1)[:, 0]
    return tok_B, model_lp_B, model_lp_B
  scaled_BxV = _truncate(logits / settings.temperature, settings.top_k, settings.top_p)
  tok_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BxV).astype(jnp.int32)
  sample_logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
  lp_B = jnp.take_along_axis(sample_logp_BxV, tok_B[:, None], axis=-1)[:, 0]
  model_lp_B = jnp.take_along_axis(model_logp_BxV, tok_B[:, None], axis=-1)[:, 0]
  return tok_B, lp_B, model_lp_B


# ----------------------------------------------------------------------------
# The pure core.

def left_pad(prompts_BxP: jax.Array, lengths_B: jax.Array, pad_id: int) -> jax.Array:
  """Right-padded prompts -> left-padded (each row's tokens moved to the end)."""
  Pn = prompts_BxP.shape[1]
  shift_Bx1 = (Pn - lengths_B)[:, None]
  src_BxP = jnp.arange(Pn)[None, :] - shift_Bx1
  moved = jnp.take_along_axis(prompts_BxP, jnp.clip(src_BxP, 0, Pn - 1), axis=1)
  return jnp.where(src_BxP >= 0, moved, pad_id).astype(prompts_BxP.dtype)


def generate(decode_fn: DecodeFn, state: Any, prompts_BxP: jax.Array, prompt_lengths_B: jax.Array,
             rng: jax.Array, *, max_new_tokens: int, settings: SamplingConfig,
             eos_id: int | None, pad_id: int, row_offset: jax.Array | int = 0) -> Rollout:
  """Prefill + early-stopping decode loop. Pure and traceable.

  `prompts_BxP` are left-padded with 1 ≤ prompt_lengths ≤ P. `state` is the
  decode function's initial state (for the model: an empty LatentCache with
  ≥ P + max_new_tokens slots). Row b's randomness is `fold_in(rng, row_offset + b)`
  folded with the step: it depends on neither the other rows nor B, so a batch
  sampled in slices (each with its first row's global index as `row_offset`)
  draws the same tokens as the whole batch at once.
  """
  B, Pn = prompts_BxP.shape
  N = max_new_tokens
  S = Pn + N
  pad_B = (Pn - prompt_lengths_B).astype(jnp.int32)
  slots_S = jnp.arange(S, dtype=jnp.int32)
  prompt_valid_BxS = (slots_S[None] >= pad_B[:, None]) & (slots_S[None] < Pn)
  rows_B = jnp.asarray(row_offset, jnp.int32) + jnp.arange(B, dtype=jnp.int32)
  row_keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows_B)

  def step_keys(j):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys_B, j)

  # Prefill: every prompt slot in one pass; pad slots get position 0 and are masked.
  pos_BxP = jnp.maximum(slots_S[None, :Pn] - pad_B[:, None], 0)
  # Only the last slot's logits are read: a DecodeFn may return just those ([B,1,V]).
  logits_BxTxV, state = decode_fn(state, prompts_BxP.astype(jnp.int32), pos_BxP, 0,
                                  prompt_valid_BxS)
  tok_B, lp_B, mlp_B = select_tokens(logits_BxTxV[:, -1], step_keys(0), settings)

  tokens_BxN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok_B)
  logp_BxN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp_B)
  model_logp_BxN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(mlp_B)
  mask_BxN = jnp.zeros((B, N), bool).at[:, 0].set(True)
  done_B = jnp.zeros((B,), bool) if eos_id is None else tok_B == eos_id

  def cond(carry):
    j, _, _, _, _, _, done_B = carry
    return (j < N) & ~jnp.all(done_B)

  def body(carry):
    j, state, tokens_BxN, logp_BxN, model_logp_BxN, mask_BxN, done_B = carry
    # Feed token j-1 (slot P+j-1) to get the logits for token j.
    slot = Pn + j - 1
    prev_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxN, j - 1, 1, axis=1)
    pos_Bx1 = (slot - pad_B)[:, None]
    valid_BxS = prompt_valid_BxS | ((slots_S >= Pn) & (slots_S <= slot))[None]
    logits_Bx1xV, state = decode_fn(state, prev_Bx1, pos_Bx1, slot, valid_BxS)
    tok_B, lp_B, mlp_B = select_tokens(logits_Bx1xV[:, 0], step_keys(j), settings)
    live_B = ~done_B
    tok_B = jnp.where(live_B, tok_B, pad_id)

    def col(a_BxN, v_B):
      return jax.lax.dynamic_update_slice_in_dim(a_BxN, v_B[:, None].astype(a_BxN.dtype), j, 1)

    tokens_BxN = col(tokens_BxN, tok_B)
    logp_BxN = col(logp_BxN, jnp.where(live_B, lp_B, 0.0))
    model_logp_BxN = col(model_logp_BxN, jnp.where(live_B, mlp_B, 0.0))
    mask_BxN = col(mask_BxN, live_B)
    if eos_id is not None:
      done_B = done_B | (live_B & (tok_B == eos_id))
    return j + 1, state, tokens_BxN, logp_BxN, model_logp_BxN, mask_BxN, done_B

  carry = (jnp.int32(1), state, tokens_BxN, logp_BxN, model_logp_BxN, mask_BxN, done_B)
  steps, _, tokens_BxN, logp_BxN, model_logp_BxN, mask_BxN, done_B = jax.lax.while_loop(
      cond, body, carry)
  return Rollout(tokens=tokens_BxN, logprobs=logp_BxN, model_logprobs=model_logp_BxN,
                 mask=mask_BxN, lengths=mask_BxN.sum(-1, dtype=jnp.int32), finished=done_B,
                 steps=steps)


# ----------------------------------------------------------------------------
# The Transformer behind the core.

def model_decode_fn(cfg: ModelConfig, params, rows: int | None = None) -> DecodeFn:
  """The Transformer's cached decode as a DecodeFn (state = LatentCache, its
  unrolled stacks as lists of per-layer arrays: `split_cache`).

  It returns the last token's logits only ([B,1,V]): the prefill needs no more,
  and the head over every prompt slot would be [B,P,V] float32 for nothing. The
  new entries are written here, into each layer's own array: a stacked [L,...]
  cache in a decode loop was sliced per layer and copied back whole every token
  (bench.peer generate: 21 cache copies per token). Given the decode batch `rows`,
  where the MoE layers take the "dense" path for it (XLA:CPU's small batches) their
  expert weights are packed into two matrices here, once (`moe.pack_dense`)."""
  model = Transformer(cfg)
  unstacked = _unstack_unrolled(cfg, params)
  packed = _packed_experts(cfg, params, rows)
  packed_lists = _unstack_unrolled(cfg, packed)

  def decode(cache, tokens_BxT, positions_BxT, start, valid_BxS):
    variables = {"params": _restack(params, unstacked)}
    if packed:
      variables["decode"] = _restack(packed, packed_lists)
    logits, new = model.apply(variables, tokens_BxT, positions_BxT, _stacked(cache),
                              start, valid_BxS, method="decode", last_only=True, write=False)
    return logits, LatentCache({name: write_entries(parts, new.layers[name], start)
                                for name, parts in cache.layers.items()})

  return decode


def _packed_experts(cfg: ModelConfig, params, rows: int | None) -> dict:
  """{"moe_layers": {"moe": {"packed": (w_in [L,D,2H], w_out [L,H,D])}}} when a decode
  batch of `rows` takes the dense MoE path on one device, else {}."""
  if (rows is None or "moe_layers" not in params or moe_lib.moe_impl(cfg, rows) != "dense"
      or expert_parallel.expert_axis_size(expert_parallel.ambient_mesh()) > 1):
    return {}
  layer = params["moe_layers"]["moe"]
  pack = functools.partial(moe_lib.pack_dense, dtype=jnp.dtype(cfg.dtype))
  w_in, w_out = jax.vmap(pack)(layer["experts"], layer.get("shared"))
  return {"moe_layers": {"moe": {"packed": (w_in, w_out)}}}


def _stacked(cache: LatentCache) -> LatentCache:
  # Each layer's array goes into the stack unchanged, and the stack's per-layer
  # slices fold back to it: reading a layer's entries copies nothing.
  return LatentCache({name: tuple(jnp.stack(a) if isinstance(a, list) else a for a in parts)
                      for name, parts in cache.layers.items()})


def split_cache(cfg: ModelConfig, cache: LatentCache) -> LatentCache:
  """The cache with each unrolled stack's arrays as lists of per-layer arrays (the
  layout `model_decode_fn` updates in place; rolled stacks stay [L,...])."""
  lengths = {"dense_layers": cfg.n_dense_layers, "moe_layers": cfg.n_moe_layers}
  return LatentCache({
      name: tuple([a[i] for i in range(a.shape[0])] for a in parts)
      if stack_unroll(cfg, lengths[name]) >= lengths[name] else parts
      for name, parts in cache.layers.items()})


def _unstack_unrolled(cfg: ModelConfig, params) -> dict:
  """Each unrolled layer stack's parameters as per-layer arrays, sliced here, once.

  An unrolled stack (XLA:CPU, ≤ 8 layers: `transformer.stack_unroll`) slices
  every layer's weights out of the stacked [L, ...] arrays; inside the decode
  loop that was a copy of every layer weight per token (bench.peer generate:
  ~80 of ~550 ms). Sliced before the loop and stacked again inside it, XLA
  folds each slice of the stack to the array it came from: no copy. A rolled
  stack (a scan: dynamic slices) keeps its stacked arrays."""
  out = {}
  for name, length in (("dense_layers", cfg.n_dense_layers), ("moe_layers", cfg.n_moe_layers)):
    if name in params and stack_unroll(cfg, length) >= length:
      out[name] = jax.tree.map(lambda a: [a[i] for i in range(a.shape[0])], params[name])
  return out


def _restack(params, unstacked: dict):
  if not unstacked:
    return params
  stack = lambda tree: jax.tree.map(jnp.stack, tree, is_leaf=lambda x: isinstance(x, list))  # noqa: E731
  return {**params, **{name: stack(tree) for name, tree in unstacked.items()}}


def init_cache(cfg: ModelConfig, batch: int, slots: int, mesh: Mesh | None = None) -> LatentCache:
  """An empty cache (MLA latents or GQA k/v), its batch axis split over the
  data-parallel mesh axes."""
  cache = LatentCache.zeros(cfg, batch, slots)
  if mesh is None:
    return cache
  # [L, B, S, C|R] (MLA) or [L, B, S, G, K] (GQA)
  spec = lambda a: NamedSharding(mesh, P(None, BATCH, *([None] * (a.ndim - 2))))  # noqa: E731
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec(a)), cache)


def rollout(cfg: ModelConfig, params, prompts_BxP: jax.Array, prompt_lengths_B: jax.Array,
            rng: jax.Array, *, max_new_tokens: int, settings: SamplingConfig,
            eos_id: int | None, pad_id: int, mesh: Mesh | None = None,
            row_offset: jax.Array | int = 0) -> Rollout:
  """`generate` over the Transformer with a fresh cache. Pure; jit it or call it in a jit."""
  B, Pn = prompts_BxP.shape
  cache = split_cache(cfg, init_cache(cfg, B, Pn + max_new_tokens, mesh))
  decode = model_decode_fn(cfg, params, rows=None if mesh is not None else B)
  return generate(decode, cache, prompts_BxP, prompt_lengths_B, rng,
                  max_new_tokens=max_new_tokens, settings=settings, eos_id=eos_id,
                  pad_id=pad_id, row_offset=row_offset)


# One executable per (cfg, settings, N, eos, pad, mesh) and input shape: jit's own cache.
_rollout_jit = jax.jit(rollout, static_argnames=(
    "cfg", "max_new_tokens", "settings", "eos_id", "pad_id", "mesh"))
_left_pad_jit = jax.jit(left_pad, static_argnames=("pad_id",))


def _check_inputs(cfg: ModelConfig, prompts, lengths, max_new_tokens: int, mesh: Mesh | None):
  if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
    raise ValueError(f"prompts must be an integer [B, P] array, got {prompts.dtype}{prompts.shape}")
  B, Pn = prompts.shape
  if lengths.shape != (B,):
    raise ValueError(f"prompt_lengths must have shape ({B},), got {lengths.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if Pn + max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"P + max_new_tokens = {Pn + max_new_tokens} exceeds cfg.max_seq_len="
                     f"{cfg.max_seq_len}; shorten the prompt bucket or the completion")
  if not isinstance(lengths, jax.core.Tracer):
    n = np.asarray(lengths)
    if n.min() < 1 or n.max() > Pn:
      raise ValueError(f"prompt_lengths must lie in [1, {Pn}], got min {n.min()} max {n.max()}")
  if mesh is not None:
    n_dp = int(np.prod([mesh.shape[a] for a in BATCH]))
    if B % n_dp:
      raise ValueError(f"batch {B} is not divisible by the {n_dp} data-parallel devices "
                       f"of mesh {dict(mesh.shape)}; pad the batch to a multiple")


def sample(cfg: ModelConfig, params, prompts: jax.Array, prompt_lengths: jax.Array, *,
           max_new_tokens: int, rng: jax.Array, temperature: float = 1.0, top_p: float = 1.0,
           top_k: int = 0, eos_id: int | None, pad_id: int, padding: str = "left",
           mesh: Mesh | None = None, row_offset: int = 0) -> Rollout:
  """Samples completions for int32 prompts [B, P] (`padding` says which side is padded).

  With `mesh`, prompts are split over the data-parallel axes; place `params`
  with the training sharding beforehand (`logical_sharding(mesh, logical_axes(cfg))`).
  `eos_id=None` never stops early. Compiled once per static configuration.
  `row_offset`: the global index of row 0, when these prompts are one slice of
  a bigger batch (row r samples with `fold_in(rng, row_offset + r)`).
  """
  prompts = jnp.asarray(prompts, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  _check_inputs(cfg, prompts, prompt_lengths, max_new_tokens, mesh)
  if padding == "right":
    prompts = _left_pad_jit(prompts, prompt_lengths, pad_id=pad_id)
  elif padding != "left":
    raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
  if mesh is not None:
    prompts = jax.device_put(prompts, batch_sharding(mesh, 2))
    prompt_lengths = jax.device_put(prompt_lengths, batch_sharding(mesh, 1))
  settings = SamplingConfig(float(temperature), float(top_p), int(top_k))
  return _rollout_jit(cfg, params, prompts, prompt_lengths, rng, max_new_tokens=max_new_tokens,
                      settings=settings, eos_id=eos_id, pad_id=pad_id, mesh=mesh,
                      row_offset=np.int32(row_offset))
