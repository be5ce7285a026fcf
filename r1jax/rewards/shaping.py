"""Length and repetition shaping terms used by the recipes.

Lengths are in tokens and come from the example: the rollout
(`GRPOStep._rollout_round`) gives every row its own copy of the example with
the completion's token count, EOS excluded, in `example[length_key]` (default
"completion_tokens"). A missing or malformed count is an error, never length
0; `unit="chars"` uses `len(completion)` instead, for tests and
tokenizer-free setups.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from r1jax.rewards.accuracy import accuracy


def _length(completion: str, example: Mapping[str, Any], unit: str, length_key: str) -> int:
  if unit == "chars":
    return len(completion)
  if unit != "tokens":
    raise ValueError(f"unknown length unit {unit!r}; expected 'tokens' or 'chars'")
  # No default: a missing or bogus count must fail (and score the term's worst
  # value), not read as length 0 and escape the penalty.
  if length_key not in example:
    raise KeyError(f"length shaping needs example[{length_key!r}], the completion's token "
                   "count, which GRPOStep's rollout adds to every row; set it when scoring "
                   "elsewhere, or use unit='chars'")
  n = example[length_key]
  if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
    raise ValueError(f"example[{length_key!r}] must be a token count (an int >= 0), got {n!r}")
  return int(n)


def dapo_overlong(length: int, max_len: int, cache_len: int) -> float:
  """DAPO soft overlong punishment (eq. 13): 0, then linear to -1, then -1."""
  if not 0 < cache_len <= max_len:
    raise ValueError(f"need 0 < cache_len <= max_len, got {cache_len}, {max_len}")
  if length <= max_len - cache_len:
    return 0.0
  if length <= max_len:
    return (max_len - cache_len - length) / cache_len
  return -1.0


def overlong(completion: str, example: Mapping[str, Any], *, max_len: int = 20480,
             cache_len: int = 4096, unit: str = "tokens",
             length_key: str = "completion_tokens") -> float:
  """DAPO's penalty in [-1, 0]; defaults are DAPO's (L_max 20480, L_cache 4096)."""
  return dapo_overlong(_length(completion, example, unit, length_key), max_len, cache_len)


def cosine(t: float, total: float, value_at_0: float, value_at_total: float) -> float:
  """Cosine from `value_at_0` (t=0) to `value_at_total` (t=total), Yeo et al. eq. 1."""
  return value_at_total + 0.5 * (value_at_0 - value_at_total) * (
      1.0 + math.cos(math.pi * min(t, total) / total))


def cosine_accuracy(completion: str, example: Mapping[str, Any], *, max_len: int = 4096,
                    correct: tuple[float, float] = (1.0, 0.5),
                    wrong: tuple[float, float] = (-1.0, -0.5), exceed: float = -1.0,
                    unit: str = "tokens", length_key: str = "completion_tokens",
                    match: str | None = None) -> float:
  """Cosine length-scaled accuracy ("Demystifying Long CoT", Yeo et al. 2025).

  `correct`/`wrong` = (reward at length 0, reward at `max_len`): correct
  answers earn more when short, wrong ones are punished less when long (the
  model keeps thinking when unsure); `exceed` past `max_len`. The paper's
  values are correct (2, 1), wrong (-10, 0), exceed -10; the defaults here are
  open-r1's smaller scale. Range: [min of all five, max of all five].
  """
  length = _length(completion, example, unit, length_key)
  if length > max_len:
    return float(exceed)
  ok = accuracy(completion, example, match=match) == 1.0
  start, end = correct if ok else wrong
  return cosine(length, max_len, start, end)


def repetition(completion: str, example: Mapping[str, Any], *, ngram: int = 3,
               max_penalty: float = -1.0) -> float:
  """N-gram repetition penalty: max_penalty * (1 - unique/total word n-grams).

  In [max_penalty, 0]; 0 for text shorter than one n-gram.
  """
  del example
  if max_penalty > 0:
    raise ValueError(f"max_penalty must be <= 0, got {max_penalty}")
  words = completion.lower().split()
  grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
  if not grams:
    return 0.0
  return max_penalty * (1.0 - len(set(grams)) / len(grams)) + 0.0  # no -0.0
