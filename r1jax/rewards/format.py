"""Format reward: the R1 template, strict or with partial credit per tag.

Two shapes (the `mode` kwarg):
"r1_zero": `<think> reasoning </think> <answer> answer </answer>` (the
  R1-Zero template, Table 1 of the paper);
"r1": `<think> reasoning </think>` then a summary holding a `\\boxed{}`
  answer, and no `<answer>` tags (how R1 itself answers).
Four checks per shape; the strict reward is 1 only if all pass, the partial
one (`partial=True`) is the share that pass, so both are 1 on exactly the
same completions:
  1. one `<think>`, with only whitespace before it;
  2. one `</think>`, after it, with non-blank reasoning between;
  r1_zero 3. one `<answer>`, with only whitespace between `</think>` and it;
  r1_zero 4. one `</answer>` after it, non-blank answer, nothing after;
  r1      3. no `<answer>`/`</answer>` tag anywhere;
  r1      4. a complete `\\boxed{}` after `</think>`.
`think_in_prompt=True` is for chat templates that already end the prompt
with `<think>`: the completion then starts inside the reasoning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from r1jax.rewards import text

_MODES = ("r1_zero", "r1")


def format_checks(completion: str, mode: str = "r1_zero",
                  think_in_prompt: bool = False) -> list[bool]:
  """The four checks above, in order."""
  if mode not in _MODES:
    raise ValueError(f"unknown format mode {mode!r}; expected one of {_MODES}")
  s = text.THINK_OPEN + completion if think_in_prompt else completion
  t_open, t_close = s.find(text.THINK_OPEN), s.find(text.THINK_CLOSE)
  one_open = s.count(text.THINK_OPEN) == 1 and not s[:t_open].strip()
  one_close = (s.count(text.THINK_CLOSE) == 1 and t_close > t_open >= 0
               and bool(s[t_open + len(text.THINK_OPEN):t_close].strip()))
  after = s[t_close + len(text.THINK_CLOSE):] if t_close >= 0 else ""
  if mode == "r1":
    no_tags = text.ANSWER_OPEN not in s and text.ANSWER_CLOSE not in s
    boxes = text.boxed_contents(after) if t_close >= 0 else None
    return [one_open, one_close, no_tags, bool(boxes) and all(b.strip() for b in boxes)]
  a_open, a_close = s.find(text.ANSWER_OPEN), s.find(text.ANSWER_CLOSE)
  one_aopen = (s.count(text.ANSWER_OPEN) == 1 and t_close >= 0
               and a_open >= t_close + len(text.THINK_CLOSE)
               and not s[t_close + len(text.THINK_CLOSE):a_open].strip())
  one_aclose = (s.count(text.ANSWER_CLOSE) == 1 and a_close > a_open >= 0
                and bool(s[a_open + len(text.ANSWER_OPEN):a_close].strip())
                and not s[a_close + len(text.ANSWER_CLOSE):].strip())
  return [one_open, one_close, one_aopen, one_aclose]


def format_reward(completion: str, example: Mapping[str, Any], *, mode: str = "r1_zero",
                  partial: bool = False, think_in_prompt: bool = False) -> float:
  """1.0 for the template; with `partial`, 0.25 per passing check. In [0, 1]."""
  del example  # the template does not depend on the task
  checks = format_checks(completion, mode, think_in_prompt)
  if partial:
    return sum(checks) / len(checks)
  return float(all(checks))
