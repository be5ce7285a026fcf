"""The plan tool: sharded sizes agree with a real sharded init; the 671B plan fits 80 GB."""

import json
import math

import jax
import pytest

from r1jax.model import ModelConfig, abstract_params, init_params, logical_axes
from r1jax.parallel import mesh as mesh_lib
from r1jax.tools import memory, plan
from r1jax.train import optim

REQUIRED = ("params", "optimizer", "gradients", "activations", "total")


def _sizes(shape) -> dict:
  return dict(zip(mesh_lib.AXES, shape))


@pytest.mark.parametrize("shape", [(1, 2, 2, 2)])
def test_param_bytes_equal_a_sharded_init(tiny_cfg, shape):
  mesh = mesh_lib.make_mesh(shape)
  sharding = mesh_lib.logical_sharding(mesh, logical_axes(tiny_cfg))
  params = jax.jit(init_params, static_argnums=0, out_shardings=sharding)(
      tiny_cfg, jax.random.key(0))
  per_device = {d: 0 for d in mesh.devices.flat}
  for leaf in jax.tree.leaves(params):
    for shard in leaf.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  estimate = memory.state_bytes(tiny_cfg, _sizes(shape))["params"]
  assert set(per_device.values()) == {estimate}


def test_shard_shape_rounds_up():
  spec = jax.sharding.PartitionSpec(None, ("fsdp", "expert"), "tensor")
  sizes = _sizes((1, 2, 2, 3))
  assert memory.shard_shape((5, 10, 7), spec, sizes) == (5, 3, 3)
  assert memory.shard_shape((5, 10, 7), spec, sizes, skip=("fsdp",)) == (5, 5, 3)


def test_as_built_optimizer_bytes_equal_optax_state(tiny_cfg):
  bf16 = tiny_cfg.replace(param_dtype="bfloat16")
  for cfg in (tiny_cfg, bf16):
    state = jax.eval_shape(optim.make_optimizer(optim.OptimConfig()).init, abstract_params(cfg))
    arrays = [x for x in jax.tree.leaves(state) if x.ndim]  # scalars: step counts
    actual = sum(math.prod(x.shape) * x.dtype.itemsize for x in arrays)
    estimate = memory.state_bytes(cfg, _sizes((1, 1, 1, 1)), "adamw_as_built")["optimizer"]
    assert estimate == actual


def test_mixed_precision_adamw_is_12_bytes_per_bf16_param():
  cfg = ModelConfig.tiny(param_dtype="bfloat16", n_routed_experts=0, n_layers=1,
                         n_dense_layers=1, n_expert_groups=1, n_limited_groups=1, mtp_depth=0)
  s = memory.state_bytes(cfg, _sizes((1, 1, 1, 1)), "adamw")
  assert s["optimizer"] == 6 * s["params"] and s["gradients"] == s["params"]


def _run(capsys, *argv):
  rc = plan.main(list(argv))
  out = capsys.readouterr()
  return rc, out.out, out.err


def test_671b_on_256_devices_fits_80gb(capsys):
  rc, out, _ = _run(capsys, "--model=deepseek_v3_671b", "--devices=256", "--no-compile",
                    "--json")
  assert rc == 0
  report = json.loads(out)
  b = report["bytes_per_device"]
  assert set(REQUIRED) <= set(b)
  assert b["total"] == sum(b[k] for k in REQUIRED[:-1]) <= 80e9
  assert report["fits"] and report["mesh_reason"]
  assert math.prod(report["mesh"].values()) == 256
  assert set(report["mesh"]) == set(mesh_lib.AXES)
  assert report["params_total"] == 671_026_404_352
  assert 37e9 < report["params_activated"] < 38e9


def test_table_and_json_for_a_given_mesh(capsys):
  args = ("--model=tiny", "--devices=8", "--mesh=1,-1,2,2", "--batch=8", "--seq_len=32",
          "--no-compile")
  rc, out, _ = _run(capsys, *args, "--json")
  report = json.loads(out)
  assert rc == 0 and report["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
  assert report["mesh_reason"] == "given"
  assert {"params_total", "params_activated", "mesh", "bytes_per_device"} <= set(report)
  rc, out, _ = _run(capsys, *args)
  assert rc == 0 and "optimizer state" in out and "activations" in out


@pytest.mark.parametrize("devices, mesh, message", [
    (16, "3,1,1,1", "uses 3 devices"),
    (16, "1,1,-1,1", "expert=16 must divide n_routed_experts=8"),
    (16, "2,1,1,8", "tensor=8 must divide n_heads=4"),
    (128, "1,-1,1,1", "(64 is not a multiple of 128)"),  # d_model over fsdp
    (16, "1,2,x,1", "give 4 integers"),
])
def test_a_bad_mesh_is_a_clear_error(capsys, devices, mesh, message):
  rc, _, err = _run(capsys, "--model=tiny", f"--devices={devices}", f"--mesh={mesh}",
                    "--no-compile")
  assert rc == 2 and message in err


def test_xla_arguments_match_the_estimated_state(tiny_cfg):
  """The AOT path: per-device arguments = sharded params + as-built optimizer + batch."""
  cfg = plan.cut_model(tiny_cfg).replace(mtp_depth=0)
  sizes = _sizes((2, 2, 1, 2))
  mem = plan.compile_memory(cfg, sizes, batch=4, seq_len=16)
  state = memory.state_bytes(cfg, sizes, "adamw_as_built")
  batch = 3 * (4 // 4) * 16 * 4  # three int32 [B/4, T] arrays per device
  scalars = 64  # step and optimizer counts
  assert 0 <= mem["argument"] - state["params"] - state["optimizer"] - batch <= scalars
  assert mem["temp"] > 0 and mem["alias"] > 0  # the state is donated
