"""A rule-based stand-in for R1's preference rewards on general requests (R1 §2.3.4).

R1's alignment RL scores reasoning prompts with the rule rewards and general
prompts with reward models of human preference: helpfulness judged on the final
summary alone, harmlessness on the whole response. There is no reward model
at this scale, and the toy's general requests (r1jax.data.tasks.general) have
one short right answer, so the proxy scores the two things a preference model
would prefer in an answer to a simple request, each worth half:
- a helpful summary: after `</think>`, the answer alone (one `\\boxed{}`, or
  one `<answer>` block in the R1-Zero template), with no text around it;
- no long thinking: the reasoning holds at most `max_think_words` words (words
  counted as the language reward counts them: a Han character is one); each
  word beyond costs 1 / max_think_words of this half, so twice the limit
  scores nothing. The SFT data's one sentence ("I will answer directly.",
  "直接回答。") is 4 words.
Correctness is the accuracy reward's job, and harmlessness is not modelled (the
toy's requests leave nothing harmful to say).

Reasoning prompts (examples without "direct") score `neutral`: their reward is
the rule rewards'. A constant is the same for every completion of a GRPO group,
so it adds nothing to their advantages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from r1jax.rewards import text
from r1jax.rewards.language import script_counts


def lone_answer(completion: str) -> bool:
  """Whether the text after `</think>` is one boxed (or <answer>-tagged) answer and
  nothing else."""
  if completion.count(text.THINK_CLOSE) != 1:
    return False
  summary = text.answer_region(completion).strip()
  if summary.startswith(text.ANSWER_OPEN) and summary.endswith(text.ANSWER_CLOSE):
    inner = summary[len(text.ANSWER_OPEN):-len(text.ANSWER_CLOSE)]
    return bool(inner.strip()) and text.ANSWER_OPEN not in inner and text.ANSWER_CLOSE not in inner
  boxes = text.boxed_contents(summary)
  return (boxes is not None and len(boxes) == 1 and bool(boxes[0].strip())
          and summary == "\\boxed{" + boxes[0] + "}")


def think_words(completion: str) -> int:
  """Words in the reasoning (the language reward's count: a Han character is one)."""
  return sum(script_counts(text.reasoning(completion)).values())


def preference(completion: str, example: Mapping[str, Any], *, max_think_words: int = 8,
               neutral: float = 1.0) -> float:
  """In [0, 1] for a general request (see the module docstring); `neutral` otherwise."""
  if max_think_words < 1:
    raise ValueError(f"max_think_words must be >= 1, got {max_think_words}")
  if not example.get("direct", False):
    return float(neutral)
  extra = max(0, think_words(completion) - max_think_words)
  brevity = max(0.0, 1.0 - extra / max_think_words)
  return 0.5 * float(lone_answer(completion)) + 0.5 * brevity
