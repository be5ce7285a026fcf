"""Benchmarks that print one JSON line each.

  python -m r1jax.tools.bench train --config=medium --batch=8 --seq=256 [--compare-hf]
  python -m r1jax.tools.bench forward --config=peer --batch=8 --seq=256 [--compare-hf]
  python -m r1jax.tools.bench rollout --config=tiny --batch=8 --prompt=32 --new=128 [--compare-hf]
  python -m r1jax.tools.bench grpo --config=peer --steps=3 [--compare-trl]
  python -m r1jax.tools.bench moe --config=medium --tokens=2048 --top_k=4 --experts=8,16,32,64
  python -m r1jax.tools.bench roof --size=2048

`train` reports tokens/s and model FLOP utilisation (MFU) against the matmul
rate that `roof` measures, in the same process, dtype and device. `generate`
is `rollout`. `grpo` times whole GRPO iterations split into rollout, rewards,
log-probs and update.

Peers (never dependencies; bench_peers.py runs them in --peer_python, a
separate torch venv): `--compare-hf` on train/forward/rollout/generate does
the same work in transformers' DeepseekV3ForCausalLM, `--compare-trl` on grpo
runs TRL's GRPOTrainer. Both sides load the same weights (our params written
by `r1jax.interop.hf.save`), MTP is switched off (transformers has none), and
the outputs are checked to agree (logits within --parity_atol) before the
timings count; `speedup` = peer seconds / ours (above 1: r1jax is faster).
Our side of that comparison is bench_compare.py.

Commands live in `COMMANDS` (name -> flag declarer, runner); add one there.
Times are measured after a warm-up call, so compilation is reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.model import (ModelConfig, cache_bytes_per_token, init_params, logical_axes,
                         param_counts)
from r1jax.model.moe import MoE
from r1jax.parallel.mesh import batch_sharding, logical_sharding, make_mesh
from r1jax.rl.rollout import sample
from r1jax.tools import bench_compare


def medium(**overrides) -> ModelConfig:
  """~70M parameters (~20M activated): big enough that matmuls, not dispatch, dominate."""
  fields = dict(
      vocab_size=8192, d_model=512, n_layers=8, n_dense_layers=1, n_heads=8, q_lora_rank=192,
      kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, d_ff=1536,
      moe_d_ff=256, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
      n_limited_groups=2, original_max_position=1024, max_seq_len=4096, mtp_depth=0)
  fields.update(overrides)
  return ModelConfig.tiny(**fields)


def peer(**overrides) -> ModelConfig:
  """The peer comparisons' model (issue #15): 4 layers (1 dense), d_model 256, 16 routed
  experts top-4 + 1 shared, vocab 1024, q/kv LoRA 96/64, MTP off, float32."""
  fields = dict(
      vocab_size=1024, d_model=256, n_layers=4, n_dense_layers=1, n_heads=4, q_lora_rank=96,
      kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, d_ff=768,
      moe_d_ff=128, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
      n_limited_groups=2, original_max_position=256, max_seq_len=1024, mtp_depth=0,
      dtype="float32", param_dtype="float32")
  fields.update(overrides)
  return ModelConfig.tiny(**fields)


CONFIGS: dict[str, Callable[..., ModelConfig]] = {
    "tiny": ModelConfig.tiny,
    "medium": medium,
    "peer": peer,
    "deepseek_v3_671b": ModelConfig.deepseek_v3_671b,  # figures only; too big to run here
}


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """(first call seconds, median seconds of `repeats` later calls), results awaited.
  The median, not the mean: on a shared 2-core VM single calls vary by ±20%."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


# ----------------------------------------------------------------------------
# roof: what one large matmul reaches here (the denominator of MFU)

def _roof_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--size", type=int, default=2048, help="n of the n×n @ n×n matmul")
  p.add_argument("--repeats", type=int, default=5)


def matmul_flops_per_s(n: int, dtype, repeats: int = 5) -> float:
  """FLOP/s of an n×n by n×n matmul in `dtype` on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(jnp.matmul)
  _, sec = _timed(lambda: mm(a, b), repeats)
  return 2 * n ** 3 / sec


def _roof(args: argparse.Namespace, cfg: ModelConfig) -> dict:
  rate = matmul_flops_per_s(args.size, jnp.dtype(cfg.dtype), args.repeats)
  return {"size": args.size, "dtype": cfg.dtype, "matmul_tflops": round(rate / 1e12, 4)}


# ----------------------------------------------------------------------------
# train: one full training step (forward, backward, AdamW, bias update)

def _train_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--roof_size", type=int, default=2048, help="matmul size of the MFU roof")
  bench_compare.peer_flags(p)


def train_flops_per_token(cfg: ModelConfig, seq: int) -> float:
  """Model FLOPs per trained token: 6 × the matmul weights a token uses (activated,
  embedding lookup excluded, output head included) plus causal attention's
  scores and weighted sum (on average seq/2 keys, ×3 for the backward pass)."""
  counts = param_counts(cfg)
  weights = counts["activated_no_embed"] + cfg.d_model * cfg.vocab_size
  attention = 3 * cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq
  return 6 * weights + attention


def _train(args: argparse.Namespace, cfg: ModelConfig) -> dict:
  from r1jax.train import optim, sft
  ocfg = optim.OptimConfig(learning_rate=1e-4, warmup_steps=1, total_steps=1000)
  optimizer = optim.make_optimizer(ocfg)
  mesh = make_mesh(tuple(int(s) for s in args.mesh.split(","))) if args.mesh else None
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  B, T = args.batch, args.seq
  tokens = jax.random.randint(jax.random.key(1), (B, T), 3, cfg.vocab_size, jnp.int32)
  batch = {"tokens": tokens, "loss_mask": jnp.ones((B, T), jnp.int32),
           "valid": jnp.ones((B, T), jnp.int32)}
  if mesh is not None:
    params = jax.device_put(params, logical_sharding(mesh, logical_axes(cfg)))
    batch = jax.device_put(batch, batch_sharding(mesh))
  state = sft.init_state(params, optimizer)
  step = jax.jit(sft.make_train_step(cfg, optimizer), donate_argnums=0)
  holder = [state]

  def run():
    holder[0], m = step(holder[0], batch)
    return m["loss"]

  def timed():
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      return _timed(run, args.repeats)

  first, sec = timed()
  tokens_per_s = B * T / sec
  flops = train_flops_per_token(cfg, T)
  roof = matmul_flops_per_s(args.roof_size, jnp.dtype(cfg.dtype))
  out = {"batch": B, "seq": T, "step_s": round(sec, 4), "compile_s": round(first - sec, 2),
         "tokens_per_s": round(tokens_per_s, 1),
         "model_tflops_per_s": round(tokens_per_s * flops / 1e12, 4),
         "roof_tflops": round(roof / 1e12, 4),
         "mfu": round(tokens_per_s * flops / roof / (mesh.size if mesh is not None else 1), 4)}
  if args.compare_hf:
    # The peer starts from the same weights: ours before any update.
    params0 = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    out.update(bench_compare.compare(
        args, cfg, params0, "train", tokens, bench_compare.forward_logits(cfg)(params0, tokens),
        sec, repeats=args.repeats, lr=ocfg.learning_rate, retime=lambda: timed()[1]))
  return out


# ----------------------------------------------------------------------------
# forward: logits of a [B, T] batch (no cache)

def _forward_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  bench_compare.peer_flags(p)


def _forward(args: argparse.Namespace, cfg: ModelConfig) -> dict:
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  B, T = args.batch, args.seq
  tokens = jax.random.randint(jax.random.key(1), (B, T), 3, cfg.vocab_size, jnp.int32)
  fwd = bench_compare.forward_logits(cfg)
  first, sec = _timed(lambda: fwd(params, tokens), args.repeats)
  out = {"batch": B, "seq": T, "step_s": round(sec, 4), "compile_s": round(first - sec, 2),
         "tokens_per_s": round(B * T / sec, 1)}
  if args.compare_hf:
    out.update(bench_compare.compare(
        args, cfg, params, "forward", tokens, fwd(params, tokens), sec, repeats=args.repeats,
        retime=lambda: _timed(lambda: fwd(params, tokens), args.repeats)[1]))
  return out


# ----------------------------------------------------------------------------
# rollout

def _rollout_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt", type=int, default=32, help="prompt slots P (all rows full)")
  p.add_argument("--new", type=int, default=128, help="new tokens N (EOS off: all N are made)")
  p.add_argument("--temperature", type=float, default=None,
                 help="1.0, or 0.0 (greedy) with --compare-hf")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--repeats", type=int, default=3)
  bench_compare.peer_flags(p)


def _rollout(args: argparse.Namespace, cfg: ModelConfig) -> dict:
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  mesh = None
  if args.mesh:
    mesh = make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    params = jax.device_put(params, logical_sharding(mesh, logical_axes(cfg)))
  B, Pn, N = args.batch, args.prompt, args.new
  if args.temperature is None:
    args.temperature = 1.0
  prompts = jax.random.randint(jax.random.key(1), (B, Pn), 3, cfg.vocab_size, jnp.int32)
  lengths = jnp.full((B,), Pn, jnp.int32)

  def run(new: int):
    return lambda: sample(cfg, params, prompts, lengths, max_new_tokens=new,
                          rng=jax.random.key(2), temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, eos_id=None, pad_id=0, mesh=mesh).tokens

  first, total_s = _timed(run(N), args.repeats)
  # Prefill plus one token, to split the decode loop's rate from the prompt pass.
  _, prefill_s = _timed(run(1), args.repeats)
  dtype_bytes = jnp.dtype(cfg.dtype).itemsize
  per_token = cache_bytes_per_token(cfg, dtype_bytes)
  out = {
      "batch": B, "prompt": Pn, "new": N,
      "compile_s": round(first - total_s, 3),
      "rollout_s": round(total_s, 4),
      "prefill_s": round(prefill_s, 4),
      "new_tokens_per_s": round(B * N / total_s, 1),
      "decode_tokens_per_s": round(B * (N - 1) / max(total_s - prefill_s, 1e-9), 1),
      "cache_dtype": cfg.dtype,
      "cache_bytes_per_token": per_token["cache"],
      "naive_cache_bytes_per_token": per_token["naive"],
      "cache_ratio": round(per_token["ratio"], 2),
      "cache_bytes": B * (Pn + N) * per_token["cache"],
      "temperature": args.temperature,
  }
  if args.compare_hf:
    out.update(bench_compare.compare(
        args, cfg, params, "generate", prompts, bench_compare.forward_logits(cfg)(params, prompts),
        total_s, ours_tokens=run(N)(), repeats=args.repeats, new=N,
        retime=lambda: _timed(run(N), args.repeats)[1]))
  return out


# ----------------------------------------------------------------------------
# grpo: whole GRPO iterations, split into rollout, rewards, log-probs and update

PHASES = {"rollout": "time/rollout_s", "rewards": "time/reward_s",
          "logprobs": "time/logprob_s", "update": "time/train_s"}


def _grpo_flags(p: argparse.ArgumentParser) -> None:
  p.set_defaults(config="peer")
  p.add_argument("--prompts", type=int, default=8, help="prompts per step Q")
  p.add_argument("--group", type=int, default=8, help="completions per prompt G")
  p.add_argument("--prompt", type=int, default=32, help="prompt tokens P (all prompts full)")
  p.add_argument("--new", type=int, default=128, help="new tokens N (no EOS: all N are made)")
  p.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0 keeps a reference)")
  p.add_argument("--lr", type=float, default=1e-6)
  p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
  bench_compare.peer_flags(p, "--compare-trl")


def grpo_examples(vocab_size: int, n_prompts: int, prompt_len: int, seed: int = 0) -> list:
  """Fixed prompts (ids 3..V-1, so no pad/BOS/EOS id), the same on both sides."""
  rng = np.random.default_rng(seed)
  return rng.integers(3, vocab_size, (n_prompts, prompt_len)).tolist()


def phase_split(metrics: dict, step_s: float) -> dict:
  """One step's seconds by phase; `other` (advantages, bookkeeping) makes them add up."""
  split = {name: float(metrics[key]) for name, key in PHASES.items()}
  split["other"] = step_s - sum(split.values())
  return {"step_s": step_s, **split}


def _round(split: dict) -> dict:
  return {k: round(v, 4) for k, v in split.items()}


def _grpo(args: argparse.Namespace, cfg: ModelConfig) -> dict:
  from r1jax.rl.step import GRPOConfig, GRPOStep, reward_from_fn
  from r1jax.tools.bench_peers import low_id_reward, token_text
  from r1jax.train.optim import OptimConfig
  if args.steps < 1:
    raise ValueError(f"--steps={args.steps} must be >= 1 (steps timed after the first)")
  Q, G, Pn, N = args.prompts, args.group, args.prompt, args.new
  gcfg = GRPOConfig(group_size=G, prompts_per_step=Q, max_prompt_len=Pn, max_new_tokens=N,
                    temperature=1.0, num_iterations=1, n_minibatches=1, beta=args.beta,
                    ref_reset_every=0)
  ocfg = OptimConfig(learning_rate=args.lr, warmup_steps=0, total_steps=1000, weight_decay=0.0)
  V = cfg.vocab_size
  reward = reward_from_fn(lambda text, ex: low_id_reward(text, V), "low_ids")
  mesh = make_mesh(tuple(int(s) for s in args.mesh.split(","))) if args.mesh else None
  grpo_step = GRPOStep(cfg, gcfg, ocfg, reward, decode=token_text, eos_id=None, pad_id=0,
                       mesh=mesh)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  prompts = grpo_examples(V, Q * (args.steps + 1), Pn)
  examples = iter([{"prompt_ids": p} for p in prompts])
  state = grpo_step.init_state(params)
  steps = []
  for _ in range(args.steps + 1):
    t0 = time.perf_counter()
    state, m = grpo_step(state, examples, jax.random.key(1))
    jax.block_until_ready(state.params)
    steps.append(phase_split(m, time.perf_counter() - t0))
  timed = sorted(steps[1:], key=lambda s: s["step_s"])
  median = timed[len(timed) // 2]  # a real step (its split adds up), the upper median
  out = {"prompts": Q, "group": G, "prompt": Pn, "new": N, "beta": args.beta,
         "completions_per_step": Q * G, "updates_per_step": gcfg.updates_per_step,
         "first_step": _round(steps[0]), "median_step": _round(median),
         "step_s": round(median["step_s"], 4), "all_step_s": [round(s["step_s"], 4)
                                                              for s in steps]}
  if args.compare_trl:
    out.update(_compare_trl(args, cfg, params, prompts, median["step_s"]))
  return out


def _compare_trl(args: argparse.Namespace, cfg: ModelConfig, params, prompts: list,
                 ours_s: float) -> dict:
  """TRL's GRPOTrainer on our initial weights, the same prompts, settings and reward."""
  tokens = np.asarray(prompts[:args.prompts], np.int32)
  logits = bench_compare.forward_logits(cfg)(params, tokens)
  return bench_compare.compare(args, cfg, params, "grpo", tokens, logits, ours_s, impl="trl",
                               prompts=prompts, group=args.group, prompts_per_step=args.prompts,
                               prompt_len=args.prompt, new=args.new, beta=args.beta, lr=args.lr,
                               steps=args.steps + 1, vocab_size=cfg.vocab_size)


# ----------------------------------------------------------------------------
# moe: one MoE layer's forward + backward as the expert count grows at fixed top-k

def _moe_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch 8 × tokens/8)")
  p.add_argument("--top_k", type=int, default=4)
  p.add_argument("--experts", default="8,16,32,64", help="routed expert counts to sweep")
  p.add_argument("--impls", default="ragged_dot,blocked,sorted", help="grouped matmuls to compare")
  p.add_argument("--block", type=int, default=128, help="gmm_block_size (upper bound)")
  p.add_argument("--repeats", type=int, default=3)


def _moe(args: argparse.Namespace, cfg: ModelConfig) -> dict:
  """d_model and moe_d_ff from --config; router groups fixed at 4 (2 kept)."""
  B = 8
  T = args.tokens // B
  mesh = make_mesh(tuple(int(s) for s in args.mesh.split(","))) if args.mesh else None
  rows = []
  for E in (int(e) for e in args.experts.split(",")):
    for impl in args.impls.split(","):
      c = cfg.replace(n_routed_experts=E, n_activated_experts=args.top_k, n_expert_groups=4,
                      n_limited_groups=2, grouped_matmul=impl, gmm_block_size=args.block)
      x = jax.random.normal(jax.random.key(0), (B, T, c.d_model), jnp.dtype(c.dtype))
      valid = jnp.ones((B, T), bool)
      layer = MoE(c)
      params = jax.jit(lambda k: layer.init(k, x, valid)["params"])(jax.random.key(1))

      @jax.jit
      def fwd_bwd(p, x):
        return jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x, valid)[0]),
                        argnums=(0, 1))(p, x)

      with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        first, sec = _timed(lambda: fwd_bwd(params, x), args.repeats)
      # Useful work: K experts per token, 3 matmuls, ×3 for forward + backward.
      flops = 2 * 3 * 3 * args.tokens * args.top_k * c.d_model * c.moe_d_ff
      rows.append({"experts": E, "impl": impl, "fwd_bwd_s": round(sec, 4),
                   "compile_s": round(first - sec, 2),
                   "routed_gflops_per_s": round(flops / sec / 1e9, 2)})
  by = {(r["experts"], r["impl"]): r["fwd_bwd_s"] for r in rows}
  # Each path's speedup over ragged_dot (XLA:CPU runs it as G full matmuls).
  speedup = {f"{impl}/{E}": round(by[(E, "ragged_dot")] / s, 2)
             for (E, impl), s in by.items() if impl != "ragged_dot" and (E, "ragged_dot") in by}
  return {"tokens": args.tokens, "top_k": args.top_k, "d_model": cfg.d_model,
          "moe_d_ff": cfg.moe_d_ff, "block": args.block, "results": rows,
          "speedup_vs_ragged_dot": speedup}


# ----------------------------------------------------------------------------
# Command table and entry point.

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace, ModelConfig], dict]]] = {
    "train": (_train_flags, _train),
    "forward": (_forward_flags, _forward),
    "rollout": (_rollout_flags, _rollout),
    "generate": (_rollout_flags, _rollout),
    "grpo": (_grpo_flags, _grpo),
    "moe": (_moe_flags, _moe),
    "roof": (_roof_flags, _roof),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m r1jax.tools.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (add_flags, _) in COMMANDS.items():
    p = sub.add_parser(name)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--dtype", default=None, help="compute/cache dtype override, e.g. bfloat16")
    p.add_argument("--mesh", default="", help="data,fsdp,expert,tensor sizes, e.g. 8,1,1,1")
    add_flags(p)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse(argv)
  cfg = CONFIGS[args.config]()
  if args.dtype:
    cfg = cfg.replace(dtype=args.dtype)
  if getattr(args, "compare_hf", False) or getattr(args, "compare_trl", False):
    cfg = cfg.replace(mtp_depth=0)  # the peers have no MTP: both sides run without it
    args.peer_python = bench_compare.check_compare(args)
  result = COMMANDS[args.command][1](args, cfg)
  counts = param_counts(cfg)
  line = {"command": args.command, "config": args.config, "backend": jax.default_backend(),
          "jax": jax.__version__,
          "devices": jax.device_count(), "params": counts["total"],
          "activated_params": counts["activated"], "mtp_depth": cfg.mtp_depth, **result}
  print(json.dumps(line))
  return line


if __name__ == "__main__":
  import r1jax
  r1jax.reexec_with_hugepages()
  main()
