"""Our side of `bench --compare-hf` / `--compare-trl`: the flags, the settings
check that runs before any timing, and the comparison itself (our weights
written by `hf.save`, the peer run through bench_peers.py, logits checked for
parity before the speedup counts).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Callable

import jax
import numpy as np

from r1jax.model import ModelConfig, Transformer


def peer_flags(p: argparse.ArgumentParser, flag: str = "--compare-hf") -> None:
  dest = flag[2:].replace("-", "_")
  what = "TRL's GRPOTrainer" if dest == "compare_trl" else "transformers' DeepSeek-V3"
  p.add_argument(flag, dest=dest, action="store_true",
                 help=f"also run {what} on the same model and work (torch, CPU)")
  p.add_argument("--peer_python", default=None,
                 help="interpreter of the torch venv (default: this one, if it has torch)")
  p.add_argument("--parity_atol", type=float, default=1e-3,
                 help="largest |logits ours - peer| that counts as the same work")
  p.add_argument("--peer_threads", type=int, default=0, help="torch threads (0: torch's default)")


def compare(args: argparse.Namespace, cfg: ModelConfig, params, job: str, tokens,
             ours_logits, ours_s: float, ours_tokens=None, impl: str = "transformers",
             retime: Callable[[], float] | None = None, **spec) -> dict:
  """Runs the peer `job` on our weights and inputs; parity first, then the timings.
  `impl` names the peer in the output (transformers, or TRL for grpo).

  `retime` times our side again after the peer: the speedup then uses the mean
  of our times before and after, so a drift in the VM's speed during the run
  (±15% over minutes here) falls on both sides."""
  from r1jax.interop import hf
  from r1jax.tools import bench_peers
  python = args.peer_python  # checked by check_compare
  with tempfile.TemporaryDirectory(prefix=f"r1jax-bench-{job}-") as d:
    # One process, no mesh (check_compare refuses --mesh): every array here is local.
    hf.save(os.path.join(d, "ckpt"), cfg, jax.device_get(params), dtype="float32")
    np.save(os.path.join(d, "tokens_in.npy"), np.asarray(tokens, np.int32))
    peer = bench_peers.run_peer(python, d, dict(job=job, threads=args.peer_threads, **spec))
    check = bench_peers.parity(ours_logits, np.load(os.path.join(d, "logits.npy")),
                               args.parity_atol)
    if ours_tokens is not None:
      check.update(bench_peers.token_agreement(ours_tokens, np.load(os.path.join(d,
                                                                                 "tokens.npy"))))
  if not check["ok"]:
    raise RuntimeError(f"{job}: the peer's logits differ from ours by {check['max_abs_diff']:.3g}"
                       f" > --parity_atol={args.parity_atol}; the two sides are not doing the "
                       "same work, so no timing is reported")
  out = {"peer": {"impl": impl, **peer}, "parity": check}
  if retime is not None:
    after = retime()
    out["ours_before_after_s"] = [round(ours_s, 4), round(after, 4)]
    ours_s = (ours_s + after) / 2
  return {**out, "speedup": bench_peers.speedup(ours_s, peer["step_s"])}


def forward_logits(cfg: ModelConfig):
  """Our logits for the parity check (the peers have no MTP, nor do we here)."""
  return jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))


PEER_JOBS = {"forward": "forward", "train": "train", "rollout": "generate",
             "generate": "generate", "grpo": "grpo"}


def check_compare(args: argparse.Namespace) -> str:
  """Checks a --compare run's settings and finds the peer interpreter, before any timing."""
  from r1jax.tools import bench_peers
  if args.command in ("rollout", "generate"):
    if args.temperature is None:
      args.temperature = 0.0
    if (args.temperature, args.top_p, args.top_k) != (0.0, 1.0, 0):
      raise ValueError("--compare-hf times greedy decoding on both sides: drop --temperature, "
                       "--top_p and --top_k (or set --temperature=0)")
  if args.mesh:
    raise ValueError("--mesh: the peers run on one CPU process; compare without --mesh")
  return bench_peers.resolve_peer_python(args.peer_python, PEER_JOBS[args.command])
