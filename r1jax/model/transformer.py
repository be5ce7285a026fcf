"""The DeepSeek-V3 language model: blocks, layer stacks, MTP, and the LM.

Attention is MLA, or grouped-query attention for the dense Qwen2/Llama-3
students (`cfg.attention_kind`). The first `n_dense_layers` blocks use a dense
SwiGLU MLP, the rest DeepSeekMoE;
each kind is one `nn.scan`-ned stack (parameters carry a leading "layers" axis),
optionally rematerialised, so a 61-layer model compiles as two block bodies
(short stacks on CPU are unrolled: `stack_unroll`).

Two entry points share parameters:
  `Transformer(cfg).apply({"params": p}, tokens)` -> logits  (training form)
  `Transformer(cfg).apply({"params": p}, tokens, positions, cache, start, valid,
                          method="decode")` -> (logits, cache)  (MLA latents or GQA k/v)
The losses call the training form with `return_hidden=True` (final-normed
hidden states, no logits) and run the head chunk by chunk (r1jax/model/head.py).

Glossary: B batch, T tokens, S cache slots, D d_model, V vocab, L layers,
E routed experts.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.model import head as head_lib
from r1jax.model.config import ModelConfig
from r1jax.model.kv_cache import LatentCache
from r1jax.model.gqa import GQA
from r1jax.model.layers import MLP, Linear, RMSNorm, dtypes
from r1jax.model.mla import MLA
from r1jax.model.moe import MoE
from r1jax.parallel.mesh import shard_batch, shard_sequence


# cfg.attention_kind -> the attention module (same interface: training form, decode).
ATTENTION = {"mla": MLA, "gqa": GQA}


class Block(nn.Module):
  """Pre-norm residual block: x + Attn(norm(x)), then x + FFN(norm(x)); Attn is
  MLA or GQA, the FFN a SwiGLU MLP or DeepSeekMoE."""
  cfg: ModelConfig
  moe: bool

  def setup(self):
    c = self.cfg
    dt, pdt = dtypes(c)
    self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps, dt, pdt)
    self.attn = ATTENTION[c.attention_kind](c)
    self.mlp_norm = RMSNorm(c.d_model, c.rms_norm_eps, dt, pdt)
    if self.moe:
      self.ffn = MoE(c, name="moe")
    else:
      self.ffn = MLP(c.d_model, c.d_ff, dt, pdt, name="mlp")

  def _ffn(self, x_BxTxD, valid_BxT, sp: bool = False):
    h = self.mlp_norm(x_BxTxD)
    if sp:
      h = shard_batch(h)
    if self.moe:
      y, aux = self.ffn(h, valid_BxT)
    else:
      y, aux = self.ffn(h), {}
    return x_BxTxD + (shard_sequence(y) if sp else y), aux

  def __call__(self, x_BxTxD, layer_cache, pos_BxT, valid, start):
    """nn.scan's (carry, per-layer input) -> (carry, per-layer output).

    Training form when `layer_cache` is None (valid: [B,T]); otherwise the
    cache form (valid: [B,S]). Outputs (aux, the chunk's new cache entries or None).
    """
    # The residual stream is split over data×fsdp×expert (the "batch" rule) under
    # an ambient mesh, so no block's activations drift onto parameter shardings.
    # With sequence parallelism (training form) the stream is also split along
    # the sequence over `tensor`: the norms run on that split, each sublayer
    # sees the whole sequence (an all-gather) and its output is split again (a
    # reduce-scatter of the tensor-parallel partial sums).
    if layer_cache is None:
      sp = self.cfg.sequence_parallel
      x_BxTxD = shard_sequence(x_BxTxD) if sp else shard_batch(x_BxTxD)
      h = self.attn_norm(x_BxTxD)
      a = self.attn(shard_batch(h) if sp else h, pos_BxT, valid)
      x = x_BxTxD + (shard_sequence(a) if sp else a)
      x, aux = self._ffn(x, valid, sp)
      return x, (aux, None)
    x_BxTxD = shard_batch(x_BxTxD)
    a, latents = self.attn.decode(self.attn_norm(x_BxTxD), pos_BxT, layer_cache, start, valid)
    valid_BxT = jax.lax.dynamic_slice_in_dim(valid, start, x_BxTxD.shape[1], axis=1)
    x, aux = self._ffn(x_BxTxD + a, valid_BxT)
    return x, (aux, latents)


# On XLA:CPU a rolled layer loop slices each layer's parameters out of the
# stacked arrays and writes its outputs and gradients back every iteration; for
# a few layers straight-line code is faster (bench.peer train step, 3 MoE
# layers: 1.52 -> 1.14 s) and compiles in about the same time.
_CPU_UNROLL_MAX_LAYERS = 8


def write_entries(cache_parts, new_parts, start):
  """Each cache array with its new entries written at slots [start, start+T): arrays
  [L,B,S,...] take [L,B,T,...]; a list of per-layer [B,S,...] arrays takes one
  [B,T,...] slice of the new entries each (the sampler's unrolled-stack layout)."""
  out = []
  for full, new in zip(cache_parts, new_parts):
    if isinstance(full, (list, tuple)):
      out.append([jax.lax.dynamic_update_slice_in_dim(f, new[i].astype(f.dtype), start, axis=1)
                  for i, f in enumerate(full)])
    else:
      out.append(jax.lax.dynamic_update_slice_in_dim(full, new.astype(full.dtype), start, axis=2))
  return tuple(out)


def stack_unroll(cfg: ModelConfig, length: int, backend: str | None = None) -> int:
  """lax.scan's unroll factor for a stack of `length` layers: cfg.scan_unroll, or
  for 0 ("auto") the whole stack on CPU when it has ≤ 8 layers, else 1."""
  if cfg.scan_unroll:
    return min(cfg.scan_unroll, length)
  backend = backend or jax.default_backend()
  return length if backend == "cpu" and length <= _CPU_UNROLL_MAX_LAYERS else 1


def _stack(cfg: ModelConfig, moe: bool, length: int, name: str) -> nn.Module:
  body = Block
  if cfg.remat:
    body = nn.remat(body, prevent_cse=False, policy=_remat_policy())
  scanned = nn.scan(
      body,
      variable_axes={"params": 0, "decode": 0},
      split_rngs={"params": True},
      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
      length=length,
      unroll=stack_unroll(cfg, length),
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scanned(cfg, moe, name=name)


def _remat_policy():
  """What the rematerialised stacks and MTP blocks keep for the backward: nothing."""
  return jax.checkpoint_policies.nothing_saveable


class MTP(nn.Module):
  """One multi-token-prediction depth: h' = M·[RMSNorm(emb); RMSNorm(h)] → block.

  Returns (the block's output h^k, its final-normed form for the head, the
  block's MoE aux). Depth k+1 takes h^k, not the normed form (V3 report §2.2).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BxTxD, emb_BxTxD, pos_BxT, valid_BxT):
    c = self.cfg
    dt, pdt = dtypes(c)
    e = RMSNorm(c.d_model, c.rms_norm_eps, dt, pdt, name="enorm")(emb_BxTxD)
    h = RMSNorm(c.d_model, c.rms_norm_eps, dt, pdt, name="hnorm")(h_BxTxD)
    x = Linear((2 * c.d_model,), (c.d_model,), ("mtp_embed", "embed"), dt, pdt,
               name="eh_proj")(jnp.concatenate([e, h], axis=-1))
    x, (aux, _) = Block(c, moe=c.n_moe_layers > 0, name="block")(x, None, pos_BxT, valid_BxT, None)
    return x, RMSNorm(c.d_model, c.rms_norm_eps, dt, pdt, name="norm")(x), aux


class Transformer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    dt, pdt = dtypes(c)
    # A tied embedding is also the output head: at std 1 its logits would start
    # with std ~sqrt(d_model) (a near-one-hot policy); 1/sqrt(d_model) gives ~1,
    # like the untied head's fan-in init.
    embed_std = c.d_model ** -0.5 if c.tie_embeddings else 1.0
    self.embed = nn.Embed(
        c.vocab_size, c.d_model, dtype=dt, param_dtype=pdt,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(embed_std),
                                                    ("vocab", "embed")))
    if c.n_dense_layers:
      self.dense_layers = _stack(c, False, c.n_dense_layers, "dense_layers")
    if c.n_moe_layers:
      self.moe_layers = _stack(c, True, c.n_moe_layers, "moe_layers")
    self.final_norm = RMSNorm(c.d_model, c.rms_norm_eps, dt, pdt)
    if not c.tie_embeddings:
      self.lm_head = Linear((c.d_model,), (c.vocab_size,), ("embed", "vocab"), dt, pdt)
    # Under remat the MTP blocks are recomputed in the backward like the main stack's.
    mtp = nn.remat(MTP, policy=_remat_policy()) if c.remat else MTP
    self.mtp = [mtp(c) for _ in range(c.mtp_depth)]

  def head(self, h_BxTxD):
    """Output logits in float32 from final-normed hidden states."""
    c = self.cfg
    if c.tie_embeddings:
      w = head_lib.HeadWeights(self.embed.embedding, True, jnp.dtype(c.dtype))
    else:
      w = head_lib.HeadWeights(self.lm_head.kernel, False, jnp.dtype(c.dtype))
    return head_lib.project(h_BxTxD, w)

  def _stacks(self, x, pos, valid, cache: LatentCache | None, start, write: bool = True):
    aux = {}
    new_cache = {}
    for name in ("dense_layers", "moe_layers"):
      if not hasattr(self, name):
        continue
      layer_cache = None if cache is None else cache.layers[name]
      x, (stack_aux, latents) = getattr(self, name)(x, layer_cache, pos, valid, start)
      if name == "moe_layers":
        aux = stack_aux
      if cache is not None and not write:
        new_cache[name] = latents
      elif cache is not None:  # the new slots [start, start+T) of every layer, in place
        new_cache[name] = write_entries(layer_cache, latents, start)
    return x, aux, new_cache

  def __call__(self, tokens_BxT, positions_BxT=None, valid_BxT=None, *,
               return_aux: bool = False, return_hidden: bool = False):
    """Training form. Returns logits [B,T,V] (float32), or (logits, aux) with
    aux = {"expert_load": [L_moe, E], "balance": [L_moe],
           "mtp_logits": [depth, B, T, V] where entry k-1 at position i predicts
           token i+k+1, and when the MTP block is MoE "mtp_expert_load"
           [depth, E], "mtp_balance" [depth]}. `valid` marks real tokens.

    With `return_hidden` the head is not run: the final-normed hidden states
    [B,T,D] stand in for the logits, and aux["mtp_hidden"] [depth, B, T, D]
    (each depth's normed output) for aux["mtp_logits"]; apply the head with
    r1jax.model.head."""
    c = self.cfg
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if valid_BxT is None:
      valid_BxT = jnp.ones((B, T), bool)
    x = shard_batch(self.embed(tokens_BxT))
    x, moe_aux, _ = self._stacks(x, positions_BxT, valid_BxT, None, None)
    h_BxTxD = self.final_norm(x)
    out = h_BxTxD if return_hidden else self.head(h_BxTxD)  # [B,T,D] or [B,T,V]
    run_mtp = c.mtp_depth > 0 and (return_aux or self.is_initializing())
    mtp_logits, mtp_aux = [], []
    if run_mtp:
      # Depth 1 takes the main model's final-normed output (as vLLM and SGLang
      # feed DeepSeek's MTP layer); depth k > 1 the previous block's output.
      h = h_BxTxD
      for k, module in enumerate(self.mtp, start=1):
        # Depth k at position i sees token i+k and predicts token i+k+1.
        shifted = jnp.concatenate([tokens_BxT[:, k:], jnp.zeros((B, k), tokens_BxT.dtype)], 1)
        ok = valid_BxT & (jnp.arange(T) < T - k)[None]
        h, normed, aux_k = module(h, shard_batch(self.embed(shifted)), positions_BxT, ok)
        mtp_logits.append(normed if return_hidden else self.head(normed))
        if aux_k:
          mtp_aux.append(aux_k)
    if not return_aux:
      return out
    aux = {}
    if moe_aux:
      aux["expert_load"] = moe_aux["load"]
      aux["balance"] = moe_aux["balance"]
    if mtp_logits:
      aux["mtp_hidden" if return_hidden else "mtp_logits"] = jnp.stack(mtp_logits)
    if mtp_aux:
      # The MTP blocks' MoE is balanced like the main stack's (bias rule and loss).
      aux["mtp_expert_load"] = jnp.stack([a["load"] for a in mtp_aux])
      aux["mtp_balance"] = jnp.stack([a["balance"] for a in mtp_aux])
    return out, aux

  def decode(self, tokens_BxT, positions_BxT, cache: LatentCache, start, valid_BxS, *,
             last_only: bool = False, write: bool = True):
    """Cache form (MLA latents or GQA k/v): runs T new tokens written at cache
    slots [start, start+T).

    `valid_BxS` marks every filled slot including the new ones. Returns
    (logits [B,T,V] float32, updated cache); with `last_only` the logits of the
    last token only, [B,1,V] (what a sampler's prefill needs). Prefill is this
    call with start=0. With `write=False` the second result holds only the T new
    entries of every layer ([L,B,T,...] per stack), for a caller that keeps the
    cache in another layout and writes them itself (`write_entries`).
    """
    x = shard_batch(self.embed(tokens_BxT))
    x, _, layers = self._stacks(x, positions_BxT, valid_BxS, cache, start, write)
    if last_only:
      x = x[:, -1:]
    return self.head(self.final_norm(x)), LatentCache(layers)
