"""r1jax: DeepSeek-R1 end to end in JAX/Flax.

Importing r1jax before JAX opens its CPU backend switches off XLA:CPU's YNNPACK
library fusions (`--xla_cpu_experimental_ynn_fusion_type=` appended to
XLA_FLAGS, unless XLA_FLAGS already sets that flag). Those fusions pulled the
attention softmax, reductions included, into the operand of the next matmul
and ran it there: on `bench.peer` (r1jax/tools/bench.py), compiled both ways in
one process and timed alternately, the forward took 0.35 s with them and 0.20 s
without, the train step 0.81 s and 0.71 s (best of 10). Only CPU compiles read
the flag; results change by float rounding only.

`hugepage_env` / `reexec_with_hugepages`: XLA:CPU allocates each run's
temporaries afresh, glibc serves them by mmap, and every first touch of a 4 KiB
page faults. The `bench.peer` train step took 85,000 page faults and 0.19 s of
kernel time per step; with glibc's `glibc.malloc.hugetlb=1` tunable (large
allocations madvised to transparent huge pages) 600 faults, and the step went
0.545 -> 0.453 s (three interleaved runs each). glibc reads the tunable only at
process start, so the command-line entry points restart themselves once with
it, and launchers put it in their children's environment; a library import
changes nothing.
"""

import os
import platform
import sys

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _set_cpu_flags() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}=".strip()


_set_cpu_flags()

_HUGETLB = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_usable() -> bool:
  """Linux with glibc, and transparent huge pages not switched off."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    with open(_THP) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def hugepage_env(env: dict | None = None) -> dict:
  """A copy of `env` (default os.environ) whose GLIBC_TUNABLES asks glibc's malloc
  for transparent huge pages; unchanged where they are unusable, where the
  tunable is already set, or when R1JAX_HUGEPAGES=0."""
  env = dict(os.environ if env is None else env)
  tunables = env.get("GLIBC_TUNABLES", "")
  if env.get("R1JAX_HUGEPAGES") == "0" or "glibc.malloc.hugetlb" in tunables or not _thp_usable():
    return env
  env["GLIBC_TUNABLES"] = f"{tunables}:{_HUGETLB}" if tunables else _HUGETLB
  return env


def reexec_with_hugepages() -> None:
  """Restarts this interpreter with the same command line under `hugepage_env`,
  unless that changes nothing. Command-line entry points call it first thing."""
  env = hugepage_env()
  if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
    return
  argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)
