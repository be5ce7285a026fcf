"""Bytes per device of a model on a mesh, from abstract shapes and formulas.

Parameters, optimizer state and gradients: each leaf's logical axes -> mesh
axes (the rule table) -> every dim divided by its mesh axes' sizes, rounded up.
Activations: a formula (see `activation_bytes`). r1jax/tools/plan.py builds
plans and searches meshes with these.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.model import ModelConfig, abstract_params, cache_bytes_per_token, logical_axes
from r1jax.model.grouped import block_rows
from r1jax.model.moe import exchange_impl, grouped_impl
from r1jax.parallel import mesh as mesh_lib

# ----------------------------------------------------------------------------
# Sharded sizes of parameters, optimizer state and gradients.

def mesh_specs(cfg: ModelConfig):
  """A tree of mesh-axis PartitionSpecs, one per parameter, from the rule table."""
  return nn.logical_to_mesh(logical_axes(cfg), mesh_lib.RULES)


def mesh_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(shape: tuple[int, ...], spec, sizes: dict[str, int],
                skip: tuple[str, ...] = ()) -> tuple[int, ...]:
  """The largest shard of `shape` under `spec`; mesh axes in `skip` count as unsharded."""
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  out = []
  for d, entry in zip(shape, entries):
    k = math.prod(sizes[a] for a in mesh_axes(entry) if a not in skip)
    out.append(-(-d // k))
  return tuple(out)


@functools.lru_cache(maxsize=8)
def param_leaves(cfg: ModelConfig) -> tuple:
  """((path string, ShapeDtypeStruct, mesh PartitionSpec), ...) of every parameter."""
  shapes = jax.tree_util.tree_leaves_with_path(abstract_params(cfg))
  specs = jax.tree.leaves(mesh_specs(cfg), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return tuple((jax.tree_util.keystr(p), s, spec) for (p, s), spec in zip(shapes, specs))


# Optimizer state bytes per parameter element, by parameter itemsize. The
# router's correction biases are frozen (`optim.is_router_bias`): no state.
OPTIMIZERS = {
    # Mixed precision, what a stable bf16 run needs: two f32 moments, plus an
    # f32 master copy of every parameter stored narrower than f32.
    "adamw": lambda itemsize: 8 + (4 if itemsize < 4 else 0),
    # What `optim.make_optimizer` builds (state_bytes measures its abstract state;
    # this per-element rule is only the fallback: moments in the parameter dtype).
    "adamw_as_built": lambda itemsize: 2 * itemsize,
}


def state_bytes(cfg: ModelConfig, sizes: dict[str, int], optimizer: str = "adamw") -> dict:
  """Per-device bytes of params, optimizer state and gradients (gradients: param dtype,
  sharded like the params, as `jax.value_and_grad` of sharded params returns them)."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"--optimizer={optimizer!r}; known: {sorted(OPTIMIZERS)}")
  per_elem = OPTIMIZERS[optimizer]
  params = opt = 0
  for path, s, spec in param_leaves(cfg):
    n = math.prod(shard_shape(s.shape, spec, sizes))
    itemsize = jnp.dtype(s.dtype).itemsize
    params += n * itemsize
    if not path.replace("']['", "/").endswith("router/bias']"):
      opt += n * per_elem(itemsize)
  if optimizer == "adamw_as_built":  # exactly what optim.make_optimizer's init returns
    from r1jax.train import optim  # noqa: PLC0415
    opt = built_optimizer_bytes(cfg, tuple(sorted(sizes.items())), optim.OptimConfig())
  return {"params": params, "optimizer": opt, "gradients": params}


def gathered_layer_bytes(cfg: ModelConfig, sizes: dict[str, int], stack: str) -> int:
  """One layer of `stack` as its matmuls see it: gathered over fsdp (and data), still
  split over tensor and (experts) expert, cast to the compute dtype."""
  dt = jnp.dtype(cfg.dtype).itemsize
  total = 0
  for path, s, spec in param_leaves(cfg):
    if path.startswith(f"['{stack}']"):
      total += math.prod(shard_shape(s.shape, spec, sizes, skip=("data", "fsdp"))[1:]) * dt
  return total


# ----------------------------------------------------------------------------
# Activations.

def _resolve(cfg: ModelConfig, backend: str) -> tuple[str, str]:
  """(grouped matmul, expert exchange) the model will use on `backend` ("cpu" or
  "accelerator"), by the model's own rules."""
  return grouped_impl(cfg, backend), exchange_impl(cfg.ep_exchange, backend)


def _gmm_rows(cfg: ModelConfig, rows: int, groups: int, gmm: str) -> int:
  """Rows the grouped matmul holds: the blocked and sorted forms pad each group to
  whole blocks."""
  if gmm not in ("blocked", "sorted"):
    return rows
  b = block_rows(rows, groups, cfg.gmm_block_size)
  return max((rows + groups * (b - 1)) // b, 1) * b


def attention_kind(cfg: ModelConfig, b: int, T: int, H: int, backend: str) -> tuple[str, int]:
  """(the kernel the model runs for this training-form shape, its block size), as
  r1jax/model/attention.py chooses it; "reference" (full scores) before that existed."""
  impl = getattr(cfg, "attention", "reference")
  try:
    from r1jax.model.attention import choose_attention  # noqa: PLC0415
  except ImportError:
    return "reference", 0
  kind = choose_attention(impl, B=b, T=T, S=T, H=H, E=cfg.qk_head_dim, V=cfg.value_head_dim,
                          dtype=cfg.dtype, static_start=True,
                          backend="cpu" if backend == "cpu" else "gpu")
  return kind, cfg.attention_block


def _attention_fwd(cfg: ModelConfig, b: int, T: int, tp: int, dt: int,
                   backend: str = "accelerator") -> int:
  n, H = b * T, -(-cfg.n_heads // tp)
  V = cfg.value_head_dim
  if cfg.attention_kind == "gqa":  # kv heads are not split over tensor (mesh RULES)
    q_lora, q = 0, 2 * n * H * cfg.head_dim * dt  # q and its rotation
    kv = 3 * n * cfg.n_kv_heads * cfg.head_dim * dt  # k, its rotation, v
  else:
    C, R, K = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    q_lora = 2 * n * cfg.q_lora_rank * dt  # projection and its norm
    q = 2 * n * H * (K + R) * dt  # q and its rotated split
    kv = 2 * n * (C + R) * dt + n * H * (K + V) * dt
  kind, block = attention_kind(cfg, b, T, H, backend)
  if kind == "reference":
    scores = b * H * T * T * (2 * dt + 4)  # logits (dt), probabilities (f32 and dt)
  else:  # one [block, block] tile of scores, running max/sum and an f32 accumulator
    tq = min(block, T)
    scores = b * H * tq * min(block, T) * (2 * dt + 4) + n * H * (V + 2) * 4
  out = n * H * V * dt + n * cfg.d_model * dt
  return q_lora + q + kv + scores + out


def _moe_fwd(cfg: ModelConfig, n: int, sizes: dict[str, int], backend: str, dt: int) -> int:
  """Router, shared expert and routed dispatch buffers of one MoE layer (worst case:
  the dropless branch's buffers count even when a capacity factor is set)."""
  E, K, D = cfg.n_routed_experts, cfg.n_activated_experts, cfg.d_model
  tp, X = sizes["tensor"], sizes["expert"]
  F = -(-cfg.moe_d_ff // tp)
  gmm, exchange = _resolve(cfg, backend)
  router = 4 * n * E * 4  # logits, scores, biased and group-masked choices, f32
  shared = 3 * n * cfg.n_shared_experts * F * dt
  if X == 1:  # sort + grouped matmul over every (token, expert) pair
    rows = _gmm_rows(cfg, n * K, E, gmm)
    moved = 2 * n * K * D * dt  # gathered inputs, unsorted outputs
  else:  # r1jax/parallel/expert_parallel.py: send, exchange, local experts, return
    L = E // X
    J = min(K, L)
    c = min(n, cfg.ep_chunk_tokens or n)  # tokens exchanged at once (chunked exchange)
    send = X * c if exchange == "all_to_all" else c * min(K, X)
    recv = X * c
    rows = _gmm_rows(cfg, recv * J, L, gmm)
    moved = (2 * send + recv + recv * J) * D * dt
  routed = moved + rows * (2 * D + 3 * F) * dt  # sorted in/out rows, gate/up/hidden
  if gmm == "blocked":  # one copy of its expert's three weights per block of rows
    b = block_rows(rows, E if X == 1 else E // X, cfg.gmm_block_size)
    routed += rows // b * 3 * D * F * dt
  return router + shared + routed + n * D * dt


def head_tokens(cfg: ModelConfig, b: int, T: int) -> int:
  """Tokens whose [V] logits exist at once: all b·T, or b·logits_chunk with a chunked head."""
  chunk = getattr(cfg, "logits_chunk", 0)
  return b * (min(chunk, T) if chunk else T)


def activation_bytes(cfg: ModelConfig, sizes: dict[str, int], batch: int, seq_len: int,
                     backend: str = "accelerator") -> dict:
  """Per-device activation estimate of one forward + backward step.

  Tokens per device n = ceil(batch / (data·fsdp·expert))·seq_len (the batch is
  replicated over tensor). Per layer, "fwd" = its forward intermediates (attention
  with the full [heads/tensor, T, T] scores, dense MLP or MoE with its dispatch
  buffers) and "weights" = its parameters gathered over fsdp. With remat (every
  scanned block recomputed in backward, nothing saved):
    saved   = n·D·dtype per layer (each block's input)
    working = 2·(fwd + weights) of the largest layer (recomputed forward + cotangents)
  Without remat, saved = Σ over layers of fwd and working = fwd + 2·weights. The MTP block is not rematerialised:
  its fwd is saved. head = 3 f32 copies (logits, log-softmax, cotangent) of
  [n, vocab/tensor] per output head (main + MTP depths) plus the head's gathered
  weights; inputs = the batch arrays.
  """
  dt = jnp.dtype(cfg.dtype).itemsize
  tp = sizes["tensor"]
  n_batch = math.prod(sizes[a] for a in mesh_lib.BATCH)
  b = -(-batch // n_batch)
  n = b * seq_len
  D = cfg.d_model
  attn = _attention_fwd(cfg, b, seq_len, tp, dt, backend)
  norms = 3 * n * D * dt  # two pre-norms and the residual sum
  layers = []  # (fwd, gathered weights, count)
  if cfg.n_dense_layers:
    dense = attn + norms + (3 * n * (-(-cfg.d_ff // tp)) + n * D) * dt
    layers.append((dense, gathered_layer_bytes(cfg, sizes, "dense_layers"), cfg.n_dense_layers))
  if cfg.n_moe_layers:
    moe = attn + norms + _moe_fwd(cfg, n, sizes, backend, dt)
    layers.append((moe, gathered_layer_bytes(cfg, sizes, "moe_layers"), cfg.n_moe_layers))
  mtp_fwd = 0
  if cfg.mtp_depth:
    ffn = (_moe_fwd(cfg, n, sizes, backend, dt) if cfg.n_moe_layers
           else (3 * n * (-(-cfg.d_ff // tp)) + n * D) * dt)
    mtp_fwd = cfg.mtp_depth * (attn + norms + ffn + 4 * n * D * dt)  # + concat, projection
  if cfg.remat:  # each block's input; sequence parallelism splits it over tensor
    sp = tp if getattr(cfg, "sequence_parallel", False) and seq_len % tp == 0 else 1
    saved = sum(count for _, _, count in layers) * n * D * dt // sp
  else:
    saved = sum(fwd * count for fwd, _, count in layers)
  # Backward of one layer: its cotangents (≈ its forward) and the gathered weights'
  # gradient, plus, with remat, the recomputed forward.
  working = max(((2 if cfg.remat else 1) * fwd + 2 * w for fwd, w, _ in layers), default=0)
  vocab = -(-cfg.vocab_size // tp)
  head_w = D * vocab * dt
  # logits, log-softmax and cotangent (chunked: r1jax/model/head.py's ~4 per chunk)
  copies = 4 if getattr(cfg, "logits_chunk", 0) else 3
  head = (1 + cfg.mtp_depth) * copies * head_tokens(cfg, b, seq_len) * vocab * 4 + 2 * head_w
  inputs = 4 * n * 4  # tokens, positions, loss_mask, valid
  parts = {"saved_layer_inputs": saved, "layer_working_set": working, "mtp_saved": mtp_fwd,
           "head_and_loss": head, "inputs": inputs}
  return {"tokens_per_device": n, "sequences_per_device": b, **parts, "total": sum(parts.values())}


# ----------------------------------------------------------------------------
# Whole programs (r1jax/tools/compile_plan.py compiles the same ones).

@functools.lru_cache(maxsize=8)
def built_optimizer_bytes(cfg: ModelConfig, sizes: tuple, ocfg) -> int:
  """Per-device bytes of the state `optim.make_optimizer(ocfg)` builds (moments, and
  a master copy where it keeps one), each leaf sharded like its parameter."""
  from r1jax.train import optim  # noqa: PLC0415
  sizes = dict(sizes)
  specs = {p: (s.shape, spec) for p, s, spec in param_leaves(cfg)}
  state = jax.eval_shape(optim.make_optimizer(ocfg).init, abstract_params(cfg))
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    key = jax.tree_util.keystr(path)
    spec = next((sp for p, (shape, sp) in specs.items()
                 if key.endswith(p) and shape == x.shape), ())
    total += math.prod(shard_shape(x.shape, spec, sizes)) * jnp.dtype(x.dtype).itemsize
  return total


def _forward_bytes(cfg: ModelConfig, sizes: dict[str, int], b: int, T: int, backend: str) -> int:
  """Forward only (no gradient): the largest layer's intermediates and gathered weights,
  the residual stream, and the f32 logits with their log-softmax."""
  dt = jnp.dtype(cfg.dtype).itemsize
  D, tp = cfg.d_model, sizes["tensor"]
  n = b * T
  attn = _attention_fwd(cfg, b, T, tp, dt, backend) + 3 * n * D * dt
  layers = []
  if cfg.n_dense_layers:
    layers.append(attn + (3 * n * -(-cfg.d_ff // tp) + n * D) * dt
                  + gathered_layer_bytes(cfg, sizes, "dense_layers"))
  if cfg.n_moe_layers:
    layers.append(attn + _moe_fwd(cfg, n, sizes, backend, dt)
                  + gathered_layer_bytes(cfg, sizes, "moe_layers"))
  vocab = -(-cfg.vocab_size // tp)
  return max(layers, default=0) + 2 * n * D * dt + 3 * head_tokens(cfg, b, T) * vocab * 4


def _decode_bytes(cfg: ModelConfig, sizes: dict[str, int], b: int, S: int, backend: str) -> int:
  """One T = 1 decode step's working set over S slots (the cache itself not counted)."""
  dt = jnp.dtype(cfg.dtype).itemsize
  H = -(-cfg.n_heads // sizes["tensor"])
  D = cfg.d_model
  per_slot = cache_bytes_per_token(cfg, dt)["cache"] // cfg.n_layers  # one layer's entry
  scores = b * H * S * (2 * dt + 4) + b * S * per_slot  # + the cache slices in compute dtype
  ffn = max(3 * b * -(-cfg.d_ff // sizes["tensor"]) * dt if cfg.n_dense_layers else 0,
            _moe_fwd(cfg, b, sizes, backend, dt) if cfg.n_moe_layers else 0)
  weights = max(gathered_layer_bytes(cfg, sizes, s) for s in ("dense_layers", "moe_layers")
                if getattr(cfg, f"n_{s}"))
  vocab = -(-cfg.vocab_size // sizes["tensor"])
  return scores + ffn + weights + b * (4 * D * dt + 2 * vocab * 4)


def program_bytes(prog, sizes: dict[str, int], backend: str = "accelerator") -> dict:
  """The formula for one compile_plan.Program, per device: "peak" (what XLA's
  argument + output + temp − alias should be) and "resident" (state held but not
  passed), with the parts. Optimizer state as `optim.make_optimizer` builds it."""
  cfg = prog.cfg
  key = tuple(sorted(sizes.items()))
  n_batch = math.prod(sizes[a] for a in mesh_lib.BATCH)
  b = -(-prog.micro_rows // n_batch)
  st = state_bytes(cfg, sizes, "adamw_as_built")
  params = st["params"]
  opt = built_optimizer_bytes(cfg, key, prog.ocfg)
  ref = params if prog.grpo is not None and prog.grpo.beta > 0 else 0
  parts = {}
  if prog.name in ("grpo_update", "sft"):
    run = cfg.replace(mtp_depth=0) if prog.name == "grpo_update" else cfg
    act = activation_bytes(run, sizes, b * n_batch, prog.seq_len, backend)["total"]
    accumulate = st["gradients"] * 4 // jnp.dtype(cfg.param_dtype).itemsize
    parts = {"params": params, "optimizer": opt, "reference": ref, "gradients": st["gradients"],
             "accumulator": accumulate if prog.micro_batches > 1 else 0, "activations": act}
    resident = 0
  elif prog.name == "logprob":
    run = cfg.replace(mtp_depth=0)
    parts = {"params": params, "reference": ref,
             "activations": _forward_bytes(run, sizes, b, prog.seq_len, backend)}
    resident = opt
  elif prog.name == "decode":
    dt = jnp.dtype(cfg.dtype).itemsize
    cache = b * prog.slots * cache_bytes_per_token(cfg, dt)["cache"]
    parts = {"params": params, "cache": cache,
             "activations": _decode_bytes(cfg, sizes, b, prog.slots, backend)}
    resident = opt + ref
  else:
    raise ValueError(f"unknown program {prog.name!r}")
  return {**parts, "peak": sum(parts.values()), "resident": resident}
