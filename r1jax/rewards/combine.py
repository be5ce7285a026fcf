"""Weighted rewards by name, and a batched evaluator with a killable worker pool.

Config shape (what the pipeline holds):

  spec = RewardSpec.create([("accuracy", 1.0), ("format", 0.5, {"mode": "r1"})],
                           timeout_s=20.0, num_workers=2)

Names and kwargs are checked when the spec is built (unknown name, unknown
kwarg, duplicate, non-finite weight: ValueError listing what is allowed).

Every reward declares its range in `BOUNDS` (from its options, e.g. a
penalty's `max_penalty`). A term that fails scores its *worst* value, the end
of the range that minimises weight × value: 0 would be the best value of a
penalty (repetition, overlong), so a completion that breaks its reward would
escape it.

`RewardEvaluator(spec)` runs every (completion, example, reward) call in a
pool of worker processes. Processes, not threads: math-verify times out with
`signal.alarm` (main thread only) and a sympy or regex call stuck in C cannot
be interrupted, only killed. A call past `timeout_s` gets its worker SIGKILLed
and replaced; a call that raises, or returns a non-finite or out-of-range
value, scores the term's worst value. Both are counted in the metrics
(reward/<name>/timeouts, reward/<name>/errors), and the step goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from r1jax.rewards import sandbox
from r1jax.rewards.accuracy import accuracy
from r1jax.rewards.code import code
from r1jax.rewards.format import format_reward
from r1jax.rewards.language import language
from r1jax.rewards.preference import preference
from r1jax.rewards.shaping import cosine_accuracy, overlong, repetition

RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "format": format_reward,
    "language": language,
    "code": code,
    "overlong": overlong,
    "cosine_accuracy": cosine_accuracy,
    "repetition": repetition,
    "preference": preference,
}


def _unit(options: Mapping[str, Any]) -> tuple[float, float]:
  return 0.0, 1.0


def _cosine(options: Mapping[str, Any]) -> tuple[float, float]:
  values = [*options["correct"], *options["wrong"], options["exceed"]]
  return min(values), max(values)


# name -> (all keyword options, defaults filled in) -> (min, max) of the reward.
BOUNDS: dict[str, Callable[[Mapping[str, Any]], tuple[float, float]]] = {
    "accuracy": lambda o: (min(0.0, o["format_score"]), max(1.0, o["format_score"])),
    "format": _unit,
    "language": _unit,
    "code": _unit,
    "overlong": lambda o: (-1.0, 0.0),
    "cosine_accuracy": _cosine,
    "repetition": lambda o: (o["max_penalty"], 0.0),
    "preference": lambda o: (min(0.0, o["neutral"]), max(1.0, o["neutral"])),
}
if set(BOUNDS) != set(REWARDS):  # a reward without a range could not fail closed
  raise ImportError(f"rewards without declared bounds: {sorted(set(REWARDS) ^ set(BOUNDS))}")

# A value this far past its bound (relative) is float rounding, not a bug.
_BOUND_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class RewardTerm:
  name: str
  weight: float = 1.0
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def bounds(self) -> tuple[float, float]:
    """(min, max) of the reward with these options."""
    params = inspect.signature(REWARDS[self.name]).parameters.values()
    options = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    options.update(self.kwargs)
    lo, hi = BOUNDS[self.name](options)
    return float(lo), float(hi)

  def worst(self) -> float:
    """What a failed call scores: the end of the range that minimises weight × value."""
    lo, hi = self.bounds()
    return hi if self.weight < 0 else lo


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """Which rewards, their weights and kwargs; the pool's size and timeout."""
  terms: tuple[RewardTerm, ...]
  timeout_s: float = 20.0
  num_workers: int = 2

  def __post_init__(self):
    if not self.terms:
      raise ValueError("a RewardSpec needs at least one reward term")
    seen = set()
    for term in self.terms:
      if term.name not in REWARDS:
        raise ValueError(f"unknown reward {term.name!r}; known rewards: {sorted(REWARDS)}")
      if term.name in seen:
        raise ValueError(f"reward {term.name!r} listed twice; give it one weight")
      seen.add(term.name)
      if not math.isfinite(term.weight):
        raise ValueError(f"reward {term.name!r} has a non-finite weight {term.weight}")
      params = inspect.signature(REWARDS[term.name]).parameters
      allowed = [p.name for p in params.values() if p.kind is p.KEYWORD_ONLY]
      unknown = sorted(set(term.kwargs) - set(allowed))
      if unknown:
        raise ValueError(f"reward {term.name!r} got unknown options {unknown}; "
                         f"allowed: {allowed}")
      try:
        lo, hi = term.bounds()
      except (TypeError, ValueError) as e:
        raise ValueError(f"reward {term.name!r}: cannot tell its range from options "
                         f"{dict(term.kwargs)} ({e})") from None
      if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"reward {term.name!r} with options {dict(term.kwargs)} has range "
                         f"[{lo}, {hi}]; it must be finite with min <= max")
    if not self.timeout_s > 0 or self.num_workers < 1:
      raise ValueError("timeout_s must be > 0 and num_workers >= 1")

  def check_available(self) -> None:
    """Fails now, not at the first rollout, where a term cannot run here: the code
    reward without namespace isolation raises sandbox.SandboxUnavailable (fail closed;
    a failure inside a worker would only score the term's worst value)."""
    for term in self.terms:
      if term.name == "code":
        sandbox.sandbox_info(allow_unsafe=bool(term.kwargs.get(sandbox.UNSAFE_OPTION, False)))

  @classmethod
  def create(cls, terms: Sequence[tuple] | Mapping[str, float], **kwargs) -> RewardSpec:
    """From [(name, weight), (name, weight, kwargs), ...] or {name: weight}."""
    items = list(terms.items()) if isinstance(terms, Mapping) else list(terms)
    built = []
    for item in items:
      if not 2 <= len(item) <= 3:
        raise ValueError(f"reward term {item!r} must be (name, weight[, kwargs])")
      built.append(RewardTerm(item[0], float(item[1]), dict(item[2]) if len(item) == 3 else {}))
    return cls(tuple(built), **kwargs)


def make_reward_fn(spec: RewardSpec) -> Callable[[str, Mapping[str, Any]], float]:
  """The weighted sum as one in-process function (no pool, no timeout)."""
  def reward(completion: str, example: Mapping[str, Any]) -> float:
    return sum(t.weight * float(REWARDS[t.name](completion, example, **t.kwargs))
               for t in spec.terms)
  return reward


# ---------------------------------------------------------------- the pool


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
  while True:
    try:
      task = conn.recv()
    except (EOFError, OSError):
      return
    if task is None:
      return
    key, name, kwargs, completion, example = task
    try:
      value = float(REWARDS[name](completion, example, **kwargs))
      reply = (key, "ok", value) if math.isfinite(value) else (key, "error", "non-finite")
    except Exception as e:  # noqa: BLE001 - any failure scores the term's worst value
      reply = (key, "error", f"{type(e).__name__}: {e}"[:500])
    conn.send(reply)


class _Worker:
  def __init__(self, ctx: multiprocessing.context.BaseContext):
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
    self.proc.start()
    child.close()
    self.task: tuple | None = None
    self.started = 0.0

  def kill(self) -> None:
    self.proc.kill()
    self.proc.join(5)
    self.conn.close()
    # A worker killed mid-run never reached its own cleanup.
    sandbox.remove_workdirs(self.proc.pid)


class RewardEvaluator:
  """`evaluator(completions, examples) -> (rewards [N], per_reward, metrics)`.

  `last_error[name]`: the latest failure of each term, as text, for the logs
  (the metrics only count them).
  """

  def __init__(self, spec: RewardSpec):
    spec.check_available()
    self.spec = spec
    self.last_error: dict[str, str] = {}
    # forkserver: workers never fork the (threaded, JAX-holding) trainer.
    self._ctx = multiprocessing.get_context("forkserver")
    # Preloaded once in the server, so a fresh or replacement worker does not
    # spend its first call's timeout importing sympy.
    self._ctx.set_forkserver_preload(["r1jax.rewards", "math_verify"])
    self._workers = [_Worker(self._ctx) for _ in range(spec.num_workers)]

  def __enter__(self) -> RewardEvaluator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    for w in self._workers:
      try:
        w.conn.send(None)
      except OSError:
        pass
      w.proc.join(1)
      if w.proc.is_alive():
        w.kill()
    self._workers = []

  def __call__(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]
               ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    if len(completions) != len(examples):
      raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    if not self._workers:
      raise RuntimeError("RewardEvaluator is closed")
    start = time.monotonic()
    n = len(completions)
    # Every call starts at its worst value; only a call that returns an
    # in-range value moves it, so a failure of any kind fails closed.
    per_reward = {t.name: np.full(n, t.worst(), np.float64) for t in self.spec.terms}
    bounds = {t.name: t.bounds() for t in self.spec.terms}
    counts = collections.Counter()
    tasks = collections.deque(
        ((t.name, i), t.name, dict(t.kwargs), completions[i], examples[i])
        for i in range(n) for t in self.spec.terms)
    while tasks or any(w.task for w in self._workers):
      for w in self._workers:
        if w.task is None and tasks:
          task = tasks.popleft()
          try:
            w.conn.send(task)
            w.task, w.started = task, time.monotonic()
          except Exception as e:  # noqa: BLE001 - unpicklable example, dead worker
            counts[f"{task[1]}/errors"] += 1
            self.last_error[task[1]] = f"could not send the call: {type(e).__name__}: {e}"
            self._replace(w)
      busy = [w for w in self._workers if w.task is not None]
      if not busy:
        continue
      wait = min(w.started + self.spec.timeout_s for w in busy) - time.monotonic()
      ready = multiprocessing.connection.wait([w.conn for w in busy], max(0.0, wait))
      for w in busy:
        if w.conn in ready:
          try:
            (name, i), status, value = w.conn.recv()
          except (EOFError, OSError):  # the worker died (e.g. OOM-killed)
            counts[f"{w.task[1]}/errors"] += 1
            self.last_error[w.task[1]] = "the worker died"
            self._replace(w)
            continue
          w.task = None
          if status == "ok":
            lo, hi = bounds[name]
            tol = _BOUND_TOLERANCE * max(1.0, abs(lo), abs(hi))
            if lo - tol <= value <= hi + tol:
              per_reward[name][i] = min(max(value, lo), hi)
              continue
            value = f"{value} is outside the declared range [{lo}, {hi}]"
          counts[f"{name}/errors"] += 1
          self.last_error[name] = value
        elif time.monotonic() - w.started >= self.spec.timeout_s:
          counts[f"{w.task[1]}/timeouts"] += 1
          self.last_error[w.task[1]] = f"timed out after {self.spec.timeout_s} s"
          self._replace(w)
    rewards = sum(t.weight * per_reward[t.name] for t in self.spec.terms)
    metrics = {"reward/wall_s": time.monotonic() - start,
               "reward/timeouts": float(sum(v for k, v in counts.items()
                                            if k.endswith("/timeouts"))),
               "reward/errors": float(sum(v for k, v in counts.items()
                                          if k.endswith("/errors")))}
    for t in self.spec.terms:
      metrics[f"reward/{t.name}/mean"] = float(per_reward[t.name].mean()) if n else 0.0
      metrics[f"reward/{t.name}/timeouts"] = float(counts[f"{t.name}/timeouts"])
      metrics[f"reward/{t.name}/errors"] = float(counts[f"{t.name}/errors"])
    return np.asarray(rewards, np.float64), per_reward, metrics

  def _replace(self, w: _Worker) -> None:
    """Kills a hung or dead worker and starts a fresh one in its place."""
    w.kill()
    self._workers[self._workers.index(w)] = _Worker(self._ctx)
