"""JSONL readers for real math and code datasets, strict about what they accept.

One JSON object per line; blank lines are skipped. A malformed record (bad
JSON, missing field, wrong type) raises `DataError` naming the file and the
1-based line, so a bad row in a million-line file is found at once. Fields
not listed here (ids, levels, sources) are dropped.

Math: {"question": str, "answer": str | int | float}
  - "problem" is accepted for "question" (MATH, NuminaMath, AIME dumps);
    a record with both is ambiguous and rejected.
  - "answer" is the final answer only. MATH's "solution" is a worked
    derivation, not an answer, so it is *not* an alias of "answer"; it is
    kept as the example's "cot" (as is a "cot" field) for SFT.
  - numbers become strings ("answer": 42 -> "42"); booleans are rejected.
  - optional "language" (str, default "en") and "match" ("math" default, or
    "exact"; see r1jax.rewards.accuracy).
  - GSM8K's "answer" is its worked solution ending in "#### <final answer>": the
    gold is what follows the last "####" with thousands commas dropped
    ("#### 1,200" -> "1200"), and the text before it is kept as the "cot".
  Layouts (`layout=`): "auto" (the default) accepts all of the above, reading
  an "answer" that holds "####" the GSM8K way; a named layout also requires its
  fields: "math500" {problem, solution, answer}, "aime" {problem, answer},
  "gsm8k" {question, answer with "####"}.
Code: {"prompt": str, "tests": [str, ...]}
  - tests are Python statements run after the candidate's code, as the code
    reward expects (e.g. "assert add(1, 2) == 3"); at least one.
  - the prompt is stored as the example's "question", like every task, so
    prompt batches read one field; optional "language" as above.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from r1jax import storage

_MATCH_MODES = ("math", "exact")
# Fields each named layout requires (beyond what every math record needs).
MATH_LAYOUTS = {"auto": (), "math500": ("problem", "solution", "answer"),
                "aime": ("problem", "answer"), "gsm8k": ("question", "answer")}
GSM8K_MARK = "####"


class DataError(ValueError):
  """A dataset record that cannot be used; the message names file and line."""


def _records(path: str) -> Iterator[tuple[int, dict]]:
  if not storage.exists(path):
    raise FileNotFoundError(f"dataset file {path!r} does not exist")
  with storage.path(path).open("r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
      yield lineno, record


def _text(record: dict, names: tuple[str, ...], where: str, *, required: bool = True) -> str | None:
  """The one non-empty string among the `names` aliases present in `record`."""
  present = [n for n in names if n in record]
  if len(present) > 1:
    raise DataError(f"{where}: has both {present[0]!r} and {present[1]!r}; keep one")
  if not present:
    if required:
      raise DataError(f"{where}: missing field {names[0]!r}"
                      + (f" (or {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""))
    return None
  value = record[present[0]]
  if not isinstance(value, str) or not value.strip():
    raise DataError(f"{where}: field {present[0]!r} must be a non-empty string, got {value!r:.80}")
  return value


def _language(record: dict, where: str) -> str:
  return _text(record, ("language",), where, required=False) or "en"


def read_math(path: str, layout: str = "auto") -> list[dict]:
  """Examples {"question", "answer", "language", "match"[, "cot"]} from a math JSONL file."""
  if layout not in MATH_LAYOUTS:
    raise ValueError(f"unknown math layout {layout!r}; expected one of {sorted(MATH_LAYOUTS)}")
  out = []
  for lineno, record in _records(path):
    where = f"{path}:{lineno}"
    missing = [f for f in MATH_LAYOUTS[layout] if f not in record]
    if missing:
      raise DataError(f"{where}: layout {layout!r} needs field {missing[0]!r}")
    example: dict[str, Any] = {"question": _text(record, ("question", "problem"), where)}
    if "answer" not in record:
      raise DataError(f"{where}: missing field 'answer'")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
      raise DataError(f"{where}: field 'answer' must be a string or a number, got {answer!r:.80}")
    answer, cot = str(answer), _text(record, ("cot", "solution"), where, required=False)
    if layout == "gsm8k" and GSM8K_MARK not in answer:
      raise DataError(f"{where}: layout 'gsm8k' needs the final answer after '{GSM8K_MARK}' "
                      f"in 'answer', got {answer!r:.80}")
    if GSM8K_MARK in answer:
      if cot is not None:
        raise DataError(f"{where}: 'answer' holds a '{GSM8K_MARK}' solution and there is "
                        "also a 'cot'/'solution'; keep one")
      cot, _, answer = answer.rpartition(GSM8K_MARK)
      answer, cot = answer.strip().replace(",", ""), cot.strip() or None
    if not answer.strip():
      raise DataError(f"{where}: field 'answer' is empty")
    example["answer"] = answer
    example["language"] = _language(record, where)
    match = record.get("match", "math")
    if match not in _MATCH_MODES:
      raise DataError(f"{where}: field 'match' must be one of {_MATCH_MODES}, got {match!r:.80}")
    example["match"] = match
    if cot is not None:
      example["cot"] = cot
    out.append(example)
  return out


def read_code(path: str) -> list[dict]:
  """Examples {"question", "tests", "language"} from a code JSONL file."""
  out = []
  for lineno, record in _records(path):
    where = f"{path}:{lineno}"
    prompt = _text(record, ("prompt",), where)
    if "tests" not in record:
      raise DataError(f"{where}: missing field 'tests'")
    tests = record["tests"]
    if (not isinstance(tests, list) or not tests or
        not all(isinstance(t, str) and t.strip() for t in tests)):
      raise DataError(f"{where}: field 'tests' must be a non-empty list of non-empty strings, "
                      f"got {tests!r:.80}")
    out.append({"question": prompt, "tests": tests, "language": _language(record, where)})
  return out
