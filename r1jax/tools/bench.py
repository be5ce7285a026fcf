"""Benchmarks that print one JSON line each.

  python -m r1jax.tools.bench train --config=medium --batch=8 --seq=256 [--compare-hf]
  python -m r1jax.tools.bench rollout --config=tiny --batch=8 --prompt=32 --new=128
  python -m r1jax.tools.bench moe --config=medium --tokens=2048 --top_k=4 --experts=8,16,32,64
  python -m r1jax.tools.bench roof --size=2048

`train` reports tokens/s and model FLOP utilisation (MFU) against the matmul
rate that `roof` measures, in the same process, dtype and device.
`--compare-hf` (train only) also times Hugging Face's DeepseekV3ForCausalLM
on the identical config with torch, when torch and transformers are
installed (they are never required), and prints the ratio.

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

from r1jax.model import ModelConfig, cache_bytes_per_token, init_params, logical_axes, param_counts
from r1jax.model.moe import MoE
from r1jax.parallel.mesh import batch_sharding, logical_sharding, make_mesh
from r1jax.rl.rollout import sample


def medium(**overrides) -> ModelConfig:
  """~70M parameters (~20M activated): big enough that matmuls, not dispatch, dominate."""
  fields = dict(
      vocab_size=8192, d_model=512, n_layers=8, n_dense_layers=1, n_heads=8, q_lora_rank=192,
      kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, d_ff=1536,
      moe_d_ff=256, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
      n_limited_groups=2, original_max_position=1024, max_seq_len=4096, mtp_depth=0)
  fields.update(overrides)
  return ModelConfig.tiny(**fields)


CONFIGS: dict[str, Callable[..., ModelConfig]] = {
    "tiny": ModelConfig.tiny,
    "medium": medium,
    "deepseek_v3_671b": ModelConfig.deepseek_v3_671b,  # figures only; too big to run here
}


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """(first call seconds, mean seconds of `repeats` later calls), results awaited."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return first, (time.perf_counter() - t0) / repeats


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
  _, mean = _timed(lambda: mm(a, b), repeats)
  return 2 * n ** 3 / mean


def _roof(args: argparse.Namespace, cfg: ModelConfig) -> dict:
  rate = matmul_flops_per_s(args.size, jnp.dtype(cfg.dtype), args.repeats)
  return {"size": args.size, "dtype": cfg.dtype, "matmul_tflops": round(rate / 1e12, 4)}


# ----------------------------------------------------------------------------
# train: one full training step (forward, backward, AdamW, bias update)

def _train_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--roof_size", type=int, default=2048, help="matmul size of the MFU roof")
  p.add_argument("--compare-hf", dest="compare_hf", action="store_true",
                 help="also time transformers' DeepSeek-V3 on the same config (torch)")


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

  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    first, mean = _timed(run, args.repeats)
  tokens_per_s = B * T / mean
  flops = train_flops_per_token(cfg, T)
  roof = matmul_flops_per_s(args.roof_size, jnp.dtype(cfg.dtype))
  out = {"batch": B, "seq": T, "step_s": round(mean, 4), "compile_s": round(first - mean, 2),
         "tokens_per_s": round(tokens_per_s, 1),
         "model_tflops_per_s": round(tokens_per_s * flops / 1e12, 4),
         "roof_tflops": round(roof / 1e12, 4),
         "mfu": round(tokens_per_s * flops / roof / (mesh.size if mesh is not None else 1), 4)}
  if args.compare_hf:
    out.update(_hf_train(cfg, B, T, args.repeats, tokens_per_s))
  return out


def _hf_train(cfg: ModelConfig, B: int, T: int, repeats: int, ours_tokens_per_s: float) -> dict:
  """The same step in transformers' DeepseekV3ForCausalLM (torch, AdamW), if installed."""
  try:
    import torch
    import transformers
  except ImportError:
    return {"hf": "skipped: torch and transformers are not installed (pip install torch "
                  "transformers)"}
  from r1jax.interop.hf import config_to_hf
  hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in config_to_hf(cfg).items()
                                             if k not in ("architectures", "model_type",
                                                          "torch_dtype")})
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
  model = transformers.DeepseekV3ForCausalLM(hf_cfg).to(dtype)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  ids = torch.randint(3, cfg.vocab_size, (B, T))

  def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  step()
  t0 = time.perf_counter()
  for _ in range(repeats):
    step()
  hf_s = (time.perf_counter() - t0) / repeats
  return {"hf_step_s": round(hf_s, 4), "hf_tokens_per_s": round(B * T / hf_s, 1),
          "hf_threads": torch.get_num_threads(), "transformers": transformers.__version__,
          "speedup_vs_hf": round(ours_tokens_per_s / (B * T / hf_s), 2)}


# ----------------------------------------------------------------------------
# rollout

def _rollout_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt", type=int, default=32, help="prompt slots P (all rows full)")
  p.add_argument("--new", type=int, default=128, help="new tokens N (EOS off: all N are made)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--repeats", type=int, default=3)


def _rollout(args: argparse.Namespace, cfg: ModelConfig) -> dict:
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  mesh = None
  if args.mesh:
    mesh = make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    params = jax.device_put(params, logical_sharding(mesh, logical_axes(cfg)))
  B, Pn, N = args.batch, args.prompt, args.new
  prompts = jax.random.randint(jax.random.key(1), (B, Pn), 1, cfg.vocab_size, jnp.int32)
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
  return {
      "batch": B, "prompt": Pn, "new": N,
      "compile_s": round(first - total_s, 3),
      "rollout_s": round(total_s, 4),
      "prefill_s": round(prefill_s, 4),
      "new_tokens_per_s": round(B * N / total_s, 1),
      "decode_tokens_per_s": round(B * (N - 1) / max(total_s - prefill_s, 1e-9), 1),
      "cache_dtype": cfg.dtype,
      "cache_bytes_per_token": per_token["latent"],
      "naive_cache_bytes_per_token": per_token["naive"],
      "cache_ratio": round(per_token["ratio"], 2),
      "cache_bytes": B * (Pn + N) * per_token["latent"],
  }


# ----------------------------------------------------------------------------
# moe: one MoE layer's forward + backward as the expert count grows at fixed top-k

def _moe_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch 8 × tokens/8)")
  p.add_argument("--top_k", type=int, default=4)
  p.add_argument("--experts", default="8,16,32,64", help="routed expert counts to sweep")
  p.add_argument("--impls", default="ragged_dot,blocked", help="grouped matmuls to compare")
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
        first, mean = _timed(lambda: fwd_bwd(params, x), args.repeats)
      # Useful work: K experts per token, 3 matmuls, ×3 for forward + backward.
      flops = 2 * 3 * 3 * args.tokens * args.top_k * c.d_model * c.moe_d_ff
      rows.append({"experts": E, "impl": impl, "fwd_bwd_s": round(mean, 4),
                   "compile_s": round(first - mean, 2),
                   "routed_gflops_per_s": round(flops / mean / 1e9, 2)})
  by = {(r["experts"], r["impl"]): r["fwd_bwd_s"] for r in rows}
  speedup = {str(E): round(by[(E, "ragged_dot")] / by[(E, "blocked")], 2)
             for (E, impl) in by if impl == "blocked" and (E, "ragged_dot") in by}
  return {"tokens": args.tokens, "top_k": args.top_k, "d_model": cfg.d_model,
          "moe_d_ff": cfg.moe_d_ff, "block": args.block, "results": rows,
          "blocked_speedup": speedup}


# ----------------------------------------------------------------------------
# Command table and entry point.

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace, ModelConfig], dict]]] = {
    "train": (_train_flags, _train),
    "rollout": (_rollout_flags, _rollout),
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
  result = COMMANDS[args.command][1](args, cfg)
  counts = param_counts(cfg)
  line = {"command": args.command, "config": args.config, "backend": jax.default_backend(),
          "devices": jax.device_count(), "params": counts["total"],
          "activated_params": counts["activated"], **result}
  print(json.dumps(line))
  return line


if __name__ == "__main__":
  main()
