"""Accuracy reward: the final answer checked against `example["answer"]`.

The final answer is read only from the answer region (after the last
`</think>`, see text.py), never from the reasoning:
- if the region has `<answer>` tags there must be exactly one
  `<answer>...</answer>` block; its `\\boxed{}` contents if it has any,
  else its whole content, are the candidates;
- otherwise the candidates are the contents of every `\\boxed{}` (balanced
  braces) in the region.
Every distinct candidate must be correct: `\\boxed{3} or \\boxed{4}` scores 0
even when 3 is right, and the same answer boxed twice is fine. More than
`_MAX_CANDIDATES` distinct candidates, an unclosed box, unbalanced braces or
an answer longer than `_MAX_ANSWER_CHARS` count as no answer.

Matching ("match" kwarg, or `example["match"]` when the kwarg is None), one
checker per mode in `MATCHERS`:
"math" (default) parses both sides with math-verify (numbers, fractions,
LaTeX, sets, intervals, equations like `x=3`, symbolic equivalence); "exact"
compares whitespace-normalised strings, for synthetic tasks that ask for it;
"countdown" checks the candidate as an equation over `example["numbers"]`
(each used exactly once) equal to `example["target"]`, since many equations
are right and `answer` is only one of them. An unknown mode is an error,
never a quiet 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from r1jax.data.tasks import countdown
from r1jax.rewards import text

_MAX_CANDIDATES = 3
_MAX_ANSWER_CHARS = 512
_MATCH_MODES = ("math", "exact")


def extract_answers(completion: str) -> list[str] | None:
  """Distinct final-answer candidates, or None when there is no clean answer."""
  region = text.answer_region(completion)
  opens, closes = region.count(text.ANSWER_OPEN), region.count(text.ANSWER_CLOSE)
  if opens or closes:
    start, end = region.find(text.ANSWER_OPEN), region.find(text.ANSWER_CLOSE)
    if opens != 1 or closes != 1 or end < start:
      return None
    block = region[start + len(text.ANSWER_OPEN):end]
    boxes = text.boxed_contents(block)
    if boxes is None:
      return None
    found = boxes or [block]
  else:
    found = text.boxed_contents(region)
    if not found:
      return None
  candidates = []
  for c in found:
    c = _strip_math_delimiters(c.strip())
    if c and c not in candidates:
      candidates.append(c)
  if not candidates or len(candidates) > _MAX_CANDIDATES:
    return None
  if any(len(c) > _MAX_ANSWER_CHARS or not text.braces_balanced(c) for c in candidates):
    return None
  return candidates


def _strip_math_delimiters(s: str) -> str:
  for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
    if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
      return s[len(left):len(s) - len(right)].strip()
  return s


def _timeout() -> int | None:
  # math-verify times out with signal.alarm, which works only in the main
  # thread; elsewhere the evaluator's per-call timeout is the guard.
  return 2 if threading.current_thread() is threading.main_thread() else None


def _parse(s: str) -> list[Any]:
  import math_verify  # noqa: PLC0415 - heavy import (sympy), only when used
  if "$" not in s and "\\boxed" not in s:
    # math-verify reads bare LaTeX (e.g. \sqrt{8}) only inside $...$ or a box.
    s = "\\boxed{" + s + "}"
  return math_verify.parse(
      s, [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()],
      parsing_timeout=_timeout())


def is_equivalent(gold: str, pred: str, match: str = "math") -> bool:
  """Whether the answer `pred` matches the ground truth `gold`."""
  if match not in _MATCH_MODES:
    raise ValueError(f"unknown match mode {match!r}; expected one of {_MATCH_MODES}")
  norm_gold, norm_pred = " ".join(gold.split()), " ".join(pred.split())
  if match == "exact" or norm_gold == norm_pred:
    return norm_gold == norm_pred
  import math_verify  # noqa: PLC0415
  gold_parsed = _parse(_strip_math_delimiters(gold.strip()))
  if not gold_parsed:
    return False
  return bool(math_verify.verify(gold_parsed, _parse(pred), timeout_seconds=_timeout()))


# The matchers read the example's fields before looking at the completion, so
# a malformed example is an error even when the completion has no answer.


def _equivalent(mode: str) -> Callable[[Mapping[str, Any]], Callable[[str], bool]]:
  def matcher(example: Mapping[str, Any]) -> Callable[[str], bool]:
    gold = example["answer"]
    gold = gold if isinstance(gold, str) else str(gold)  # datasets often store integers
    return lambda pred: is_equivalent(gold, pred, mode)
  return matcher


def _countdown(example: Mapping[str, Any]) -> Callable[[str], bool]:
  numbers, target = example["numbers"], example["target"]
  countdown.check_countdown("", numbers, target)  # raises on malformed numbers/target
  return lambda pred: countdown.check_countdown(pred, numbers, target)


# match mode -> example -> (candidate -> correct?)
MATCHERS: dict[str, Callable[[Mapping[str, Any]], Callable[[str], bool]]] = {
    "math": _equivalent("math"),
    "exact": _equivalent("exact"),
    "countdown": _countdown,
}


def accuracy(completion: str, example: Mapping[str, Any], *, match: str | None = None,
             format_score: float = 0.0) -> float:
  """1.0 if every final answer is correct; `format_score` if wrong; 0 if none.

  `format_score` is TinyZero's partial credit for a well-formed wrong answer
  (0.1 in its countdown task).
  """
  mode = match if match is not None else example.get("match", "math")
  if mode not in MATCHERS:
    raise ValueError(f"unknown match mode {mode!r}; expected one of {sorted(MATCHERS)}")
  is_correct = MATCHERS[mode](example)
  candidates = extract_answers(completion)
  if candidates is None:
    return 0.0
  if all(is_correct(c) for c in candidates):
    return 1.0
  return float(format_score)
