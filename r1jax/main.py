"""Entry point.

  python -m r1jax.main --config=experiments/<file>.py[:arg] --workdir=DIR \
      [--config.<key>=value ...] [--stages=a,b]

Parses flags, joins a multi-process job when the environment asks for one,
and hands the experiment to the pipeline runner. Nothing else lives here.
A mistake the user can fix (missing file, unknown or mistyped key, bad launch,
bad config, a bad data line) ends the run with one line on stderr and exit status 2; a run
stopped by NaN/inf (refused updates, a refused checkpoint) with one line and 1.
"""

import difflib
import os
import re
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage writes its outputs.")
_STAGES = flags.DEFINE_list("stages", None, "Run only these stages (their inputs must be done).")
flags.mark_flags_as_required(["config", "workdir"])

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=\[]+)")


def _fail(message: str) -> NoReturn:
  """The user's mistake as one line (absl's usage dump would bury it)."""
  sys.stderr.write(f"error: {message}\n")
  sys.exit(2)


def _config_arg(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith(("--config=", "-config=")):
      return a.split("=", 1)[1]
    if a in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _dotted_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in c.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys += _dotted_keys(v, f"{prefix}{k}.")
  return keys


def _unknown_override(argv: list[str], arg: str) -> str | None:
  """'--config.<key>: ...' for the first override that names no key, with the nearest keys."""
  from r1jax import configs  # noqa: PLC0415 - only on this error path
  path, _, variant = arg.partition(":")
  try:
    c = configs.experiment(path).get_config(*([variant] if variant else []))
  except Exception:  # noqa: BLE001 - the error was the experiment's own; the caller says it
    return None
  known = _dotted_keys(c)
  for a in argv:
    m = _OVERRIDE.match(a)
    if m and m.group(1) not in known:
      key = m.group(1)
      close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
      if close:
        return f"--config.{key}: no such config key; closest: {', '.join(close)}"
      # Nothing alike: list the keys next to where it was aimed.
      parent, here = key, []
      while not here:
        parent = parent.rpartition(".")[0]
        here = [k for k in known if k.rpartition(".")[0] == parent]
      return f"--config.{key}: no such config key; keys at that level: {', '.join(here[:12])}"
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with each of its failure modes turned into one line."""
  arg = _config_arg(argv)
  # ml_collections defers a missing file's error to the first access (or to an override).
  if arg is not None and not os.path.isfile(arg.partition(":")[0]):
    _fail(f"--config: no experiment file {arg.partition(':')[0]!r} (paths are relative to "
          f"{os.getcwd()})")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections' lookup of an unknown override
    _fail((arg and _unknown_override(argv, arg)) or f"--config: {type(e).__name__}: {e}")
  except flags.Error as e:  # a mistyped value, a missing flag, an error in the experiment file
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A failing get_config() arrives with its traceback in the message; its last line says why.
    message = lines[-1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
    _fail(message.removeprefix("flag "))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  # Imported here: reward worker processes re-import this module and need none of it.
  from r1jax.data.tasks.jsonl import DataError
  from r1jax.parallel import distributed
  from r1jax.pipeline import runner
  from r1jax.pipeline.validate import ConfigError
  from r1jax.train.checkpoint import NonFiniteError
  try:
    distributed.maybe_initialize()
  except distributed.LaunchError as e:
    _fail(f"bad launch: {e}")
  try:
    runner.run(_CONFIG.value, _WORKDIR.value, only=_STAGES.value)
  except ConfigError as e:
    _fail(f"bad config: {e}")
  except (DataError, FileNotFoundError) as e:  # a bad line (file:line), a missing file
    _fail(f"bad data: {e}")
  except NonFiniteError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  import r1jax
  r1jax.reexec_with_hugepages()
  run()
