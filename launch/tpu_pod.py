"""Runs an experiment on every worker of a Cloud TPU VM pod slice.

  python launch/tpu_pod.py --tpu=my-v5p-256 --zone=us-east5-a --project=my-proj \
      --config=experiments/sft_tiny.py --workdir=gs://my-bucket/runs/sft_tiny [--dry_run] \
      [-- --extra=main_flags]

Three steps, each one `gcloud` command over all workers (--worker=all):
  1. copy: this checkout as a tarball (no .git, caches or build outputs) to every worker;
  2. install: unpack into ~/r1jax and `pip install -e .` plus jax's TPU wheel;
  3. run: the same `python3 -m r1jax.main --config=... --workdir=...` everywhere, with
     R1JAX_DISTRIBUTED=auto, so `jax.distributed.initialize()` finds the pod itself
     (r1jax/parallel/distributed.py).
--dry_run prints the commands, one per line, and runs nothing; --skip_setup runs only
step 3 (code already installed). The workdir must be a gs:// bucket: every worker
writes its shards of the checkpoint there.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/r1jax"  # on each worker; `~` expands in the worker's shell
REMOTE_TARBALL = "/tmp/r1jax.tar.gz"
EXCLUDES = (".git", "__pycache__", "*.egg-info", ".pytest_cache", ".venv", "build", "dist")


def _gcloud(verb: str, tpu_args: list[str], args: argparse.Namespace) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *tpu_args, "--worker=all",
         f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd


def commands(args: argparse.Namespace, extra: list[str]) -> list[list[str]]:
  """The commands to run, in order."""
  local_tarball = os.path.join(args.tmpdir, f"r1jax-{args.tpu}.tar.gz")
  run = " ".join([
      f"cd {REMOTE_DIR} &&", "R1JAX_DISTRIBUTED=auto", "python3", "-m", "r1jax.main",
      shlex.quote(f"--config={args.config}"), shlex.quote(f"--workdir={args.workdir}"),
      *(shlex.quote(a) for a in extra)])
  out = []
  if not args.skip_setup:
    tar = ["tar", "-czf", local_tarball, *(f"--exclude={e}" for e in EXCLUDES), "-C", ROOT, "."]
    install = (f"mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR} && "
               f"cd {REMOTE_DIR} && python3 -m pip install -q -e . {shlex.quote(args.jax_tpu)}")
    out += [tar,
            _gcloud("scp", [local_tarball, f"{args.tpu}:{REMOTE_TARBALL}"], args),
            _gcloud("ssh", [args.tpu], args) + [f"--command={install}"]]
  out.append(_gcloud("ssh", [args.tpu], args) + [f"--command={run}"])
  return out


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  """Errors that would otherwise surface only on the pod, minutes later."""
  if not args.workdir.startswith("gs://"):
    parser.error(f"--workdir={args.workdir!r}: give a gs:// path; each worker writes its "
                 "checkpoint shards there, so it must be storage they all reach")
  path = args.config.partition(":")[0]
  if os.path.isabs(path) or not os.path.exists(os.path.join(ROOT, path)):
    parser.error(f"--config={args.config!r}: give a path inside this checkout relative to "
                 f"{ROOT} (the workers run from their copy of it)")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", help="GCP project (default: gcloud's configured one)")
  parser.add_argument("--config", required=True, help="experiment file, relative to the repo")
  parser.add_argument("--workdir", required=True, help="gs://bucket/path")
  parser.add_argument("--jax_tpu", default="jax[tpu]", help="pip requirement for jax on TPU")
  parser.add_argument("--skip_setup", action="store_true", help="only run (already installed)")
  parser.add_argument("--tmpdir", default="/tmp", help="where the local tarball is written")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags for r1jax.main")
  args = parser.parse_args(argv)
  extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
  _check(args, parser)
  cmds = commands(args, extra)
  if args.dry_run:
    for cmd in cmds:
      print(shlex.join(cmd))
    return 0
  for cmd in cmds:
    print(f"+ {shlex.join(cmd)}", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc:
      print(f"tpu_pod: command failed with exit status {rc}", file=sys.stderr)
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
