"""Memory plan for training a model on a mesh, per device, without allocating it.

  python -m r1jax.tools.plan --model=deepseek_v3_671b --devices=256
  python -m r1jax.tools.plan --model=deepseek_v3_671b --devices=256 --mesh=1,8,4,8 --json
  python -m r1jax.tools.plan --config=experiments/r1_zero/tiny.py --devices=8 --compile

Parameters, optimizer state, gradients and activations are sized by
r1jax/tools/memory.py (abstract shapes through the rule table, and formulas);
meshes that split a dim unevenly are rejected, as jax rejects them. Without --mesh, candidate meshes are searched and the
reason for the choice is printed. With --compile, a train step
(`sft.make_train_step` + `optim.make_optimizer`) of the model cut to 1 dense +
1 MoE layer is compiled ahead of time for the mesh on forced CPU devices (in a
child process that sets XLA_FLAGS before importing jax), and XLA's memory
analysis is reported beside the estimate for the same cut model.

Sizes are in bytes; the table prints GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from r1jax import configs
from r1jax.model import ModelConfig, abstract_params, logical_axes, param_counts
from r1jax.parallel import mesh as mesh_lib
from r1jax.tools import memory
from r1jax.train import optim

GB = 1e9
DEFAULT_SEQ_LEN = 4096  # DeepSeek-V3's pre-training length (V3 report §4.2)
MAX_TENSOR = 8  # tensor parallelism beyond one 8-accelerator node is not worth its traffic


# ----------------------------------------------------------------------------
# Plans and the mesh search.

@dataclasses.dataclass
class Plan:
  sizes: dict[str, int]
  batch: int
  seq_len: int
  state: dict
  activations: dict

  @property
  def total(self) -> int:
    return sum(self.state.values()) + self.activations["total"]

  def bytes_per_device(self) -> dict:
    return {**self.state, "activations": self.activations["total"], "total": self.total}


def check_mesh(cfg: ModelConfig, sizes: dict[str, int], batch: int | None) -> None:
  """Raises ValueError if the model or batch cannot run on this mesh."""
  problems = []
  if cfg.n_routed_experts % sizes["expert"]:
    problems.append(f"expert={sizes['expert']} must divide n_routed_experts={cfg.n_routed_experts}")
  if cfg.n_heads % sizes["tensor"]:
    problems.append(f"tensor={sizes['tensor']} must divide n_heads={cfg.n_heads}")
  if sizes["expert"] > 1 and cfg.moe_d_ff % sizes["tensor"]:
    problems.append(f"tensor={sizes['tensor']} must divide moe_d_ff={cfg.moe_d_ff} "
                    "under expert parallelism")
  if not problems:  # jax refuses uneven splits of a jitted output: every dim must divide
    for path, s, spec in memory.param_leaves(cfg):
      split = tuple(math.prod(sizes[a] for a in memory.mesh_axes(e)) for e in spec)
      bad = [(d, k) for d, k in zip(s.shape, split) if d % k]
      if bad:
        problems.append(f"parameter {path} of shape {s.shape} does not split over mesh axes "
                        f"{tuple(spec)} ({bad[0][0]} is not a multiple of {bad[0][1]})")
        break
  n_batch = math.prod(sizes[a] for a in mesh_lib.BATCH)
  if batch is not None and batch % n_batch:
    problems.append(f"batch={batch} must be a multiple of data·fsdp·expert={n_batch}")
  if problems:
    raise ValueError(f"mesh {sizes} does not fit the model: " + "; ".join(problems)
                     + ". Pick another --mesh (or leave it out to search).")


def plan_for(cfg: ModelConfig, sizes: dict[str, int], *, batch: int | None = None,
             seq_len: int = DEFAULT_SEQ_LEN, optimizer: str = "adamw",
             backend: str = "accelerator") -> Plan:
  """The estimate for one mesh; batch None = one sequence per data-parallel shard."""
  check_mesh(cfg, sizes, batch)
  if batch is None:
    batch = math.prod(sizes[a] for a in mesh_lib.BATCH)
  return Plan(sizes, batch, seq_len, memory.state_bytes(cfg, sizes, optimizer),
              memory.activation_bytes(cfg, sizes, batch, seq_len, backend))


def parse_mesh(text: str, n_devices: int) -> dict[str, int]:
  """"data,fsdp,expert,tensor" (one entry may be -1) -> {axis: size}."""
  try:
    shape = [int(s) for s in text.split(",")]
  except ValueError:
    raise ValueError(f"--mesh={text!r}: give {len(mesh_lib.AXES)} integers "
                     f"for {','.join(mesh_lib.AXES)}, e.g. 1,-1,8,8") from None
  if any(s < 1 and s != -1 for s in shape):
    raise ValueError(f"--mesh={text!r}: sizes must be positive (or -1 for the rest)")
  return dict(zip(mesh_lib.AXES, mesh_lib.mesh_shape(shape, n_devices)))


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(cfg: ModelConfig, n_devices: int, batch: int | None) -> list[dict[str, int]]:
  out = []
  for tensor, expert, fsdp in itertools.product(_divisors(n_devices), repeat=3):
    if tensor > MAX_TENSOR or n_devices % (tensor * expert * fsdp):
      continue
    sizes = dict(data=n_devices // (tensor * expert * fsdp), fsdp=fsdp, expert=expert,
                 tensor=tensor)
    try:
      check_mesh(cfg, sizes, batch)
    except ValueError:
      continue
    out.append(sizes)
  return out


def search(cfg: ModelConfig, n_devices: int, capacity: float, **kw) -> tuple[Plan, str]:
  """The fitting mesh with the lowest per-device total; among those within 2% of it,
  the one with the most data·fsdp (gradient traffic only, no activation exchange)."""
  plans = [plan_for(cfg, s, **kw) for s in candidate_meshes(cfg, n_devices, kw.get("batch"))]
  if not plans:
    raise ValueError(f"no mesh of {n_devices} devices fits the model's divisibility rules "
                     f"(expert | {cfg.n_routed_experts}, tensor | {cfg.n_heads}, tensor ≤ "
                     f"{MAX_TENSOR}); try another --devices or --batch")
  fit = [p for p in plans if p.total <= capacity]
  pool = fit or plans
  best = min(p.total for p in pool)
  near = [p for p in pool if p.total <= 1.02 * best]
  dp = lambda p: (p.sizes["data"] * p.sizes["fsdp"], p.sizes["data"], -p.total)
  chosen = max(near, key=dp)
  if fit:
    why = (f"searched {len(plans)} meshes (expert | {cfg.n_routed_experts} experts, tensor | "
           f"{cfg.n_heads} heads, tensor ≤ {MAX_TENSOR}); {len(fit)} fit {capacity / GB:.0f} GB; "
           f"lowest total {best / GB:.1f} GB; of the {len(near)} within 2% of it, this one has "
           f"the most data·fsdp ({dp(chosen)[0]})")
  else:
    why = (f"searched {len(plans)} meshes; none fits {capacity / GB:.0f} GB per device; "
           f"this one needs the least ({chosen.total / GB:.1f} GB)")
  return chosen, why


# ----------------------------------------------------------------------------
# Ahead-of-time compile of a cut model, for XLA's own memory analysis.

def cut_model(cfg: ModelConfig, n_dense: int = 1, n_moe: int = 1) -> ModelConfig:
  """The same widths with fewer layers (compiling 61 layers of 671B is not needed to see one)."""
  n_dense = min(n_dense, cfg.n_dense_layers)
  n_moe = min(n_moe, cfg.n_moe_layers)
  return cfg.replace(n_layers=n_dense + n_moe, n_dense_layers=n_dense)


def like_params(opt_state, params, param_sharding, other):
  """Shardings for an optimizer state: a leaf mirroring a parameter (a moment: its path
  ends with the parameter's path, same shape) is sharded like it; the rest get `other`.

  Left to propagation (`out_shardings=None`), XLA replicates the moments, since
  `zeros_like` has no sharded operand to follow.
  """
  by_path = {jax.tree_util.keystr(p): (x.shape, sh) for (p, x), sh in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_sharding))}

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    for p, (shape, sh) in by_path.items():
      if key.endswith(p) and leaf.shape == shape:
        return sh
    return other

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def compile_memory(cfg: ModelConfig, sizes: dict[str, int], batch: int, seq_len: int,
                   ocfg: optim.OptimConfig | None = None) -> dict:
  """XLA's memory analysis (bytes per device) of a jitted, donated train step on this
  process's devices, lowered from ShapeDtypeStructs: nothing is allocated."""
  from r1jax.train import sft  # noqa: PLC0415 (only this path needs the loss)
  mesh = mesh_lib.make_mesh(tuple(sizes[a] for a in mesh_lib.AXES))
  optimizer = optim.make_optimizer(ocfg or optim.OptimConfig())
  param_sharding = mesh_lib.logical_sharding(mesh, logical_axes(cfg))
  params = abstract_params(cfg)
  state = jax.eval_shape(lambda p: sft.init_state(p, optimizer), params)
  state_sharding = sft.TrainState(
      step=mesh_lib.replicated(mesh), params=param_sharding,
      opt_state=like_params(state.opt_state, params, param_sharding, mesh_lib.replicated(mesh)))
  data = mesh_lib.batch_sharding(mesh)
  batch_abs = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=data)
               for k in ("tokens", "loss_mask", "valid")}
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       state, state_sharding)
  step = jax.jit(sft.make_train_step(cfg, optimizer), out_shardings=(state_sharding, None),
                 donate_argnums=0)
  t0 = time.time()
  with jax.set_mesh(mesh):  # the MoE layer reads the ambient mesh for expert parallelism
    compiled = step.lower(state, batch_abs).compile()
  m = compiled.memory_analysis()
  return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
          "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
          "total": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes, "compile_s": round(time.time() - t0, 1)}


def _compile_in_child(args: argparse.Namespace, sizes: dict[str, int], batch: int) -> dict:
  """Runs compile_memory in a fresh interpreter with N forced CPU devices, time-limited."""
  n = math.prod(sizes.values())
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  # The last two flags halve XLA:CPU compile time (LLVM codegen effort only; buffer
  # assignment, hence the memory analysis, is unchanged).
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}",
                                       "--xla_backend_optimization_level=0",
                                       "--xla_llvm_disable_expensive_passes=true"])
  source = (["--config", args.config] + (["--stage", args.stage] if args.stage else [])
            if args.config else ["--model", args.model])
  cmd = [sys.executable, "-m", "r1jax.tools.plan", *source, "--_compile_child",
         f"--mesh={','.join(str(sizes[a]) for a in mesh_lib.AXES)}", f"--devices={n}",
         f"--batch={batch}", f"--seq_len={args.seq_len}"]
  try:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         timeout=args.compile_timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"compile did not finish in {args.compile_timeout} s (--compile_timeout)"}
  lines = out.stdout.strip().splitlines()
  if out.returncode or not lines:
    return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
  return json.loads(lines[-1])


# ----------------------------------------------------------------------------
# Command line.

def _load_experiment(spec: str):
  path, _, arg = spec.partition(":")
  module = configs.experiment(path)
  return module.get_config(arg) if arg else module.get_config()


def _experiment_step(c, stage: str | None):
  """(stage, model, batch, seq_len, OptimConfig) of the stage whose train step is planned:
  --stage, else the first in the pipeline that trains (a GRPO stage plans its update
  minibatch of prompt + completion sequences; distillation plans its student)."""
  names = [stage] if stage else list(c.pipeline)
  for name in names:
    if name not in c.stages:
      raise ValueError(f"--stage={name!r}: the experiment's stages are {sorted(c.stages)}")
    sc = c.stages[name]
    cfg = ModelConfig(**sc.student.to_dict()) if "student" in sc else configs.model_config(c)
    if "batch_size" in sc and "seq_len" in sc:
      return name, cfg, sc.batch_size, sc.seq_len, configs.optim_config(sc)
    if sc.kind == "grpo":
      from r1jax.rl.step import GRPOConfig  # noqa: PLC0415 (RL only for RL stages)
      g = GRPOConfig(**sc.grpo.to_dict())
      return (name, cfg, g.minibatch_size, g.max_prompt_len + g.max_new_tokens,
              configs.optim_config(sc))
  raise ValueError(f"no training stage among {names}; give --stage or use --model")


def _inputs(args: argparse.Namespace):
  """(description, model config, optimizer config, mesh text or None, batch or None, seq_len)."""
  if bool(args.model) == bool(args.config):
    raise ValueError("give exactly one of --model=<preset> or --config=<experiment file>")
  if args.model:
    if args.model not in configs.MODEL_PRESETS:
      raise ValueError(f"--model={args.model!r}; presets: {sorted(configs.MODEL_PRESETS)}")
    cfg = configs.MODEL_PRESETS[args.model]()
    return (args.model, cfg, optim.OptimConfig(), args.mesh, args.batch,
            args.seq_len or min(DEFAULT_SEQ_LEN, cfg.max_seq_len))
  c = _load_experiment(args.config)
  stage, cfg, batch, seq_len, ocfg = _experiment_step(c, args.stage)
  mesh = args.mesh or ",".join(str(s) for s in c.mesh)
  return (f"{args.config} (stage {stage})", cfg, ocfg, mesh, args.batch or batch,
          args.seq_len or seq_len)


def _unit(total: int) -> tuple[str, float]:
  """One unit for a whole table, so its rows line up and compare at a glance."""
  for name, size in (("GB", GB), ("MB", 1e6), ("KB", 1e3)):
    if total >= size:
      return name, size
  return "B", 1.0


def render(report: dict) -> str:
  b = report["bytes_per_device"]
  a = report["activations_detail"]
  unit, size = _unit(b["total"])

  def _row(name: str, value: int, note: str = "") -> str:
    return f"  {name:<24}{value / size:>10.2f} {unit}  {note}".rstrip()

  lines = [
      f"model      {report['model']}: {report['params_total'] / 1e9:.2f}B parameters, "
      f"{report['params_activated'] / 1e9:.2f}B activated per token",
      f"mesh       {report['mesh']}  ({report['mesh_reason']})",
      f"step       batch {report['batch']} × {report['seq_len']} tokens "
      f"({a['sequences_per_device']} sequence(s), {a['tokens_per_device']} tokens per device)",
      "per device:",
      _row("parameters", b["params"], report["dtypes"]),
      _row("optimizer state", b["optimizer"], report["optimizer_assumption"]),
      _row("gradients", b["gradients"], "parameter dtype, sharded like the parameters"),
      _row("activations", b["activations"], "estimate, see below"),
      _row("total", b["total"], f"{'fits' if report['fits'] else 'DOES NOT FIT'} "
           f"{report['capacity_bytes'] / GB:.0f} GB"),
      "activations:",
  ]
  lines += [_row(k, v) for k, v in a.items() if k not in
            ("total", "tokens_per_device", "sequences_per_device")]
  comp = report.get("compile")
  if comp:
    lines.append(f"XLA memory analysis, per device ({comp.get('model', '')}):")
    if "error" in comp:
      lines.append(f"  not available: {comp['error']}")
    else:
      for k in ("argument", "output", "alias", "temp", "total"):
        lines.append(_row(f"xla {k}", comp[k]))
      lines.append(_row("estimate, same model", comp["estimate_total"]))
      lines.append(_row("xla, extrapolated", comp["extrapolated_total"],
                        "xla total + the estimate's bytes for the layers cut"))
      lines.append(f"  compiled in {comp['compile_s']} s on {comp['devices']} CPU devices")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", help=f"a ModelConfig preset: {sorted(configs.MODEL_PRESETS)}")
  parser.add_argument("--config", help="an experiment file (path[:arg])")
  parser.add_argument("--stage", help="with --config: the stage to plan (default: the first "
                      "that trains)")
  parser.add_argument("--mesh", help="data,fsdp,expert,tensor (one may be -1); default: search")
  parser.add_argument("--devices", type=int, help="devices in the mesh (default: the mesh's "
                      "product, else this host's)")
  parser.add_argument("--batch", type=int, help="global batch (default: one sequence per "
                      "data·fsdp·expert shard, or the experiment's)")
  parser.add_argument("--seq_len", type=int, help=f"default {DEFAULT_SEQ_LEN} (capped at "
                      "max_seq_len) or the experiment's")
  parser.add_argument("--optimizer", default="adamw", choices=sorted(memory.OPTIMIZERS))
  parser.add_argument("--hbm_gb", type=float, default=80.0, help="memory per device, GB")
  parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                      help="AOT-compile a 1 dense + 1 MoE layer cut of the model for XLA's "
                      "memory analysis (default: only for models under 1B parameters)")
  parser.add_argument("--compile_timeout", type=int, default=600)
  parser.add_argument("--json", action="store_true", help="print one JSON line")
  parser.add_argument("--_compile_child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  try:
    name, cfg, ocfg, mesh_text, batch, seq_len = _inputs(args)
    args.seq_len = seq_len
    if args._compile_child:
      sizes = parse_mesh(mesh_text, jax.device_count())
      print(json.dumps(compile_memory(cut_model(cfg), sizes, batch, seq_len, ocfg)))
      return 0
    fixed = [int(x) for x in (mesh_text or "-1").split(",") if x.strip().lstrip("-").isdigit()]
    n_devices = args.devices or (math.prod(fixed) if -1 not in fixed else jax.device_count())
    if n_devices < 1:
      raise ValueError("--devices must be >= 1")
    capacity = args.hbm_gb * GB
    kw = dict(batch=batch, seq_len=seq_len, optimizer=args.optimizer)
    if mesh_text:
      plan = plan_for(cfg, parse_mesh(mesh_text, n_devices), **kw)
      reason = "given"
    else:
      plan, reason = search(cfg, n_devices, capacity, **kw)
  except ValueError as e:
    print(f"plan: {e}", file=sys.stderr)
    return 2
  counts = param_counts(cfg)
  dtypes = f"{cfg.param_dtype} parameters, {cfg.dtype} compute"
  report = {
      "model": name, "params_total": counts["total"],
      "params_activated": counts["activated"], "params_mtp": counts["mtp"],
      "mesh": plan.sizes, "mesh_reason": reason, "devices": n_devices, "batch": plan.batch,
      "seq_len": seq_len, "optimizer": args.optimizer, "dtypes": dtypes,
      "optimizer_assumption": {
          "adamw": "2 f32 moments + f32 master copy (if params < f32)",
          "adamw_as_built": "2 moments in the param dtype (optim.make_optimizer)",
      }[args.optimizer],
      "remat": cfg.remat, "bytes_per_device": plan.bytes_per_device(),
      "activations_detail": {k: v for k, v in plan.activations.items()},
      "capacity_bytes": int(capacity), "fits": plan.total <= capacity,
  }
  run_compile = args.compile if args.compile is not None else counts["total"] < 1e9
  if run_compile:
    cut = cut_model(cfg)
    comp = _compile_in_child(args, plan.sizes, plan.batch)
    comp["model"] = (f"{cut.n_dense_layers} dense + {cut.n_moe_layers} MoE layers"
                     f"{' + MTP' if cut.mtp_depth else ''}, CPU, optimizer as built")
    comp["devices"] = n_devices
    if "error" not in comp:
      est = lambda c: plan_for(c, plan.sizes, batch=plan.batch, seq_len=seq_len,
                               optimizer="adamw_as_built", backend="cpu").total
      comp["estimate_total"] = est(cut)
      comp["extrapolated_total"] = comp["total"] + est(cfg) - est(cut)
    report["compile"] = comp
  print(json.dumps(report) if args.json else render(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
