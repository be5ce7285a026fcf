"""Procedural verifiable tasks by name, with train / held-out splits; dataset readers.

`TASKS` is the one table from a config's `data.task` to a generator. Each task
module has `sample(rng, **options) -> example` and `problem_key(example)`, a
string naming the problem regardless of the language it is posed in.

Held-out split: a problem is held out when the hash of its key falls in the
first `held_out_fraction` of the hash range. The split is a fixed partition of
the problem space, so no seed's training set ever contains a problem of any
seed's held-out set, and the English and Chinese forms of one problem always
land on the same side. Training examples are drawn with repetition (a sample
of the task's distribution); held-out problems are distinct.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import random
from typing import Callable

from r1jax.data.tasks import arithmetic, countdown, general
from r1jax.data.tasks.jsonl import DataError, read_code, read_math

HELD_OUT_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Task:
  sample: Callable[..., dict]  # (rng, **options) -> example
  key: Callable[[dict], str]  # the problem's identity, language-independent

  @property
  def options(self) -> tuple[str, ...]:
    """The keyword options `sample` takes (each also a `c.data` config key)."""
    params = inspect.signature(self.sample).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)


TASKS: dict[str, Task] = {
    "arithmetic": Task(arithmetic.sample, arithmetic.problem_key),
    "countdown": Task(countdown.sample, countdown.problem_key),
    # The non-reasoning slice (answered at once), mixed into R1's later stages.
    "general": Task(general.sample, general.problem_key),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
  return TASKS[name]


def _held_out(key: str, fraction: float) -> bool:
  h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
  return h < fraction * 2**64


def _draw(name: str, seed: int, split: str, n: int, fraction: float, options: dict) -> list[dict]:
  task = get(name)
  # One stream per split: the training set does not depend on n_eval, nor the reverse.
  rng = random.Random(f"{name}/{seed}/{split}")
  out, seen = [], set()
  budget = 100 * n + 1000
  for _ in range(budget):
    if len(out) == n:
      return out
    example = task.sample(rng, **options)
    key = task.key(example)
    if _held_out(key, fraction) != (split == "held_out"):
      continue
    if split == "held_out":
      if key in seen:
        continue
      seen.add(key)
    out.append(example)
  if len(out) == n:
    return out
  raise ValueError(f"task {name!r} gave only {len(out)} of {n} {split} problems in {budget} "
                   f"draws with options {options}: its problem space is too small; widen the "
                   "options or ask for fewer examples")


def make_splits(name: str, *, n_train: int, n_eval: int, seed: int,
                held_out_fraction: float = HELD_OUT_FRACTION,
                **options) -> tuple[list[dict], list[dict]]:
  """(train, held_out) examples of task `name`, deterministic in `seed`, disjoint by problem."""
  task = get(name)
  unknown = sorted(set(options) - set(task.options))
  if unknown:
    raise ValueError(f"task {name!r} got unknown options {unknown}; it takes {list(task.options)}")
  if not 0.0 < held_out_fraction < 1.0:
    raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
  if n_train < 0 or n_eval < 0:
    raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
  return (_draw(name, seed, "train", n_train, held_out_fraction, options),
          _draw(name, seed, "held_out", n_eval, held_out_fraction, options))


__all__ = ["DataError", "HELD_OUT_FRACTION", "TASKS", "Task", "get", "make_splits", "read_code",
           "read_math"]
