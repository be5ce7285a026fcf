"""Fills in launch/slurm.sbatch for one run and submits it with `sbatch`.

  python launch/slurm.py --nodes=4 --gpus_per_node=8 --config=experiments/r1_zero/tiny.py \
      --workdir=/shared/runs/r1_zero [--partition=P] [--account=A] [--time=24:00:00] \
      [--dry_run] [-- extra main flags]

The rendered script (one task per GPU, see slurm.sbatch for why) is written to
--script (default: <tmpdir>/r1jax-<job_name>.sbatch) and submitted with
`sbatch <script>`. --dry_run prints that command and then the rendered script,
and writes or submits nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "launch", "slurm.sbatch")


def render(template: str, args: argparse.Namespace, extra: list[str]) -> str:
  """The template with this run's #SBATCH values and settings filled in."""
  sbatch = {"job-name": args.job_name, "nodes": args.nodes, "gpus-per-node": args.gpus_per_node,
            "ntasks-per-node": args.gpus_per_node, "partition": args.partition,
            "account": args.account, "time": args.time}
  settings = {"CONFIG": shlex.quote(args.config), "WORKDIR": shlex.quote(args.workdir),
              "EXTRA_ARGS": f"({shlex.join(extra)})", "R1JAX_ROOT": shlex.quote(ROOT)}
  lines, seen = [], set()
  for line in template.splitlines():
    m = re.match(r"#SBATCH --([\w-]+)=", line)
    if m and m.group(1) in sbatch:
      seen.add(m.group(1))
      line = f"#SBATCH --{m.group(1)}={sbatch[m.group(1)]}"
    m = re.match(r"(\w+)=", line)
    if m and m.group(1) in settings:
      line = f"{m.group(1)}={settings[m.group(1)]}"
    lines.append(line)
  # Options the template leaves to the cluster's defaults go after its last #SBATCH line.
  last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
  added = [f"#SBATCH --{k}={v}" for k, v in sbatch.items() if k not in seen and v]
  return "\n".join(lines[:last + 1] + added + lines[last + 1:]) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--nodes", type=int, required=True)
  parser.add_argument("--gpus_per_node", type=int, required=True)
  parser.add_argument("--config", required=True, help="experiment file, relative to the repo")
  parser.add_argument("--workdir", required=True, help="a directory every node shares")
  parser.add_argument("--job_name", default="r1jax")
  parser.add_argument("--partition")
  parser.add_argument("--account")
  parser.add_argument("--time", help="wall-clock limit, e.g. 24:00:00")
  parser.add_argument("--script", help="where the rendered script goes")
  parser.add_argument("--dry_run", action="store_true", help="print, write and submit nothing")
  parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags for r1jax.main")
  args = parser.parse_args(argv)
  extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
  if args.nodes < 1 or args.gpus_per_node < 1:
    parser.error("--nodes and --gpus_per_node must be >= 1")
  if not os.path.exists(os.path.join(ROOT, args.config.partition(":")[0])):
    parser.error(f"--config={args.config!r}: no such experiment file under {ROOT}")
  script = args.script or os.path.join(tempfile.gettempdir(), f"r1jax-{args.job_name}.sbatch")
  with open(TEMPLATE) as f:
    text = render(f.read(), args, extra)
  cmd = ["sbatch", script]
  if args.dry_run:
    print(shlex.join(cmd))
    print(text, end="")
    return 0
  with open(script, "w") as f:
    f.write(text)
  print(f"+ {shlex.join(cmd)}", flush=True)
  return subprocess.run(cmd).returncode


if __name__ == "__main__":
  sys.exit(main())
