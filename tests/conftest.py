"""Test-wide setup: 8 virtual CPU devices for the sharding tests, shared fixtures."""

import os
import shutil
import tempfile

# Must happen before JAX is imported anywhere in the test session.
# Compile time dominates a suite of tiny models. The first two compiler flags
# halve it; the third (the classic loop emitters instead of the MLIR fusion
# emitters) halves it again: a tiny SFT step with 4 micro-batches compiles in
# 2.6 s instead of 5.5 s, runs as fast, and gives the same loss to the last digit.
# None of them changes a result beyond float rounding. (At full optimisation the
# fusion emitters win: the bench's train step is 8% slower without them.)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# glibc's huge-page tunable (r1jax/__init__.py) for the xdist workers and every
# subprocess a test starts: this process has started already, its children read it.
import r1jax  # noqa: E402  (sets only environment variables; JAX is not imported)
os.environ.update(r1jax.hugepage_env())
# One persistent compilation cache per test run, made by the first process to load
# this file (the xdist controller) and inherited by both workers: a program one
# worker compiled, or one compiled again after `jax.clear_caches()` below, is read
# back from disk instead. Removed when the run ends.
if "R1JAX_TEST_JAX_CACHE" not in os.environ:
  os.environ["R1JAX_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="r1jax-test-jax-cache-")
  _OWN_CACHE = True
else:
  _OWN_CACHE = False
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["R1JAX_TEST_JAX_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

from r1jax.model import ModelConfig, Transformer, init_params  # noqa: E402


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["R1JAX_TEST_JAX_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module. Each XLA:CPU executable
  holds memory mappings: one session of several hundred programs passes Linux's
  default vm.max_map_count (65,530; 41,600 maps were seen at 40% of the suite)
  and the next compilation segfaults."""
  yield
  jax.clear_caches()


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
  return ModelConfig.tiny()


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
  return jax.jit(init_params, static_argnums=0)(tiny_cfg, jax.random.key(0))


@pytest.fixture(scope="session")
def tiny_forward(tiny_cfg):
  """Jitted training-form forward of the tiny model: (params, tokens, pos, valid) -> (logits, aux)."""
  model = Transformer(tiny_cfg)
  return jax.jit(lambda p, tok, pos=None, valid=None: model.apply(
      {"params": p}, tok, pos, valid, return_aux=True))


# Smoke runs shared by the pipeline tests and the multi-host comparisons (which run
# the same experiment in 2 processes × 4 devices and compare with these 1 × 8 runs).
# R1 runs on a mesh whose expert axis spans all 8 devices (both processes there).
SMOKE_RUNS = {
    "r1_zero": ("experiments/r1_zero/tiny.py:smoke", {}),
    "r1": ("experiments/r1/tiny.py:smoke", {"mesh": [1, 1, 8, 1]}),
    "distill": ("experiments/distill/tiny.py:smoke", {}),
}


def _smoke_run(tmp_path_factory, name: str, reuse_from: tuple[str, ...] = ()):
  from r1jax.pipeline import runner
  from r1jax.tools import sweep
  from tests.multihost_jobs import load_job_config
  workdir = str(tmp_path_factory.mktemp(name))
  c = load_job_config(*SMOKE_RUNS[name])
  sweep.reuse_finished(c, workdir, [sweep.earlier_run(w) for w in reuse_from])
  return workdir, runner.run(c, workdir)


@pytest.fixture(scope="session")
def zero_run(tmp_path_factory):
  """The main job's smoke run, once per session: (workdir, results). Read-only."""
  return _smoke_run(tmp_path_factory, "r1_zero")


@pytest.fixture(scope="session")
def r1_run(tmp_path_factory):
  return _smoke_run(tmp_path_factory, "r1")


@pytest.fixture(scope="session")
def distill_run(tmp_path_factory, zero_run):
  """Its teacher is the main job's (the same pretrain and grpo settings): copied, not rerun."""
  return _smoke_run(tmp_path_factory, "distill", reuse_from=(zero_run[0],))


@pytest.fixture(scope="session")
def gcs_bucket():
  """`gs://<bucket>` on a local GCS emulator; os.environ sends every client there meanwhile."""
  pytest.importorskip("gcp_storage_emulator",
                      reason="gs:// tests need the dev extras: pip install -e '.[dev]'")
  from tests import gcs
  with gcs.emulator() as emulator:
    yield emulator.url
