"""Multi-process start-up through JAX's own runtime (`jax.distributed`).

Three ways a process learns it is one of many:
  - launch/local.py sets R1JAX_COORDINATOR, R1JAX_NUM_PROCESSES, R1JAX_PROCESS_ID
    (several CPU processes on one machine; collectives over gloo);
  - launch/tpu_pod.py and launch/slurm.sbatch set R1JAX_DISTRIBUTED=auto and
    `jax.distributed.initialize()` detects the TPU pod or SLURM job itself;
  - neither: a single process, nothing to do.
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "R1JAX_COORDINATOR"
ENV_NUM_PROCESSES = "R1JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "R1JAX_PROCESS_ID"
ENV_AUTO = "R1JAX_DISTRIBUTED"

_initialized = False


class LaunchError(RuntimeError):
  """The processes started do not match what the launcher asked for."""


def maybe_initialize() -> bool:
  """Initialises jax.distributed when the environment asks; returns whether it did."""
  global _initialized
  if _initialized:
    return True
  if os.environ.get(ENV_NUM_PROCESSES):
    missing = [k for k in (ENV_COORDINATOR, ENV_PROCESS_ID) if not os.environ.get(k)]
    if missing:
      raise LaunchError(f"{ENV_NUM_PROCESSES} is set but {missing} are not; start processes "
                        "with launch/local.py")
    n, i = int(os.environ[ENV_NUM_PROCESSES]), int(os.environ[ENV_PROCESS_ID])
    if not 0 <= i < n:
      raise LaunchError(f"{ENV_PROCESS_ID}={i} is outside 0..{n - 1} ({ENV_NUM_PROCESSES}={n})")
    if os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ[ENV_COORDINATOR],
                               num_processes=n, process_id=i)
    _initialized = True
    _check_count(n, ENV_NUM_PROCESSES)
  elif os.environ.get(ENV_AUTO) == "auto":
    jax.distributed.initialize()
    _initialized = True
    if os.environ.get("SLURM_NTASKS"):
      _check_count(int(os.environ["SLURM_NTASKS"]), "SLURM_NTASKS")
  return _initialized


def _check_count(expected: int, source: str) -> None:
  if jax.process_count() != expected:
    raise LaunchError(f"{source}={expected} processes were launched but JAX joined "
                      f"{jax.process_count()}; start every process with the same launcher "
                      "settings")
