"""Entry point: python -m r1jax.main --config=experiments/<file>.py[:arg] --workdir=DIR."""

from absl import app, flags, logging
from ml_collections import config_flags

from r1jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
flags.mark_flags_as_required(["config", "workdir"])

JOBS = {"sft": trainer.train_sft}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  c = _CONFIG.value
  if c.job not in JOBS:
    raise app.UsageError(f"config.job={c.job!r} is not one of {sorted(JOBS)}")
  JOBS[c.job](c, _WORKDIR.value)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
