"""Starts N copies of a command on this machine as one multi-process JAX job.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      python -m r1jax.main --config=experiments/sft_tiny.py --workdir=/tmp/r1jax_mp

Each copy sees `devices_per_process` CPU devices and joins the others through a
coordinator on localhost (r1jax.parallel.distributed reads the variables set
here). Output lines are prefixed with the process id. If one process fails, the
others are stopped and the exit status is the first failure's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def _hugepage_env(base: dict) -> dict:
  """r1jax.hugepage_env when r1jax is importable here (children then start with
  glibc's huge-page tunable instead of restarting for it), else `base`."""
  try:
    from r1jax import hugepage_env
  except ImportError:
    return dict(base)
  return hugepage_env(base)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, *, port: int, n: int, i: int, devices: int) -> dict:
  env = _hugepage_env(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env.update({
      "R1JAX_COORDINATOR": f"127.0.0.1:{port}",
      "R1JAX_NUM_PROCESSES": str(n),
      "R1JAX_PROCESS_ID": str(i),
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
      "PYTHONUNBUFFERED": "1",
  })
  return env


def _pump(stream, prefix: str) -> None:
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"{prefix}{line}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--dry_run", action="store_true", help="print what would run")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  port = free_port()
  envs = [process_env(os.environ, port=port, n=args.num_processes, i=i,
                      devices=args.devices_per_process) for i in range(args.num_processes)]
  if args.dry_run:
    for env in envs:
      keys = ("R1JAX_COORDINATOR", "R1JAX_NUM_PROCESSES", "R1JAX_PROCESS_ID", "XLA_FLAGS")
      print(" ".join(f"{k}={shlex.quote(env[k])}" for k in keys), shlex.join(command))
    return 0
  procs = []
  for i, env in enumerate(envs):
    p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] "), daemon=True).start()
    procs.append(p)
  status = 0
  try:
    remaining = list(procs)
    while remaining:
      for p in list(remaining):
        try:
          rc = p.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
          continue
        remaining.remove(p)
        if rc and not status:
          status = rc
          _stop(remaining)  # one failed: the others would wait on it forever
          remaining = []
          break
  except KeyboardInterrupt:
    _stop([p for p in procs if p.poll() is None])
    status = 130
  return status


def _stop(procs: list, grace_s: float = 5.0) -> None:
  """SIGTERM, then SIGKILL after `grace_s`: jax.distributed takes SIGTERM as a
  preemption notice and keeps going until its peers' heartbeats time out."""
  for p in procs:
    _signal(p, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
      _signal(p, signal.SIGKILL)
      p.wait()


def _signal(p, sig) -> None:
  try:
    os.killpg(p.pid, sig)
  except ProcessLookupError:  # already gone
    pass


if __name__ == "__main__":
  sys.exit(main())
