"""gs:// run I/O on a local GCS emulator: etils.epath, tensorstore, orbax, and subprocesses."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


@pytest.fixture
def root(gcs_bucket, request) -> epath.Path:
  """A prefix of its own for each test in the session's shared bucket."""
  return epath.Path(gcs_bucket) / request.node.name


def test_epath_reads_back_what_it_writes(root):
  d = root / "x"
  d.mkdir(parents=True, exist_ok=True)  # no directories on GCS; must still not fail
  (d / "y.json").write_text(json.dumps({"step": 3}))
  (d / "z.bin").write_bytes(bytes(range(256)))
  assert json.loads((d / "y.json").read_text()) == {"step": 3}
  assert (d / "z.bin").read_bytes() == bytes(range(256))
  assert (d / "y.json").exists() and d.exists() and d.is_dir()
  assert not (d / "missing.json").exists()
  assert sorted(p.name for p in d.iterdir()) == ["y.json", "z.bin"]
  assert [p.name for p in d.glob("*.json")] == ["y.json"]
  assert str(next(d.glob("*.bin"))) == f"{root}/x/z.bin"


def test_epath_write_then_rename_replaces_the_target(root):
  target = root / "metrics.json"
  target.write_text("old")
  tmp = root / ".metrics.json.tmp"
  tmp.write_text("new")
  tmp.replace(target)
  assert target.read_text() == "new" and not tmp.exists()
  target.rename(root / "moved.json")
  assert not target.exists() and (root / "moved.json").read_text() == "new"


def test_epath_unlink_and_rmtree(root):
  for name in ("a/1.txt", "a/b/2.txt", "c.txt"):
    (root / name).write_text(name)
  (root / "c.txt").unlink()
  assert not (root / "c.txt").exists()
  with pytest.raises(FileNotFoundError):
    (root / "c.txt").unlink()
  (root / "a").rmtree()
  assert not (root / "a").exists() and not (root / "a/b/2.txt").exists()


def test_tensorstore_zarr3_round_trip(root):
  spec = {"driver": "zarr3", "kvstore": f"{root}/arr/"}
  x_8x6 = np.arange(48, dtype=np.float32).reshape(8, 6)
  arr = ts.open(spec, create=True, dtype=ts.float32, shape=x_8x6.shape,
                chunk_layout=ts.ChunkLayout(chunk_shape=[4, 3])).result()
  arr.write(x_8x6).result()
  arr[2:4, 1].write([-1, -2]).result()  # a partial chunk: read, modify, write
  x_8x6[2:4, 1] = [-1, -2]
  np.testing.assert_array_equal(ts.open(spec).result().read().result(), x_8x6)
  assert (root / "arr" / "zarr.json").exists()  # the same object, seen through gcsfs


def test_tensorstore_conditional_writes_follow_generations(root):
  # OCDBT (orbax's default format) commits its manifest only if its generation is
  # unchanged; that needs the generation back from a read, as GCS sends it.
  kv = ts.KvStore.open(f"{root}/kv/").result()
  g1 = kv.write("k", b"1").result().generation
  assert kv.read("k").result().stamp.generation == g1
  g2 = kv.write("k", b"2", if_equal=g1).result().generation
  assert g2 not in (b"", g1)
  assert kv.write("k", b"3", if_equal=g1).result().generation == b""  # stale: not written
  assert kv.read("k").result().value == b"2"


@pytest.fixture(scope="module")
def sharded_tree():
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  return {"w": put(jnp.arange(64, dtype=jnp.float32).reshape(8, 8), P("data", "model")),
          "b": put(jnp.ones(8, jnp.bfloat16), P("model")),
          "step": put(jnp.asarray(7, jnp.int32), P())}


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_same_placed(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.sharding == w.sharding
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_orbax_standard_checkpointer_round_trip(root, sharded_tree):
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(f"{root}/ckpt", sharded_tree)
  ckpt.wait_until_finished()
  assert_same_placed(ckpt.restore(f"{root}/ckpt", abstract(sharded_tree)), sharded_tree)
  ckpt.close()


def test_orbax_checkpoint_manager_resumes_from_latest_step(root, sharded_tree):
  # The pattern of r1jax/train/checkpoint.py: train state and data-iterator state in one step.
  def manager():
    return ocp.CheckpointManager(f"{root}/mgr", options=ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True))  # 1, so that saving step 2 deletes step 1 on GCS

  mngr = manager()
  for step in (1, 2):
    state = jax.tree.map(lambda x: x + step, sharded_tree)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave({"next_index": 10 * step})))
  mngr.wait_until_finished()
  mngr.close()
  mngr = manager()  # as a restarted job would
  assert mngr.latest_step() == 2 and mngr.all_steps() == [2]
  assert [p.name for p in (root / "mgr").iterdir()] == ["2"]
  out = mngr.restore(2, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract(sharded_tree)), data=ocp.args.JsonRestore()))
  mngr.close()
  assert out.data == {"next_index": 20}
  assert_same_placed(out.state, jax.tree.map(lambda x: x + 2, sharded_tree))


def test_subprocess_shares_the_bucket(root):
  (root / "from_parent.txt").write_text("hello")
  assert [p.name for p in root.iterdir()] == ["from_parent.txt"]
  child = textwrap.dedent(f"""
      import tensorstore as ts
      from etils import epath
      root = epath.Path({str(root)!r})
      (root / "from_child.txt").write_text((root / "from_parent.txt").read_text() + " back")
      ts.KvStore.open(str(root) + "/").result().write("from_child.bin", b"ts").result()
  """)
  subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
  # Listed a moment ago; the listing is not served stale from a cache.
  assert sorted(p.name for p in root.iterdir()) == ["from_child.bin", "from_child.txt",
                                                    "from_parent.txt"]
  assert (root / "from_child.txt").read_text() == "hello back"
  assert (root / "from_child.bin").read_bytes() == b"ts"


def test_copy_tree_into_and_out_of_a_bucket(root, tmp_path):
  """What a sweep's --reuse_from does with a stage folder whose workdir is a bucket."""
  from r1jax import storage
  (tmp_path / "src" / "checkpoints" / "10").mkdir(parents=True)
  (tmp_path / "src" / "checkpoints" / "10" / "a.bin").write_bytes(b"\x00\x01")
  (tmp_path / "src" / "outputs.json").write_text("{}")
  storage.copy_tree(tmp_path / "src", root / "stage")
  assert (root / "stage" / "checkpoints" / "10" / "a.bin").read_bytes() == b"\x00\x01"
  storage.copy_tree(root / "stage", tmp_path / "back")
  assert sorted(p.relative_to(tmp_path / "back").as_posix()
                for p in (tmp_path / "back").rglob("*") if p.is_file()) == [
                    "checkpoints/10/a.bin", "outputs.json"]
