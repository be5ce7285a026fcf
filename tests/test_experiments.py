"""Every experiment file builds, validates, and is locked against unknown keys."""

import glob
import os

import pytest

from r1jax import configs
from r1jax.pipeline import validate
from tests.experiment_loader import ROOT, load_config

FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"),
                                                           recursive=True)
               if not os.path.basename(p).startswith("_"))


@pytest.mark.parametrize("path", FILES)
def test_experiment_config_is_valid(path):
  for arg in (None, "smoke"):
    c = load_config(path, arg)
    validate.validate(c, n_devices=configs.mesh_devices(c))
    configs.model_config(c)
    with pytest.raises(AttributeError):
      c.stages.stepz = 3  # typos are errors, not silent new keys


def test_config_errors_are_one_line_and_name_the_key():
  c = load_config("experiments/r1_zero/tiny.py")
  with c.unlocked():
    c.stages.grpo.init = "stage:nowhere"
  with pytest.raises(validate.ConfigError, match=r"^stages\.grpo\.init: 'nowhere' is not an "
                                                 r"earlier stage") as e:
    validate.validate(c)
  assert "\n" not in str(e.value)
  c = load_config("experiments/r1_zero/tiny.py")
  with c.unlocked():
    c.model.n_activated_experts = 99
  with pytest.raises(validate.ConfigError, match=r"^model: .*n_activated_experts"):
    validate.validate(c)
  c = load_config("experiments/r1_zero/tiny.py")
  with c.unlocked():
    c.stages.grpo.grpo.aggregation = "token-meen"
  with pytest.raises(validate.ConfigError, match=r"^stages\.grpo: .*token-meen"):
    validate.validate(c)
  c = load_config("experiments/r1_zero/tiny.py")
  with c.unlocked():
    c.stages.grpo.rewards = (("acuracy", 1.0),)
  with pytest.raises(validate.ConfigError, match=r"^stages\.grpo: .*acuracy"):
    validate.validate(c)
  c = load_config("experiments/r1_zero/tiny.py")
  with c.unlocked():
    c.mesh = (3, 1, 1, 1)
  with pytest.raises(validate.ConfigError, match=r"^mesh: mesh shape \(3, 1, 1, 1\) uses 3 "
                                                 r"devices, but 8 are present") as e:
    validate.validate(c)
  assert "\n" not in str(e.value)
  c = load_config("experiments/r1_zero/tiny.py")
  with c.unlocked():
    c.stages.pretrain.batch_size = 12
  with pytest.raises(validate.ConfigError, match=r"^stages\.pretrain: batch_size=12"):
    validate.validate(c, n_devices=8)


def test_unknown_preset_and_field_are_errors():
  c = configs.base()
  with pytest.raises(ValueError, match="unknown model preset"):
    configs.with_model_preset(c, "tiny_typo")
  with pytest.raises(ValueError, match="n_layerz"):
    configs.with_model_preset(c, "tiny", n_layerz=3)
  with pytest.raises(ValueError, match="stepz"):
    configs.sft_stage(stepz=3)
