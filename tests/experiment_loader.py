"""Loads an experiment file's get_config(arg) the way --config=path:arg does."""

import os

from r1jax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(relpath: str, arg: str | None = None):
  module = configs.experiment(os.path.join(ROOT, relpath))
  return module.get_config(arg) if arg is not None else module.get_config()
