"""Which problems an evaluation asks: the run's held-out split or math JSONL files.

A stage names its benchmarks as `(name, source)` or `(name, source, layout)`:
source "task:held_out" is the run's held-out split (`ctx.eval_examples`),
"task:general" the held-out requests of its non-reasoning slice
(`ctx.general_eval`, data.general_n_eval of them); any other source is a JSONL
file read by `r1jax.data.tasks.read_math` in `layout`
("auto" by default: MATH-500, AIME, GSM8K and plain {question, answer} rows
are told apart by their fields; see that module for each layout's gold).
A relative path that does not exist from the working directory is looked up
from the repository root, so the experiments' own data files work from anywhere.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from r1jax import storage
from r1jax.data.tasks import jsonl

HELD_OUT = "task:held_out"
GENERAL = "task:general"
SPLITS = (HELD_OUT, GENERAL)  # sources the run generates rather than reads
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  source: str  # one of SPLITS or a JSONL path
  layout: str = "auto"

  @property
  def path(self) -> str:
    """The JSONL file, resolved (see the module docstring)."""
    if storage.is_remote(self.source) or os.path.isabs(self.source) or os.path.exists(
        self.source):
      return self.source
    return os.path.join(_ROOT, self.source)


def parse(specs: Sequence[Sequence[str]]) -> list[Benchmark]:
  """Benchmarks from a config's tuples; raises ValueError naming the bad entry."""
  out: list[Benchmark] = []
  if not specs:
    raise ValueError("benchmarks is empty; name at least one, e.g. "
                     f"(('held_out', {HELD_OUT!r}),)")
  for spec in specs:
    if (not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3)
        or not all(isinstance(s, str) and s for s in spec)):
      raise ValueError(f"benchmarks entry {spec!r}: expected (name, source) or "
                       f"(name, source, layout) strings; source one of {SPLITS} or a JSONL "
                       "path")
    b = Benchmark(*spec)
    if b.name in [o.name for o in out]:
      raise ValueError(f"benchmarks: name {b.name!r} is used twice")
    if b.layout not in jsonl.MATH_LAYOUTS:
      raise ValueError(f"benchmarks entry {b.name!r}: layout {b.layout!r} is not one of "
                       f"{sorted(jsonl.MATH_LAYOUTS)}")
    if b.source.startswith("task:") and b.source not in SPLITS:
      raise ValueError(f"benchmarks entry {b.name!r}: unknown split {b.source!r}; the run's "
                       f"splits are {SPLITS}")
    if b.source in SPLITS and b.layout != "auto":
      raise ValueError(f"benchmarks entry {b.name!r}: the split {b.source!r} has no layout")
    if b.source not in SPLITS and not storage.exists(b.path):
      raise ValueError(f"benchmarks entry {b.name!r}: no file {b.source!r}")
    out.append(b)
  return out


def require_general(benchmarks: Sequence[Benchmark], n_general: int) -> None:
  """A GENERAL benchmark needs the run's general slice (`n_general` held-out requests)."""
  for b in benchmarks:
    if b.source == GENERAL and not n_general:
      raise ValueError(f"benchmarks entry {b.name!r}: {GENERAL!r} needs the general slice; "
                       "set data.general_n_eval > 0")


def load(benchmarks: Sequence[Benchmark], held_out: list[dict], max_prompts: int = 0,
         general: list[dict] | None = None) -> list[tuple[str, list[dict]]]:
  """[(name, examples)], each cut to its first `max_prompts` problems (0 = all)."""
  require_general(benchmarks, len(general or []))
  out, splits = [], {HELD_OUT: held_out, GENERAL: general}
  for b in benchmarks:
    examples = splits[b.source] if b.source in SPLITS else jsonl.read_math(b.path, b.layout)
    out.append((b.name, list(examples[:max_prompts] if max_prompts else examples)))
  return out
