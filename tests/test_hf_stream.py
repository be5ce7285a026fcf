"""Streaming Hugging Face checkpoints onto a mesh, and saving from sharded arrays.

The checkpoints are random tiny models saved here in several shards; the plain
(host numpy) load is the reference. `-s` prints the bytes-read and peak-memory
figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file

from r1jax.interop import hf, hf_names, hf_stream
from r1jax.model import ModelConfig, Transformer, abstract_params, logical_axes
from r1jax.parallel.mesh import logical_sharding, make_mesh
from tests.experiment_loader import ROOT
from tests.hf_stream_worker import TOKENS_BxT

MESHES = [(1, 1, 4, 2), (1, 2, 4, 1), (2, 1, 1, 4), (1, 2, 2, 2)]
SHARD_BYTES = 300_000


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
  """Host float32 params of `cfg`: small kernels, norms near 1, small router biases."""
  rng = np.random.default_rng(seed)

  def init(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return (1 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    std = 0.01 if "bias" in name else 0.05
    return (std * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(init, abstract_params(cfg))


def tensor_bytes(path: str) -> tuple[int, int, int]:
  """(bytes of all tensors, how many, largest) from a checkpoint's headers."""
  sizes = []
  for name, file in hf_stream.tensor_files(path).items():
    with safe_open(file, framework="numpy") as f:
      s = f.get_slice(name)
      sizes.append(int(np.prod(s.get_shape())) * (2 if s.get_dtype() == "BF16" else 4))
  return sum(sizes), len(sizes), max(sizes)


def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view(np.uint8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[str, ModelConfig, dict]:
  """A random ModelConfig.tiny() (MTP included) in >= 3 float32 shards, and its plain load."""
  cfg = ModelConfig.tiny()
  path = str(tmp_path_factory.mktemp("hf_tiny"))
  hf.save(path, cfg, random_params(cfg), dtype="float32", max_shard_bytes=SHARD_BYTES)
  assert sum(f.endswith(".safetensors") for f in os.listdir(path)) >= 3
  cfg, params = hf.load(path)
  return path, cfg, params


# ----------------------------------------------------------------------------
# Streamed load.

@pytest.mark.parametrize("shape", MESHES)
def test_streamed_load_equals_plain_load(ckpt, shape):
  path, cfg, want = ckpt
  mesh = make_mesh(shape)
  stats = {}
  cfg2, got = hf.load(path, mesh=mesh, stats=stats)
  assert cfg2 == cfg
  shardings = logical_sharding(mesh, logical_axes(cfg))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (key, a), b, s in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            jax.tree.leaves(shardings)):
    assert a.sharding == s, jax.tree_util.keystr(key)
    assert a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b)), jax.tree_util.keystr(key)
  # Replicas are read once: every tensor byte exactly once in one process.
  total, count, _ = tensor_bytes(path)
  assert stats == {"bytes_read": total, "tensors_opened": count}


def test_streamed_load_in_bfloat16(ckpt):
  path, _, want = ckpt
  cfg, got = hf.load(path, mesh=make_mesh((1, 1, 4, 2)), dtype="bfloat16")
  assert cfg.param_dtype == cfg.dtype == "bfloat16"
  for (key, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    name = jax.tree_util.keystr(key)
    target = np.float32 if "bias" in name else ml_dtypes.bfloat16
    assert a.dtype == target and np.array_equal(_bits(a), _bits(b.astype(target))), name


def test_a_block_reads_only_its_slices(ckpt):
  path, cfg, want = ckpt
  with hf_stream.Reader(hf_stream.tensor_files(path)) as reader:
    leaves = hf._leaves(cfg, reader, np.dtype(np.float32))
    # One device's block of the stacked experts on (1, 2, 4, 1): experts
    # sharded 4 ways, the embed axis (their input here) 2 ways.
    leaf = leaves[("moe_layers", "moe", "experts", "wi_gate")]
    shardings = logical_sharding(make_mesh((1, 2, 4, 1)), logical_axes(cfg))
    sharding = shardings["moe_layers"]["moe"]["experts"]["wi_gate"]
    index = sharding.devices_indices_map(leaf.shape)[jax.devices()[5]]
    block = hf_stream._block(index, leaf.shape)
    got = hf_stream.read_block(reader, leaf, block)
    np.testing.assert_array_equal(got, want["moe_layers"]["moe"]["experts"]["wi_gate"][index])
    layers, experts = (b - a for a, b in block[:2])
    assert len(reader.opened) == layers * experts
    # The checkpoint is float32 like the block: exactly the block's bytes, 1/8 of the leaf.
    assert reader.bytes_read == got.nbytes == np.prod(leaf.shape) * 4 // 8
    total, _, _ = tensor_bytes(path)
    print(f"\none device's block of {leaf.label} {leaf.shape}: read {reader.bytes_read} of "
          f"{total} bytes, {len(reader.opened)} tensors")


@pytest.mark.parametrize("n_in,shape", [(1, (6, 4, 5)), (2, (4, 3, 6)), (0, (5, 7))])
def test_slot_reads_any_block(n_in, shape):
  # Blocks a mesh never makes (inner axes cut, outer whole) take the gather path.
  slot = hf_names.Slot(("x",), (), shape, n_in)
  w = np.arange(np.prod(shape), dtype=np.float32).reshape(slot.hf_shape())
  full = w.T.reshape(shape) if n_in else w
  rng = np.random.default_rng(0)
  for _ in range(30):
    starts = [int(rng.integers(0, n)) for n in shape]
    block = tuple((a, int(rng.integers(a + 1, n + 1))) for a, n in zip(starts, shape))
    want = full[tuple(slice(a, b) for a, b in block)]
    np.testing.assert_array_equal(slot.read(w, block), want)


def test_wrong_mesh_is_refused(ckpt):
  path, _, _ = ckpt
  with pytest.raises(ValueError, match="cannot be split evenly"):
    hf.load(path, mesh=make_mesh((1, 1, 1, 8)))  # 4 heads over 8 devices
  odd = jax.make_mesh((2, 4), ("data", "model"))
  with pytest.raises(ValueError, match="make_mesh"):
    hf.load(path, mesh=odd)


# ----------------------------------------------------------------------------
# Save from sharded arrays.

@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_fetch_is_exact(dtype):
  # Random bits: NaN payloads and -0.0 must survive the cross-device sum.
  mesh = make_mesh((1, 2, 2, 2))
  bits = np.random.default_rng(0).integers(0, 2**31, (2, 8, 6, 4)).astype(np.uint32)
  x_np = bits.astype(np.uint16 if dtype == ml_dtypes.bfloat16 else np.uint32).view(dtype)
  x_np[0, 3, 0, 0] = -0.0
  sharded = jax.device_put(x_np, NamedSharding(mesh, P(None, ("fsdp", "expert"), None, "tensor")))
  for x in [sharded, jax.device_put(x_np, jax.devices()[3])]:
    for pos in [(0, 0), (0, 3), (1, 5), (1, 7)]:
      got = hf_stream.fetch(x, pos)
      assert got.dtype == x_np.dtype and np.array_equal(_bits(got), _bits(x_np[pos])), pos


# ----------------------------------------------------------------------------
# Host memory.

def test_streamed_load_peak_host_memory(tmp_path, monkeypatch):
  # Many small tensors: 1 MiB at most (embedding, head), ~51 MiB in all.
  cfg = ModelConfig.tiny(vocab_size=1024, d_model=256, n_layers=5, moe_d_ff=128,
                         n_routed_experts=32, mtp_depth=0)
  path = str(tmp_path)
  hf.save(path, cfg, random_params(cfg), dtype="float32", max_shard_bytes=8 * 2**20)
  total, _, largest = tensor_bytes(path)
  assert total >= 20 * largest
  mesh = make_mesh((1, 1, 4, 2))
  shardings = logical_sharding(mesh, logical_axes(cfg))
  shard = max(int(np.prod(s.shard_shape(x.shape))) * 4
              for x, s in zip(jax.tree.leaves(abstract_params(cfg)), jax.tree.leaves(shardings)))
  # Whole leaves on the host would be 16 MiB (the stacked experts): more than the bound.
  bound = 3 * (largest + shard)

  # XLA:CPU's device_put adopts a numpy buffer that happens to be 64-byte
  # aligned as the device buffer, so tracemalloc would count device memory on
  # this backend; a device-side copy keeps what it counts to the host's own.
  put = jax.device_put
  monkeypatch.setattr(jax, "device_put",
                      lambda x, device: put(put(x, device), device, may_alias=False))

  def peak(**kw) -> int:
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
      hf.load(path, **kw)
      return tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()

  streamed, plain = peak(mesh=mesh), peak()
  print(f"\ncheckpoint {total / 2**20:.1f} MiB, largest tensor {largest / 2**20:.2f} MiB, "
        f"largest device shard {shard / 2**20:.2f} MiB; peak host memory: streamed "
        f"{streamed / 2**20:.2f} MiB (bound {bound / 2**20:.1f}), plain {plain / 2**20:.1f} MiB")
  assert streamed < bound
  assert plain > total  # the measurement sees numpy's buffers


# ----------------------------------------------------------------------------
# Two processes.

def _whole_bytes(cfg: ModelConfig, shape: tuple[int, ...], axis: str) -> int:
  """Float32 bytes of the leaves `axis` leaves unsharded on a `shape` mesh
  (every process reads them whole), their MTP copies included."""
  shardings = logical_sharding(make_mesh(shape), logical_axes(cfg))
  whole = 0
  for (key, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params(cfg)),
                         jax.tree.leaves(shardings)):
    axes = {a for e in s.spec if e for a in ((e,) if isinstance(e, str) else e)}
    if axis not in axes:
      copies = cfg.mtp_depth if jax.tree_util.keystr(key) in ("['embed']['embedding']",
                                                               "['lm_head']['kernel']") else 0
      whole += int(np.prod(x.shape)) * 4 * (1 + copies)
  return whole


def _all_tensors(path: str) -> dict[str, np.ndarray]:
  tensors = {}
  for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
    tensors.update(load_file(os.path.join(path, file)))
  return tensors


def test_two_processes_read_their_own_parts(ckpt, tmp_path):
  path, cfg, params = ckpt
  # One compilation cache for both processes and for reruns (tiny programs
  # included): the forward pass and save's gathers are most of the time here.
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "r1jax_jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  run = subprocess.run([sys.executable, "launch/local.py", "--num_processes=2",
                        "--devices_per_process=4", "--", sys.executable,
                        "tests/hf_stream_worker.py", path, str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert run.returncode == 0, run.stdout[-3000:]
  stats = [json.load(open(tmp_path / f"p{i}.json")) for i in range(2)]
  total, count, _ = tensor_bytes(path)
  experts = 3 * cfg.n_routed_experts * (cfg.n_moe_layers + cfg.mtp_depth)
  print()
  for shape, axis in [((1, 2, 2, 2), "fsdp"), ((1, 1, 2, 4), "expert")]:
    got = [s[str(tuple(shape))] for s in stats]
    print(f"mesh {shape}, {axis} across processes: bytes read {[g['bytes_read'] for g in got]} "
          f"of {total}; tensors opened {[g['tensors_opened'] for g in got]} of {count}")
    # What `axis` shards splits in half between the processes; the rest each reads whole.
    assert all(g["bytes_read"] == (total + _whole_bytes(cfg, shape, axis)) // 2 < total
               for g in got)
    opened = count - experts // 2 if axis == "expert" else count
    assert all(g["tensors_opened"] == opened for g in got)

  # Logits on the two-process mesh match the plain single-process load.
  want = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))(params, TOKENS_BxT)
  for i in range(2):
    diff = float(np.max(np.abs(np.load(tmp_path / f"p{i}.npy") - np.asarray(want))))
    print(f"process {i}: max |logits - single-process logits| = {diff:.3g}")
    assert diff <= 1e-5
  # Saved from the sharded params by process 0: the same tensors, bit for bit.
  want_t, got_t = _all_tensors(path), _all_tensors(str(tmp_path / "saved"))
  assert sorted(got_t) == sorted(want_t)
  for name in want_t:
    assert got_t[name].dtype == want_t[name].dtype, name
    assert np.array_equal(_bits(got_t[name]), _bits(want_t[name])), name
  with open(os.path.join(path, "config.json")) as a, open(tmp_path / "saved" / "config.json") as b:
    assert json.load(a) == json.load(b)


def test_a_stage_init_from_hf_streams_onto_the_stage_mesh(ckpt):
  """`init="hf:<dir>"` in an experiment goes through the streamed load, in the run's dtypes."""
  import types

  from r1jax.pipeline import stages
  path, cfg, want = ckpt
  mesh = make_mesh((1, 2, 2, 2))
  run_cfg = ModelConfig.tiny().replace(dtype="bfloat16", param_dtype="bfloat16")
  ctx = types.SimpleNamespace(mesh=mesh, model_cfg=run_cfg)
  got_cfg, got = stages._init(ctx, {"init": f"hf:{path}"}, {})
  assert got_cfg.param_dtype == got_cfg.dtype == "bfloat16"
  # Leaves come in the dtypes the run's model declares (router biases stay float32).
  for a, b, s, like in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                           jax.tree.leaves(logical_sharding(mesh, logical_axes(cfg))),
                           jax.tree.leaves(abstract_params(got_cfg))):
    assert a.sharding == s and a.dtype == like.dtype
    assert np.array_equal(_bits(a), _bits(np.asarray(b).astype(like.dtype)))
  assert {a.dtype for a in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16), jnp.dtype("float32")}
