"""Hugging Face DeepSeek-V3, Qwen2 and Llama checkpoints <-> r1jax parameters.

`load(path)` reads a checkpoint directory (config.json plus one
model.safetensors or shards listed in model.safetensors.index.json, bf16 or
f32) into `(ModelConfig, params)`; `save(path, cfg, params)` writes one that
transformers loads (checked against 5.23), in the official spelling that vLLM
and SGLang read too. Names follow the official checkpoints:
one tensor per routed expert (`mlp.experts.N.{gate,up,down}_proj.weight`), the
MTP module at layer index `num_hidden_layers + k`.

Layouts: torch linear weights are [out, in]; r1jax kernels are [in, out] with
the head axis split out (`wq_b` [Q, H, K+R], `wkv_b` [C, H, K+V], `wo`
[H, V, D]). The rotary dims keep the checkpoint's layout: `rope_interleave`
(adjacent pairs, the official layout) becomes `rope_interleaved`, nothing is
permuted. `kv_a_proj_with_mqa` keeps c_kv first, then k_pe, as `wkv_a` does.

The MTP module shares the main embedding and output head; the checkpoint's
copies (`model.layers.{n}.embed_tokens`, `shared_head.head`) are checked
against the main ones on load (a warning if they differ, the main ones win)
and written as copies on save.

One name table (hf_names.py's `slot_table`: a `Slot` per checkpoint tensor)
serves both directions and both ways of loading. Without a mesh, leaves come back as host
numpy arrays. `load(path, mesh=mesh)` streams instead: each leaf is built on
the mesh with `jax.make_array_from_callback`, sharded by the rule table, and
each block a device holds is assembled from only the checkpoint tensors, and
slices of them, that overlap it (see hf_stream.py), so a process reads what
its devices hold and its host memory stays near one tensor plus one block,
which is how the 671B model loads. `save` fetches one tensor at a time from
arrays sharded over any number of processes and process 0 writes.
FP8 checkpoints (`weight_scale_inv`) are not handled: dequantise them to bf16
first.

Qwen2ForCausalLM / LlamaForCausalLM directories (the dense GQA students) load
into `attention_kind="gqa"` configs: `q_proj`/`k_proj`/`v_proj` (and their
biases under Qwen2) become `wq`/`wk`/`wv` [D, heads, head_dim], `o_proj` `wo`.
Their checkpoints already rotate halves (`rope_interleaved=False`).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors.numpy import save_file

from r1jax.interop import hf_stream
from r1jax.interop.hf_config import config_from_hf, config_to_hf
from r1jax.interop.hf_names import Slot, copy_slots, leaf_shapes, slot_table
from r1jax.model.config import ModelConfig
from r1jax.model.params import logical_axes
from r1jax.parallel.mesh import AXES, logical_sharding

__all__ = ["config_from_hf", "config_to_hf", "load", "save", "to_hf_tensors"]

Params = dict[str, Any]

_INDEX = hf_stream.INDEX
# Keys some older checkpoints carry that hold no parameter.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# The router's correction bias stays float32 in every file we write: it moves
# in steps of γ = 0.001, below bf16's resolution near ±1 (official files keep it
# float32 too), and it makes bf16 saves of loaded checkpoints lossless.
_FLOAT32_SUFFIXES = ("e_score_correction_bias",)


# ----------------------------------------------------------------------------
# Tree helpers.

def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _leaf_paths(tree: Params, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaf_paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


def _name_list(names: list[str], limit: int = 20) -> str:
  shown = ", ".join(sorted(names)[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ----------------------------------------------------------------------------
# Load.

def _checkpoint(path: str, dtype: str | None, mtp: bool,
                overrides: dict) -> tuple[ModelConfig, dict[str, str]]:
  """The config and the tensors to read (name -> file), every name checked
  against the config; MTP layers past cfg.mtp_depth are left out."""
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  cfg = config_from_hf(hf, **{**({"dtype": dtype, "param_dtype": dtype} if dtype else {}),
                              **overrides})
  names = hf_stream.tensor_files(path)
  fp8 = [n for n in names if n.endswith("weight_scale_inv")]
  if fp8:
    raise ValueError(f"{path} is an FP8 checkpoint ({fp8[0]}, ...): dequantise it to bf16 "
                     "first, e.g. with DeepSeek-V3's inference/fp8_cast_bf16.py")
  names = {n: f for n, f in names.items() if not n.endswith(_IGNORED_SUFFIXES)}

  # MTP: as many layers as the files hold, at most what the config declares.
  declared = cfg.mtp_depth
  present = [k for k in range(declared)
             if any(n.startswith(f"model.layers.{cfg.n_layers + k}.") for n in names)]
  depth = len(present) if mtp else 0
  if present != list(range(len(present))):
    raise ValueError(f"MTP layers {present} present but not contiguous from layer {cfg.n_layers}")
  if mtp and declared and depth < declared:
    warnings.warn(f"config declares {declared} MTP layer(s) but {path} holds {depth}; "
                  f"loading mtp_depth={depth}")
  cfg = cfg.replace(mtp_depth=depth)
  names = {n: f for n, f in names.items()
           if not any(n.startswith(f"model.layers.{cfg.n_layers + k}.")
                      for k in range(depth, declared))}

  slots = slot_table(cfg)
  copies = _load_copies(cfg, slots)
  unknown = [n for n in names if n not in slots and n not in copies]
  missing = [n for n in slots if n not in names]
  if unknown or missing:
    msg = [f"{path} does not match its config.json ({cfg.attention_kind} attention, "
           f"{cfg.n_layers} layers, {cfg.n_dense_layers} dense):"]
    if missing:
      msg.append(f"missing tensors: {_name_list(missing)}")
    if unknown:
      msg.append(f"unexpected tensors: {_name_list(unknown)}")
    raise ValueError(" ".join(msg))
  return cfg, names


def _load_copies(cfg: ModelConfig, slots: dict[str, Slot]) -> dict[str, Slot]:
  """Tensors that repeat a leaf: compared with it on load, never loaded."""
  copies = {n: s for k in range(cfg.mtp_depth) for n, s in copy_slots(cfg, slots, k).items()}
  if cfg.tie_embeddings:
    copies["lm_head.weight"] = slots["model.embed_tokens.weight"]  # tolerated when equal
  return copies


def _leaves(cfg: ModelConfig, reader: hf_stream.Reader, dtype: np.dtype
            ) -> dict[tuple[str, ...], hf_stream.Leaf]:
  """Every leaf and the tensors it is built from; checks every tensor's shape
  from the file headers before anything is read."""
  slots = slot_table(cfg)
  copies = {n: s for n, s in _load_copies(cfg, slots).items() if n in reader.files}
  for name, slot in {**slots, **copies}.items():
    shape = reader.shape(name)
    if shape == slot.hf_shape():
      continue
    if name in slots:
      raise ValueError(f"tensor {name} has shape {shape}, expected {slot.hf_shape()} "
                       "from config.json")
    warnings.warn(f"{name} differs from the main model's copy; r1jax shares the main "
                  "embedding and output head, so it is ignored")
    del copies[name]
  parts: dict[tuple[str, ...], dict] = {}
  for name, slot in slots.items():
    parts.setdefault(slot.path, {})[slot.index] = (name, slot)
  leaves = {}
  for path, shape in leaf_shapes(slots).items():
    # The router bias stays float32 whatever the weights' dtype (never trained
    # by gradient; the model reads it as float32).
    leaf_dtype = np.dtype(np.float32) if path[-2:] == ("router", "bias") else dtype
    leaf_copies = tuple((n, s) for n, s in copies.items() if s.path == path)
    leaves[path] = hf_stream.Leaf("/".join(path), shape, leaf_dtype, parts[path], leaf_copies)
  return leaves


def load(path: str, *, dtype: str | None = None, mtp: bool = True, mesh: Mesh | None = None,
         stats: dict | None = None, **overrides) -> tuple[ModelConfig, Params]:
  """Reads a Hugging Face DeepSeek-V3, Qwen2 or Llama checkpoint directory.

  Returns (cfg, params): params is the unboxed `Transformer(cfg)` tree in
  `dtype` (when given, cfg.dtype and cfg.param_dtype are set to it unless
  overridden; by default cfg.param_dtype, float32). Without `mesh`, leaves are
  host numpy arrays. With `mesh` (axes r1jax.parallel.mesh.AXES) each leaf is
  a jax.Array sharded by the rule table, and each process reads only the
  slices its devices hold. The MTP layers are loaded when the files hold them
  (cfg.mtp_depth counts those loaded; `mtp=False` skips them). `stats`, a
  dict, receives bytes_read (tensor bytes read from the files) and
  tensors_opened. Raises ValueError naming any tensor that is missing,
  unexpected or of the wrong shape, before reading any.
  """
  cfg, names = _checkpoint(path, dtype, mtp, overrides)
  shardings = None
  if mesh is not None:
    lacking = [a for a in AXES if a not in mesh.axis_names]
    if lacking:
      raise ValueError(f"mesh axes {mesh.axis_names} lack {lacking}: make the mesh with "
                       "r1jax.parallel.mesh.make_mesh")
    shardings = logical_sharding(mesh, logical_axes(cfg))
  params: Params = {}
  with hf_stream.Reader(names) as reader:
    leaves = _leaves(cfg, reader, _np_dtype(dtype or cfg.param_dtype))
    if shardings is not None:
      present = set(_leaf_paths(shardings))
      if present != set(leaves):
        raise ValueError(f"Transformer(cfg) has leaves {sorted(present - set(leaves))} the "
                         f"name table lacks and lacks {sorted(set(leaves) - present)}")
      for leaf_path, leaf in leaves.items():
        hf_stream.check_sharding(leaf, _get(shardings, leaf_path))
    for leaf_path, leaf in leaves.items():
      if shardings is None:
        full = tuple((0, n) for n in leaf.shape)
        _set(params, leaf_path, hf_stream.read_block(reader, leaf, full))
      else:
        _set(params, leaf_path, hf_stream.make_array(reader, leaf, _get(shardings, leaf_path)))
  if stats is not None:
    stats.update(bytes_read=reader.bytes_read, tensors_opened=len(reader.opened))
  return cfg, params


def _np_dtype(dtype: str) -> np.dtype:
  """numpy dtype of a name; "bfloat16" resolves through ml_dtypes."""
  return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


# ----------------------------------------------------------------------------
# Save.


def to_hf_tensors(cfg: ModelConfig, params: Params, *,
                  dtype: str = "bfloat16") -> Iterator[tuple[str, np.ndarray]]:
  """Yields (checkpoint name, array) for every tensor of `params`, MTP copies
  of the embedding/head included; the router bias stays float32.

  Leaves may be numpy or jax arrays sharded over any processes: each tensor is
  fetched alone (a collective for sharded arrays, so every process must
  iterate this in step), never a whole leaf.
  """
  slots = slot_table(cfg)
  shapes = leaf_shapes(slots)
  expected = set(shapes)
  present = set(_leaf_paths(params))
  if expected != present:
    raise ValueError(f"params do not match cfg: missing {sorted(expected - present)}, "
                     f"unexpected {sorted(present - expected)}")
  for leaf_path, shape in shapes.items():
    got = tuple(_get(params, leaf_path).shape)
    if got != shape:
      raise ValueError(f"param {'/'.join(leaf_path)} has shape {got}, expected {shape} from cfg")
  # Copies go out right after their leaf's one tensor, from the same fetch.
  copies: dict[tuple[str, ...], list[tuple[str, Slot]]] = {}
  for k in range(cfg.mtp_depth):
    for name, slot in copy_slots(cfg, slots, k).items():
      copies.setdefault(slot.path, []).append((name, slot))
  out_dtype = _np_dtype(dtype)

  def cast(name: str, x: np.ndarray) -> np.ndarray:
    target = np.dtype(np.float32) if name.endswith(_FLOAT32_SUFFIXES) else out_dtype
    return np.ascontiguousarray(x.astype(target))

  for name, slot in slots.items():
    x = hf_stream.fetch(_get(params, slot.path), slot.index)
    yield name, cast(name, slot.to_hf(x))
    for copy, copy_slot in copies.get(slot.path, []):  # copied leaves are unstacked
      yield copy, cast(copy, copy_slot.to_hf(x))


def save(path: str, cfg: ModelConfig, params: Params, *, dtype: str = "bfloat16",
         max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
  """Writes config.json and the weights in `dtype` (router bias in float32).

  One model.safetensors when everything fits in `max_shard_bytes`, otherwise
  model-0000i-of-0000n.safetensors shards and model.safetensors.index.json.
  Refuses a directory that already holds weights unless `overwrite`, which
  deletes them first (stale shards would otherwise be loaded with the new ones).
  With several processes every one calls this (the tensors are gathered one
  at a time) and process 0 writes; host memory stays near one shard.
  """
  writer = jax.process_index() == 0
  old = []
  if writer:
    os.makedirs(path, exist_ok=True)
    old = [f for f in os.listdir(path) if f.endswith(".safetensors") or f == _INDEX]
  refuse = bool(old) and not overwrite
  if jax.process_count() > 1:  # all raise together, or none waits on the others
    refuse = bool(multihost_utils.broadcast_one_to_all(np.int32(refuse)))
  if refuse:
    raise FileExistsError(f"{path} already holds weights ({', '.join(sorted(old))}); "
                          "pass overwrite=True to replace them")
  for f in old:
    os.remove(os.path.join(path, f))
  # Shards are written as they fill (one shard in memory at a time) under
  # provisional names, renamed once their count is known.
  metadata = {"format": "pt"}  # transformers reads the format from here
  shard: dict[str, np.ndarray] = {}
  files: list[tuple[str, list[str]]] = []
  size = total = 0

  def flush() -> None:
    file = os.path.join(path, f"partial-{len(files):05d}.safetensors")
    save_file(shard, file, metadata=metadata)
    files.append((file, list(shard)))
    shard.clear()

  for name, x in to_hf_tensors(cfg, params, dtype=dtype):
    if not writer:
      continue
    if shard and size + x.nbytes > max_shard_bytes:
      flush()
      size = 0
    shard[name] = x
    size += x.nbytes
    total += x.nbytes
  if writer:
    flush()
    _finish(path, cfg, dtype, files, total)
  if jax.process_count() > 1:  # return once the files are there, on every process
    multihost_utils.sync_global_devices("r1jax.interop.hf.save")


def _finish(path: str, cfg: ModelConfig, dtype: str, files: list[tuple[str, list[str]]],
            total: int) -> None:
  """Final shard names, the shard index when there are several, config.json."""
  if len(files) == 1:
    os.replace(files[0][0], os.path.join(path, "model.safetensors"))
  else:
    weight_map = {}
    for i, (file, names) in enumerate(files, start=1):
      final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
      os.replace(file, os.path.join(path, final))
      weight_map.update({name: final for name in names})
    with open(os.path.join(path, _INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                indent=2, sort_keys=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, torch_dtype=dtype), f, indent=2, sort_keys=True)
    f.write("\n")
