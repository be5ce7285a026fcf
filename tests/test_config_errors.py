"""A mistake on the command line is one line on stderr naming the file or key, not a traceback.

Each run fails while parsing flags, before JAX compiles anything.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=experiments/r1_zero/tiny.py"


def _main(*args: str, workdir: str) -> tuple[int, list[str]]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "r1jax.main", *args, f"--workdir={workdir}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert "Traceback" not in out.stderr, out.stderr
  return out.returncode, [line for line in out.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("args, expected", [
    (("--config=experiments/does_not_exist.py",), "experiments/does_not_exist.py"),
    # With an override, ml_collections reports the missing file from a different place.
    (("--config=experiments/does_not_exist.py", "--config.seed=1"),
     "experiments/does_not_exist.py"),
    ((TINY, "--config.no_such_key=1"), "--config.no_such_key: no such config key"),
    ((TINY, "--config.stages.grpo.grpo.beta=abc"), "--config.stages.grpo.grpo.beta=abc"),
    # GRPO's units: steps counts rollouts, the schedule and the reference reset count
    # updates (n_minibatches = 2 per rollout in the tiny config).
    ((TINY, "--config.stages.grpo.optim.total_steps=30"),
     "stages.grpo: optim.total_steps=30 must equal steps × updates per rollout = 30 × 2"),
    ((TINY, "--config.stages.grpo.grpo.ref_reset_every=5"), "ref_reset_every=5 counts updates"),
    ((TINY, "--config.stages.grpo.grpo.rollout_slice=4"),
     "grpo.rollout_slice=4 is not a multiple of the 8 data-parallel devices"),
    ((TINY, "--config.stages.pretrain.mixed_language_rate=1.5"),
     "mixed_language_rate=1.5 is not a fraction in [0, 1]"),
    (("--config=experiments/r1_zero/countdown_tiny.py",
      "--config.stages.pretrain.mixed_language_rate=0.5"),
     "only the arithmetic task's worked solutions can drift between languages, and "
     "data.task='countdown'"),
])
def test_a_config_mistake_is_one_line(tmp_path, args, expected):
  rc, lines = _main(*args, workdir=str(tmp_path))
  assert rc != 0
  assert len(lines) == 1 and expected in lines[0], lines
  assert not os.listdir(tmp_path)  # nothing ran


def test_an_unknown_key_names_the_closest_known_ones(tmp_path):
  rc, lines = _main(TINY, "--config.stages.grpo.grpo.betta=0.1", workdir=str(tmp_path))
  assert rc != 0
  assert len(lines) == 1, lines
  assert "--config.stages.grpo.grpo.betta" in lines[0]
  assert "stages.grpo.grpo.beta" in lines[0].split("closest:")[1]
