"""Memory plan for training a model on a mesh, per device, without allocating it.

  python -m r1jax.tools.plan --model=deepseek_v3_671b --devices=256
  python -m r1jax.tools.plan --model=deepseek_v3_671b --devices=256 --mesh=1,8,4,8 --json
  python -m r1jax.tools.plan --config=experiments/r1_zero/tiny.py --devices=8 --compile

Parameters, optimizer state, gradients and activations are sized by
r1jax/tools/memory.py (abstract shapes through the rule table, and formulas);
meshes that split a dim unevenly are rejected, as jax rejects them. Without --mesh, candidate meshes are searched and the
reason for the choice is printed. With --config and --compile, the experiment's
real programs (GRPO update, log-probs, one decode step of a rollout slice, an
SFT/pretraining step) of the whole model are compiled ahead of time for its
mesh on N forced CPU devices (r1jax/tools/compile_plan.py, in a child process
that sets XLA_FLAGS before importing jax), and XLA's memory analysis per
program is reported beside the formula's estimate for the same program;
`fits` is then XLA's answer for every program.

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

import jax

from r1jax import configs
from r1jax.model import ModelConfig, param_counts
from r1jax.parallel import mesh as mesh_lib
from r1jax.tools import compile_plan, memory
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


def _rules(cfg: ModelConfig) -> str:
  """The divisibility rules the mesh search applies, in words."""
  expert = (f"expert | {cfg.n_routed_experts} experts, " if cfg.n_routed_experts
            else "no routed experts: the expert axis only splits the batch, ")
  return f"{expert}tensor | {cfg.n_heads} heads, tensor ≤ {MAX_TENSOR}"


def search(cfg: ModelConfig, n_devices: int, capacity: float, **kw) -> tuple[Plan, str]:
  """The fitting mesh with the lowest per-device total; among those within 2% of it,
  the one with the most data·fsdp (gradient traffic only, no activation exchange)."""
  plans = [plan_for(cfg, s, **kw) for s in candidate_meshes(cfg, n_devices, kw.get("batch"))]
  if not plans:
    raise ValueError(f"no mesh of {n_devices} devices fits the model's divisibility rules "
                     f"({_rules(cfg)}); try another --devices or --batch")
  fit = [p for p in plans if p.total <= capacity]
  pool = fit or plans
  best = min(p.total for p in pool)
  near = [p for p in pool if p.total <= 1.02 * best]
  dp = lambda p: (p.sizes["data"] * p.sizes["fsdp"], p.sizes["data"], -p.total)
  chosen = max(near, key=dp)
  if fit:
    why = (f"searched {len(plans)} meshes ({_rules(cfg)}); {len(fit)} fit {capacity / GB:.0f} GB; "
           f"lowest total {best / GB:.1f} GB; of the {len(near)} within 2% of it, this one has "
           f"the most data·fsdp ({dp(chosen)[0]})")
  else:
    why = (f"searched {len(plans)} meshes; none fits {capacity / GB:.0f} GB per device; "
           f"this one needs the least ({chosen.total / GB:.1f} GB)")
  return chosen, why


# ----------------------------------------------------------------------------
# Ahead-of-time compile of the experiment's programs (r1jax/tools/compile_plan.py).

def _child_env(n: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  # The last two flags halve XLA:CPU compile time (LLVM codegen effort only; buffer
  # assignment, hence the memory analysis, is unchanged).
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}",
                                       "--xla_backend_optimization_level=0",
                                       "--xla_llvm_disable_expensive_passes=true"])
  return env


def compile_programs(args: argparse.Namespace, sizes: dict[str, int]) -> list[dict]:
  """XLA's analysis of each program: in this process when it has exactly the mesh's
  CPU devices, else in a child with N forced CPU devices (time-limited)."""
  n = math.prod(sizes.values())
  mesh_text = ",".join(str(sizes[a]) for a in mesh_lib.AXES)
  flags = [f"--mesh={mesh_text}", f"--programs={args.programs}"]
  flags += [f"--{k}={getattr(args, k)}" for k in ("stage", "micro_batches", "rollout_slice",
                                                  "compile_layers", "grouped_matmul")
            if getattr(args, k)]
  flags = [f.replace("--compile_layers", "--n_layers") for f in flags]
  if args.cpu_licm:
    flags.append("--cpu_licm")
  if jax.default_backend() == "cpu" and jax.device_count() == n:
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      compile_plan.main([f"--config={args.config}", *flags])
    lines = out.getvalue().splitlines()
  else:
    cmd = [sys.executable, "-m", "r1jax.tools.compile_plan", f"--config={args.config}", *flags]
    try:
      res = subprocess.run(cmd, env=_child_env(n), capture_output=True, text=True,
                           timeout=args.compile_timeout)
    except subprocess.TimeoutExpired as e:
      done = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      return [json.loads(x) for x in done.splitlines() if x.startswith("{")] + [
          {"program": "?", "error": f"compile did not finish in {args.compile_timeout} s "
           "(--compile_timeout)"}]
    lines = res.stdout.splitlines()
    if res.returncode or not lines:
      raise ValueError("compile: " + (res.stderr.strip().splitlines() or ["no output"])[-1])
  return [json.loads(x) for x in lines if x.startswith("{")]


def program_reports(results: list[dict], capacity: float) -> dict:
  """name -> XLA's bytes, the resident state, the total per device, the formula and fits."""
  out = {}
  for r in results:
    name = r.pop("program")
    if "error" in r:
      out[name] = r
      continue
    xla = {k: r.pop(k) for k in ("argument", "output", "temp", "alias", "code", "peak")}
    est = r.pop("estimate")
    total = xla["peak"] + r["resident"]
    out[name] = {**r, "xla": xla, "estimate": est, "peak_gb_per_device": total / GB,
                 "estimate_gb_per_device": (est["peak"] + est["resident"]) / GB,
                 "estimate_error": est["peak"] / max(xla["peak"], 1) - 1,
                 "fits": total <= capacity}
  return out


# ----------------------------------------------------------------------------
# Command line.

def _load_experiment(spec: str):
  path, _, arg = spec.partition(":")
  module = configs.experiment(path)
  return module.get_config(arg) if arg else module.get_config()


def _experiment_step(c, stage: str | None):
  """(stage, model, batch, seq_len, OptimConfig) of the stage whose train step is planned:
  --stage, else the first in the pipeline that trains. The batch is one micro-step's
  (a GRPO stage: its update minibatch of prompt + completion sequences over
  micro_batches, with no MTP head, which RL does not train; distillation plans its
  student)."""
  names = [stage] if stage else list(c.pipeline)
  for name in names:
    if name not in c.stages:
      raise ValueError(f"--stage={name!r}: the experiment's stages are {sorted(c.stages)}")
    sc = c.stages[name]
    cfg = configs.stage_model(c, name)
    if "batch_size" in sc and "seq_len" in sc:
      micro = max(sc.get("micro_batches", 1), 1)
      return name, cfg, sc.batch_size // micro, sc.seq_len, configs.optim_config(sc)
    if sc.kind == "grpo":
      from r1jax.rl.step import GRPOConfig  # noqa: PLC0415 (RL only for RL stages)
      g = GRPOConfig(**sc.grpo.to_dict())
      return (name, cfg.replace(mtp_depth=0), g.minibatch_size // max(g.micro_batches, 1),
              g.max_prompt_len + g.max_new_tokens, configs.optim_config(sc))
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
  progs = report.get("programs")
  if progs is not None:
    unit, size = _unit(max([p["peak_gb_per_device"] * GB for p in progs.values()
                            if "xla" in p], default=GB))
    lines.append(f"XLA memory analysis per device ({report['compile_devices']} forced CPU "
                 f"devices), {unit}; total = peak + resident state not passed:")
    lines.append(f"  {'program':<12}{'rows x tokens':>16}{'argument':>10}{'output':>9}"
                 f"{'temp':>9}{'alias':>9}{'peak':>9}{'resident':>9}{'total':>9}{'formula':>9}"
                 f"{'compile s':>10}")
    for name, p in progs.items():
      if "error" in p:
        lines.append(f"  {name:<12}not available: {p['error']}")
        continue
      x = p["xla"]
      shape = f"{p['rows']}x{p['slots'] if 'slots' in p else p['seq_len']}"
      if p.get("micro_batches", 1) > 1:
        shape = f"{p['micro_batches']}·{shape}"
      lines.append(f"  {name:<12}{shape:>16}" + "".join(
          f"{v / size:>{w}.2f}" for v, w in ((x["argument"], 10), (x["output"], 9), (x["temp"], 9),
                                           (x["alias"], 9), (x["peak"], 9), (p["resident"], 9)))
          + f"{p['peak_gb_per_device'] * GB / size:>9.2f}"
          f"{p['estimate_gb_per_device'] * GB / size:>9.2f}"
          f"{p['lower_s'] + p['compile_s']:>10.0f}  {'fits' if p['fits'] else 'DOES NOT FIT'}")
    lines.append(f"  overall: {'fits' if report['fits'] else 'DOES NOT FIT'} "
                 f"{report['capacity_bytes'] / GB:.0f} GB")
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
                      help="with --config: AOT-compile the experiment's programs (GRPO update, "
                      "log-probs, a decode step, SFT) for XLA's memory analysis on forced CPU "
                      "devices (default: only for models under 1B parameters)")
  parser.add_argument("--programs", default=",".join(compile_plan.PROGRAMS),
                      help="with --compile: which programs, in this order")
  parser.add_argument("--micro_batches", type=int, help="override the GRPO/SFT micro-batches")
  parser.add_argument("--rollout_slice", type=int, help="override the rows decoded at once")
  parser.add_argument("--compile_layers", type=int, help="compile the model cut to this many "
                      "layers (1 dense + MoE); default all")
  parser.add_argument("--grouped_matmul", help="with --compile: override the model's "
                      "grouped_matmul (default: sorted, whose buffers are ragged_dot's)")
  parser.add_argument("--cpu_licm", action="store_true", help="with --compile: keep XLA:CPU's "
                      "loop-invariant code motion, which hoists f32 copies of whole bf16 "
                      "stacks that a GPU/TPU never makes (off by default)")
  parser.add_argument("--compile_timeout", type=int, default=3600)
  parser.add_argument("--json", action="store_true", help="print one JSON line")
  args = parser.parse_args(argv)
  try:
    name, cfg, ocfg, mesh_text, batch, seq_len = _inputs(args)
    args.seq_len = seq_len
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
          "adamw_as_built": "optim.make_optimizer's own state, sized from its init",
      }[args.optimizer],
      "remat": cfg.remat, "bytes_per_device": plan.bytes_per_device(),
      "activations_detail": {k: v for k, v in plan.activations.items()},
      "capacity_bytes": int(capacity), "fits": plan.total <= capacity,
  }
  run_compile = args.compile if args.compile is not None else (
      counts["total"] < 1e9 and bool(args.config))
  if run_compile:
    if not args.config:
      print("plan: --compile needs --config (the programs come from an experiment)",
            file=sys.stderr)
      return 2
    try:
      programs = program_reports(compile_programs(args, plan.sizes), capacity)
    except ValueError as e:
      print(f"plan: {e}", file=sys.stderr)
      return 2
    report["programs"] = programs
    report["compile_devices"] = n_devices
    report["formula_fits"] = report["fits"]
    report["fits"] = bool(programs) and all(p.get("fits", False) for p in programs.values())
  print(json.dumps(report) if args.json else render(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
