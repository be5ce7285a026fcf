"""One of two processes streaming a checkpoint onto a mesh that spans both
(tests/test_hf_stream.py starts it through launch/local.py).

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      python tests/hf_stream_worker.py CHECKPOINT OUT

Loads CHECKPOINT onto (1, 2, 2, 2), whose fsdp axis splits the processes, and
onto (1, 1, 2, 4), whose expert axis does; computes the logits of a fixed
batch; saves the first load to OUT/saved (float32). Writes OUT/p{i}.json (bytes
read per load) and OUT/p{i}.npy (logits).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax.interop import hf
from r1jax.model import Transformer
from r1jax.parallel.distributed import maybe_initialize
from r1jax.parallel.mesh import make_mesh

TOKENS_BxT = np.arange(2 * 8, dtype=np.int32).reshape(2, 8) * 37 % 500


def main(ckpt: str, out: str) -> None:
  maybe_initialize()
  me = jax.process_index()
  assert jax.process_count() == 2 and jax.local_device_count() == 4
  stats = {}
  for shape, axis in [((1, 2, 2, 2), 1), ((1, 1, 2, 4), 2)]:
    mesh = make_mesh(shape)
    # The split axis is the one along which the processes differ.
    mine = np.vectorize(lambda d: d.process_index == me)(mesh.devices)
    assert mine.take(me, axis=axis).all() and not mine.take(1 - me, axis=axis).any()
    stats[str(shape)] = {}
    cfg, params = hf.load(ckpt, mesh=mesh, stats=stats[str(shape)])
    if shape == (1, 2, 2, 2):
      saved_cfg, saved_params, saved_mesh = cfg, params, mesh
  replicated = NamedSharding(saved_mesh, P())
  tokens = jax.make_array_from_callback(TOKENS_BxT.shape, replicated, lambda i: TOKENS_BxT[i])
  forward = jax.jit(lambda p, x: Transformer(saved_cfg).apply({"params": p}, x),
                    out_shardings=replicated)
  logits_BxTxV = np.asarray(forward(saved_params, tokens).addressable_data(0))
  hf.save(os.path.join(out, "saved"), saved_cfg, saved_params, dtype="float32",
          max_shard_bytes=300_000)
  np.save(os.path.join(out, f"p{me}.npy"), logits_BxTxV)
  with open(os.path.join(out, f"p{me}.json"), "w") as f:
    json.dump(stats, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
