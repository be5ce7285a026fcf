"""Every experiment file loads, is locked against unknown keys, and names a known job."""

import glob
import os

import pytest

from r1jax import configs
from r1jax.main import JOBS
from tests.experiment_loader import ROOT, load_config

FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"),
                                                           recursive=True)
               if not os.path.basename(p).startswith("_"))


@pytest.mark.parametrize("path", FILES)
def test_experiment_config_is_valid(path):
  for arg in (None, "smoke"):
    c = load_config(path, arg)
    assert c.job in JOBS
    configs.model_config(c)  # builds and validates the ModelConfig
    configs.optim_config(c)
    with pytest.raises(AttributeError):
      c.train.stepz = 3  # typos are errors, not silent new keys


def test_unknown_preset_and_field_are_errors():
  c = configs.base()
  with pytest.raises(ValueError, match="unknown model preset"):
    configs.with_model_preset(c, "tiny_typo")
  with pytest.raises(ValueError, match="n_layerz"):
    configs.with_model_preset(c, "tiny", n_layerz=3)
