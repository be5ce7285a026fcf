"""Splitting a completion into reasoning and answer; balanced `\\boxed{}`.

Shared by every reward so that they agree on one reading of a completion:
the reasoning is the `<think>` block, the answer region is what follows the
last `</think>`. A completion with `<think>` but no `</think>` has no answer
region (it never finished thinking); one with neither tag is all answer.
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_BOXED = re.compile(r"\\boxed\s*\{")


def answer_region(completion: str) -> str:
  """Text after the last `</think>`; "" if thinking never closed."""
  close = completion.rfind(THINK_CLOSE)
  if close >= 0:
    return completion[close + len(THINK_CLOSE):]
  return "" if THINK_OPEN in completion else completion


def reasoning(completion: str) -> str:
  """The chain of thought: text before the first `</think>`, tags removed.

  Without `</think>` the whole completion counts as reasoning.
  """
  close = completion.find(THINK_CLOSE)
  cot = completion if close < 0 else completion[:close]
  return cot.replace(THINK_OPEN, " ")


def boxed_contents(text: str) -> list[str] | None:
  """Contents of every `\\boxed{...}` in order (balanced braces).

  None if a box is left unclosed: a truncated or malformed final answer.
  """
  found = []
  pos = 0
  while True:
    m = _BOXED.search(text, pos)
    if m is None:
      return found
    depth, i = 1, m.end()
    while i < len(text) and depth:
      c = text[i]
      if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
        i += 2  # an escaped brace `\{` is content, not structure
        continue
      depth += (c == "{") - (c == "}")
      i += 1
    if depth:
      return None
    found.append(text[m.end():i - 1])
    pos = i


def braces_balanced(text: str) -> bool:
  depth = 0
  i = 0
  while i < len(text):
    c = text[i]
    if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
      i += 2
      continue
    depth += (c == "{") - (c == "}")
    if depth < 0:
      return False
    i += 1
  return depth == 0


# The reflective words whose frequency in R1-Zero's rollouts rises with its "aha
# moment" (the R1 paper's analysis: wait, mistake, however, retry, error, verify,
# wrong, evaluate, check), "again", and their Chinese forms. "But" is left out:
# ordinary prose is full of it.
REFLECTIVE_WORDS = ("wait", "mistake", "however", "retry", "error", "verify", "wrong",
                    "evaluate", "check", "again")
REFLECTIVE_WORDS_ZH = ("等等", "等一下", "错误", "错了", "然而", "重试", "验证", "检查", "再试",
                       "重新")
_REFLECTIVE = re.compile(r"\b(?:" + "|".join(REFLECTIVE_WORDS) + r")\b|" +
                         "|".join(REFLECTIVE_WORDS_ZH), re.IGNORECASE)


def reflective_words(completion: str) -> int:
  """How many reflective words (REFLECTIVE_WORDS, REFLECTIVE_WORDS_ZH) the
  completion's reasoning holds; English ones as whole words, any case."""
  return len(_REFLECTIVE.findall(reasoning(completion)))
