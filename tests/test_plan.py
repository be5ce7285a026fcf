"""The plan tool: sharded sizes agree with a real sharded init; the 671B plan fits 80 GB."""

import contextlib
import io
import json
import math

import jax
import pytest

from r1jax.model import ModelConfig, abstract_params, init_params, logical_axes
from r1jax.parallel import mesh as mesh_lib
from r1jax.tools import compile_plan, memory, plan
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
    actual = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
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


# ----------------------------------------------------------------------------
# --compile: the experiment's real programs, through the same path as the 671B plan.

EXPERIMENT = """
from r1jax import configs

def get_config(arg=None):
  c = configs.base()
  configs.with_model_preset(c, "tiny", n_layers=2, mtp_depth=0, vocab_size=256, max_seq_len=128,
                            remat=True, dtype="bfloat16", param_dtype="bfloat16")
  c.mesh = (1, 4, 2, 1)
  c.pipeline = ("pretrain", "grpo")
  c.stages.pretrain = configs.pretrain_stage(steps=1, batch_size=8, seq_len=64)
  c.stages.grpo = configs.grpo_stage(grpo=dict(group_size=2, prompts_per_step=8,
      max_prompt_len=32, max_new_tokens=32, n_minibatches=2, beta=0.001))
  c.lock()
  return c
"""
XLA_KEYS = ("argument", "output", "temp", "alias", "peak")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
  """The --compile report of a 2-layer tiny experiment on 8 devices (in this process,
  which has exactly the mesh's CPU devices; a pod plan runs the same code in a child)."""
  path = tmp_path_factory.mktemp("exp") / "tiny_plan.py"
  path.write_text(EXPERIMENT)
  args = [f"--config={path}", "--devices=8", "--compile", "--json",
          "--programs=grpo_update,logprob,decode,sft"]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert plan.main(args) == 0
  return str(path), args, json.loads(out.getvalue())


def _report(capsys, args):
  rc, out, err = _run(capsys, *args)
  assert rc == 0, err
  return json.loads(out)


def test_compile_reports_every_program_with_xla_numbers(capsys, compiled):
  path, _, report = compiled
  progs = report["programs"]
  assert set(progs) == {"grpo_update", "logprob", "decode", "sft"}
  for name, p in progs.items():
    x = p["xla"]
    assert x["peak"] == x["argument"] + x["output"] + x["temp"] - x["alias"] > 0, name
    assert p["peak_gb_per_device"] == pytest.approx((x["peak"] + p["resident"]) / 1e9)
    assert p["fits"] and isinstance(p["estimate_gb_per_device"], float)
  assert progs["grpo_update"]["xla"]["alias"] > 0  # the state is donated
  assert progs["decode"]["xla"]["alias"] > 0  # the cache is donated
  assert progs["logprob"]["resident"] > 0  # the optimizer state waits on the device
  assert progs["decode"]["rows"] == 16 and progs["decode"]["slots"] == 64
  assert report["fits"] is True
  # The decode step, built here by hand: XLA's numbers are the report's.
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415
  from r1jax import configs  # noqa: PLC0415
  from r1jax.model import Transformer  # noqa: PLC0415
  from r1jax.model.kv_cache import LatentCache  # noqa: PLC0415
  # As the plan compiles it: grouped_matmul "auto" as "sorted", XLA:CPU's LICM off.
  cfg = configs.model_config(configs.experiment(path).get_config()).replace(grouped_matmul="sorted")
  mesh = mesh_lib.make_mesh((1, 4, 2, 1))
  sds = lambda s, dt, sh: jax.ShapeDtypeStruct(s, dt, sharding=sh)
  params = jax.tree.map(lambda s, sh: sds(s.shape, s.dtype, sh), abstract_params(cfg),
                        mesh_lib.logical_sharding(mesh, logical_axes(cfg)))
  c_sh = NamedSharding(mesh, P(None, mesh_lib.BATCH, None, None))
  cache = jax.tree.map(lambda a: sds(a.shape, a.dtype, c_sh),
                       jax.eval_shape(lambda: LatentCache.zeros(cfg, 16, 64)))
  rows = lambda *s, dt=jax.numpy.int32: sds((16, *s), dt, mesh_lib.batch_sharding(mesh, 1 + len(s)))
  fn = jax.jit(lambda p, c, t, q, s, v: Transformer(cfg).apply(
      {"params": p}, t, q, c, s, v, method="decode"), donate_argnums=1,
      out_shardings=(None, jax.tree.map(lambda _: c_sh, cache)))
  with jax.set_mesh(mesh):
    m = fn.lower(params, cache, rows(1), rows(1), sds((), jax.numpy.int32, mesh_lib.replicated(mesh)),
                 rows(64, dt=bool)).compile(dict(compile_plan.NO_CPU_LICM)).memory_analysis()
  direct = (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
            m.alias_size_in_bytes)
  assert direct == tuple(progs["decode"]["xla"][k] for k in XLA_KEYS[:4])


def test_fits_flips_with_hbm_gb(capsys, compiled):
  _, args, _ = compiled
  small = [a if not a.startswith("--programs") else "--programs=decode" for a in args]
  report = _report(capsys, small + ["--hbm_gb=1e-6"])
  assert report["fits"] is False and report["programs"]["decode"]["fits"] is False
  assert report["formula_fits"] is False


def test_formula_within_30_percent_of_xla_for_the_train_steps(compiled):
  """The cut model (2 layers, remat, bf16 with an f32 master): memory.program_bytes
  against XLA's peak. Measured -24.7% (GRPO update) and -25.2% (SFT) here, while the
  full 671B programs agree within 10% (README); 30% is what is held for megabyte-sized
  cuts. The forward-only programs (log-probs, decode) are reported
  (`estimate_error`) only."""
  progs = compiled[2]["programs"]
  errors = {k: round(progs[k]["estimate_error"], 3) for k in ("grpo_update", "sft")}
  assert all(abs(e) <= 0.30 for e in errors.values()), errors
  assert all(-1 < p["estimate_error"] < 1 for p in progs.values())


def test_a_bad_micro_batch_is_a_clear_error(capsys, compiled):
  _, args, _ = compiled
  rc, _, err = _run(capsys, *args, "--micro_batches=3")
  assert rc == 2 and "micro_batches=3 must divide the minibatch of 8" in err
