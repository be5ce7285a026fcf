"""Entry point.

  python -m r1jax.main --config=experiments/<file>.py[:arg] --workdir=DIR \
      [--config.<key>=value ...] [--stages=a,b]

Parses flags, joins a multi-process job when the environment asks for one,
and hands the experiment to the pipeline runner. Nothing else lives here.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage writes its outputs.")
_STAGES = flags.DEFINE_list("stages", None, "Run only these stages (their inputs must be done).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  # Imported here: reward worker processes re-import this module and need none of it.
  from r1jax.parallel import distributed
  from r1jax.pipeline import runner
  from r1jax.pipeline.validate import ConfigError
  try:
    distributed.maybe_initialize()
  except distributed.LaunchError as e:
    raise app.UsageError(f"bad launch: {e}") from None
  try:
    runner.run(_CONFIG.value, _WORKDIR.value, only=_STAGES.value)
  except ConfigError as e:
    raise app.UsageError(f"bad config: {e}") from None


def run():
  app.run(main)


if __name__ == "__main__":
  run()
