"""XLA's memory analysis of an experiment's real programs, compiled ahead of time.

  python -m r1jax.tools.plan --config=experiments/r1_zero/v3_671b.py --devices=256 --compile

The programs a run executes, built by their public entry points for the whole
model on the experiment's mesh, lowered from ShapeDtypeStructs with
NamedShardings from the rule table (nothing is allocated) and compiled:

  grpo_update  update.make_train_step on one minibatch (micro-batched when the
               code and GRPOConfig.micro_batches say so), RLState donated
  logprob      update.make_logprob_fn (π_old and π_ref) on the same rows
  decode       one Transformer.decode step, T = 1, over a latent cache of
               P + N slots for a rollout slice (GRPOConfig.rollout_slice, else
               the whole rollout batch), the cache donated
  sft          sft.make_train_step of a stage with batch_size and seq_len

Per device: argument, output, temp and alias bytes of `memory_analysis()`, the
program's peak = argument + output + temp − alias, and `resident`: state that
lives on the device while the program runs but is not its argument (the
optimizer state during log-probs and decoding, the reference during decoding).
Compiles run on N forced CPU devices in a child process (XLA_FLAGS must be set
before jax is imported); r1jax/tools/plan.py starts it. XLA:CPU compiles the
CPU forms of backend-dependent kernels (attention "auto": blocked at long
sequences). grouped_matmul "auto" compiles as "sorted", XLA:CPU's grouped
matmul without weight copies (and the CPU's default), whose buffers are those
of a GPU/TPU's ragged_dot ("blocked" copies an expert's weights per block of
rows); --grouped_matmul overrides it. Layer stacks compile as the rolled loops
an accelerator runs (scan_unroll "auto" would unroll short stacks on CPU).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax import configs
from r1jax.model import ModelConfig, Transformer, abstract_params, logical_axes
from r1jax.parallel import mesh as mesh_lib
from r1jax.tools import memory
from r1jax.train import optim

PROGRAMS = ("grpo_update", "logprob", "decode", "sft")


@dataclasses.dataclass(frozen=True)
class Program:
  """One program's shapes: rows × seq_len tokens (decode: rows × 1 over `slots`)."""
  name: str
  cfg: ModelConfig
  ocfg: optim.OptimConfig
  rows: int
  seq_len: int
  micro_batches: int = 1
  completion_len: int = 0  # GRPO: N
  slots: int = 0  # decode: cache slots
  grpo: object = None  # GRPOConfig of the GRPO programs

  @property
  def micro_rows(self) -> int:
    return self.rows // self.micro_batches


def _takes(fn, name: str) -> bool:
  return name in inspect.signature(fn).parameters


def programs_of(c, stage: str | None = None, *, micro_batches: int | None = None,
                rollout_slice: int | None = None) -> list[Program]:
  """The programs of an experiment's stages (`stage`: only that one); flags override
  the GRPO micro-batch count and the rollout slice."""
  names = [stage] if stage else list(c.pipeline)
  out = []
  for name in names:
    if name not in c.stages:
      raise ValueError(f"--stage={name!r}: the experiment's stages are {sorted(c.stages)}")
    sc = c.stages[name]
    cfg = configs.stage_model(c, name)
    if "optim" not in sc:
      continue
    ocfg = configs.optim_config(sc)
    if sc.get("kind") == "grpo":
      from r1jax.rl.step import GRPOConfig  # noqa: PLC0415 (RL only for RL stages)
      g = GRPOConfig(**sc.grpo.to_dict())
      m = micro_batches or getattr(g, "micro_batches", 1)
      s = rollout_slice or getattr(g, "rollout_slice", 0) or g.batch_size
      L = g.max_prompt_len + g.max_new_tokens
      if g.minibatch_size % m:
        raise ValueError(f"micro_batches={m} must divide the minibatch of {g.minibatch_size}")
      kw = dict(cfg=cfg, ocfg=ocfg, seq_len=L, completion_len=g.max_new_tokens, grpo=g)
      out += [Program("grpo_update", rows=g.minibatch_size, micro_batches=m, **kw),
              Program("logprob", rows=g.minibatch_size // m, **kw),
              Program("decode", rows=min(s, g.batch_size), slots=L, **kw)]
    elif "batch_size" in sc and "seq_len" in sc:
      m = micro_batches or sc.get("micro_batches", 1)
      out.append(Program("sft", cfg, ocfg, rows=sc.batch_size, seq_len=sc.seq_len,
                         micro_batches=m))
  if not out:
    raise ValueError(f"no program to compile among stages {names}")
  return out


# ----------------------------------------------------------------------------
# Abstract, sharded inputs.

def like_params(opt_state, params, param_sharding, other):
  """Shardings for an optimizer state: a leaf mirroring a parameter (its path ends with
  the parameter's path, same shape: a moment or a master copy) is sharded like it; the
  rest get `other`. Left to propagation, XLA would replicate them."""
  by_path = {jax.tree_util.keystr(p): (x.shape, sh) for (p, x), sh in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_sharding))}

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    for p, (shape, sh) in by_path.items():
      if key.endswith(p) and leaf.shape == shape:
        return sh
    return other

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def _abstract(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      tree, shardings)


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _state(cfg: ModelConfig, optimizer, mesh):
  """(params, opt_state) as sharded ShapeDtypeStructs, and their shardings."""
  params = abstract_params(cfg)
  p_sh = mesh_lib.logical_sharding(mesh, logical_axes(cfg))
  opt = jax.eval_shape(optimizer.init, params)
  o_sh = like_params(opt, params, p_sh, mesh_lib.replicated(mesh))
  return _abstract(params, p_sh), p_sh, _abstract(opt, o_sh), o_sh


def _batch(mesh, rows: int, **shapes) -> dict:
  """name=(trailing shape, dtype) -> [rows, ...] arrays split over the batch axes."""
  return {k: jax.ShapeDtypeStruct((rows, *s), dt, sharding=mesh_lib.batch_sharding(mesh, 1 + len(s)))
          for k, (s, dt) in shapes.items()}


def _check_rows(prog: Program, mesh) -> None:
  n = math.prod(mesh.shape[a] for a in mesh_lib.BATCH)
  if prog.micro_rows % n or prog.micro_rows < 1:
    raise ValueError(f"{prog.name}: {prog.micro_rows} rows per micro-batch do not split over "
                     f"the {n} data-parallel devices of mesh {dict(mesh.shape)} (change "
                     "prompts_per_step, n_minibatches, micro_batches or rollout_slice)")


def build(prog: Program, mesh) -> tuple:
  """(jitted function, abstract arguments, abstract state resident but not passed)."""
  _check_rows(prog, mesh)
  cfg = prog.cfg
  if prog.name == "sft":
    from r1jax.train import sft  # noqa: PLC0415
    optimizer = optim.make_optimizer(prog.ocfg)
    params, p_sh, opt, o_sh = _state(cfg, optimizer, mesh)
    state = sft.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=mesh_lib.replicated(mesh)),
                           params=params, opt_state=opt)
    sh = sft.TrainState(step=mesh_lib.replicated(mesh), params=p_sh, opt_state=o_sh)
    kw = {"micro_batches": prog.micro_batches} if _takes(sft.make_train_step, "micro_batches") else {}
    rows = prog.rows if kw else prog.micro_rows
    batch = _batch(mesh, rows, **{k: ((prog.seq_len,), jnp.int32)
                                  for k in ("tokens", "loss_mask", "valid")})
    fn = jax.jit(sft.make_train_step(cfg, optimizer, **kw), out_shardings=(sh, None),
                 donate_argnums=0)
    return fn, (state, batch), ()
  from r1jax.rl import update  # noqa: PLC0415
  g = prog.grpo
  optimizer = optim.make_optimizer(prog.ocfg)
  params, p_sh, opt, o_sh = _state(cfg, optimizer, mesh)
  ref = params if g.beta > 0 else None
  L, N = prog.seq_len, prog.completion_len
  if prog.name == "grpo_update":
    state = update.RLState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=mesh_lib.replicated(mesh)),
                           params=params, opt_state=opt, ref_params=ref)
    sh = update.RLState(step=mesh_lib.replicated(mesh), params=p_sh, opt_state=o_sh,
                        ref_params=p_sh if ref is not None else None)
    loss_fn = update.make_loss_fn(cfg, **dict(g.loss_options()))
    kw = ({"micro_batches": prog.micro_batches}
          if _takes(update.make_train_step, "micro_batches") else {})
    rows = prog.rows if kw else prog.micro_rows
    shapes = dict(tokens=((L,), jnp.int32), positions=((L,), jnp.int32), valid=((L,), jnp.bool_),
                  mask=((N,), jnp.bool_), old_logp=((N,), jnp.float32),
                  advantages=((), jnp.float32))
    if ref is not None:
      shapes["ref_logp"] = ((N,), jnp.float32)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=mesh_lib.replicated(mesh))
    fn = jax.jit(update.make_train_step(cfg, optimizer, loss_fn, **kw),
                 out_shardings=(sh, None), donate_argnums=0)
    return fn, (state, _batch(mesh, rows, **shapes), rng), ()
  if prog.name == "logprob":
    batch = _batch(mesh, prog.rows, tokens=((L,), jnp.int32), positions=((L,), jnp.int32),
                   valid=((L,), jnp.bool_), mask=((N,), jnp.bool_))
    fn = jax.jit(update.make_logprob_fn(cfg, g.temperature, g.top_p, g.top_k))
    return fn, (params, ref, batch), (opt,)
  if prog.name == "decode":
    from r1jax.rl.rollout import init_cache  # noqa: PLC0415
    cache = jax.eval_shape(lambda: init_cache(cfg, prog.rows, prog.slots))
    c_sh = NamedSharding(mesh, P(None, mesh_lib.BATCH, None, None))  # as rollout.init_cache
    cache = _abstract(cache, jax.tree.map(lambda _: c_sh, cache))
    model = Transformer(cfg)

    def decode(params, cache, tokens_Bx1, positions_Bx1, start, valid_BxS):
      return model.apply({"params": params}, tokens_Bx1, positions_Bx1, cache, start, valid_BxS,
                         method="decode")

    inputs = _batch(mesh, prog.rows, tokens=((1,), jnp.int32), positions=((1,), jnp.int32),
                    valid=((prog.slots,), jnp.bool_))
    start = jax.ShapeDtypeStruct((), jnp.int32, sharding=mesh_lib.replicated(mesh))
    fn = jax.jit(decode, donate_argnums=1, out_shardings=(None, jax.tree.map(lambda _: c_sh, cache)))
    return fn, (params, cache, inputs["tokens"], inputs["positions"], start, inputs["valid"]), \
        (opt,) + ((ref,) if ref is not None else ())
  raise ValueError(f"unknown program {prog.name!r}; known: {PROGRAMS}")


def analysis(compiled) -> dict:
  """Bytes per device from XLA's memory analysis, and the peak."""
  m = compiled.memory_analysis()
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


# XLA:CPU has no bf16 matmul: it converts bf16 operands to f32, and its
# loop-invariant code motion then hoists the conversion of a whole stacked input
# out of the layer loop (decode: every layer's latent cache in f32 at once, 32 GB
# a device for V3 at 33k slots). GPUs and TPUs multiply bf16 as is, so that
# buffer does not exist there: the analysis runs with the pass off unless
# `cpu_licm` (plan --cpu_licm reports XLA:CPU's own choice).
NO_CPU_LICM = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compile_program(prog: Program, mesh, cpu_licm: bool = False) -> dict:
  """One program compiled on `mesh`: XLA's bytes per device, the resident state, the
  formula's estimate and the compile time."""
  fn, args, resident = build(prog, mesh)
  t0 = time.time()
  with jax.set_mesh(mesh):  # the MoE layer reads the ambient mesh for expert parallelism
    lowered = fn.lower(*args)
    t1 = time.time()
    compiled = lowered.compile(None if cpu_licm else dict(NO_CPU_LICM))
  out = analysis(compiled)
  sizes = dict(mesh.shape)
  out.update(resident=device_bytes(resident), lower_s=round(t1 - t0, 1),
             compile_s=round(time.time() - t1, 1), rows=prog.micro_rows, seq_len=prog.seq_len,
             micro_batches=prog.micro_batches,
             estimate=memory.program_bytes(prog, sizes, backend=jax.default_backend()))
  if prog.name == "decode":
    out["slots"] = prog.slots
  return out


# ----------------------------------------------------------------------------
# The child process: python -m r1jax.tools.compile_plan --config=... --mesh=...

def main(argv: list[str] | None = None) -> int:
  """Compiles each program in turn on this process's devices; one JSON line each."""
  import argparse  # noqa: PLC0415
  import json  # noqa: PLC0415
  import sys  # noqa: PLC0415
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", required=True)
  parser.add_argument("--stage")
  parser.add_argument("--mesh", required=True)
  parser.add_argument("--micro_batches", type=int)
  parser.add_argument("--rollout_slice", type=int)
  parser.add_argument("--programs", default=",".join(PROGRAMS))
  parser.add_argument("--n_layers", type=int, help="cut the model to this many layers")
  parser.add_argument("--grouped_matmul", help="override ModelConfig.grouped_matmul")
  parser.add_argument("--cpu_licm", action="store_true",
                      help="keep XLA:CPU's loop-invariant code motion (see NO_CPU_LICM)")
  args = parser.parse_args(argv)
  path, _, arg = args.config.partition(":")
  module = configs.experiment(path)
  c = module.get_config(arg) if arg else module.get_config()
  mesh = mesh_lib.make_mesh([int(x) for x in args.mesh.split(",")])
  wanted = args.programs.split(",")
  progs = [p for p in programs_of(c, args.stage, micro_batches=args.micro_batches,
                                  rollout_slice=args.rollout_slice) if p.name in wanted]
  for prog in sorted(progs, key=lambda p: wanted.index(p.name)):
    if args.n_layers:
      prog = dataclasses.replace(prog, cfg=cut_model(prog.cfg, args.n_layers))
    gmm = args.grouped_matmul or ("sorted" if prog.cfg.grouped_matmul == "auto" else None)
    if gmm:  # a GPU/TPU's buffers: ragged_dot's are those of "sorted"
      prog = dataclasses.replace(prog, cfg=prog.cfg.replace(grouped_matmul=gmm))
    if not prog.cfg.scan_unroll:  # as an accelerator runs the stacks: rolled loops
      prog = dataclasses.replace(prog, cfg=prog.cfg.replace(scan_unroll=1))
    try:
      out = compile_program(prog, mesh, args.cpu_licm)
    except ValueError as e:
      out = {"error": str(e)}
    print(json.dumps({"program": prog.name, **out}), flush=True)
    sys.stdout.flush()
  return 0


def cut_model(cfg: ModelConfig, n_layers: int = 2) -> ModelConfig:
  """The same widths with n_layers layers: one dense then MoE ones (or all dense)."""
  n_dense = min(cfg.n_dense_layers, 1 if cfg.n_moe_layers else n_layers)
  return cfg.replace(n_layers=n_layers, n_dense_layers=n_dense)


if __name__ == "__main__":
  raise SystemExit(main())
