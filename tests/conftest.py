"""Test-wide setup: 8 virtual CPU devices for the sharding tests, shared fixtures."""

import os

# Must happen before JAX is imported anywhere in the test session.
# The two compiler flags halve XLA:CPU compile time, which dominates a suite of
# tiny models; they change no result beyond float rounding.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from r1jax.model import ModelConfig, Transformer, init_params  # noqa: E402


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


@pytest.fixture(scope="session")
def zero_run(tmp_path_factory):
  """The main job's smoke run, once per session: (workdir, results). Read-only."""
  from r1jax.pipeline import runner
  from tests.experiment_loader import load_config
  workdir = str(tmp_path_factory.mktemp("r1_zero"))
  c = load_config("experiments/r1_zero/tiny.py", "smoke")
  return workdir, runner.run(c, workdir)
