"""Multi-step arithmetic with worked solutions, in English and Chinese.

Each example: {"question", "answer" (an integer as a string), "cot" (the worked
steps), "language" ("en" or "zh"), "match": "exact", "expression" (the
problem alone, the same in both languages)}. The answer is a plain
integer, so the accuracy reward compares strings ("exact") and needs no
math-verify. A Chinese problem is posed and solved in Chinese words around
Arabic numerals, so that language mixing in the chain of thought can be
measured by the language-consistency reward.
"""

from __future__ import annotations

import random

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_SHOW = {"+": "+", "-": "-", "*": "×"}

_WORDS = {
    "en": {"ask": "Compute {expr}.", "first": "First, {step}.", "then": "Then, {step}.",
           "final": "So the answer is {ans}."},
    "zh": {"ask": "计算 {expr}。", "first": "首先，{step}。", "then": "然后，{step}。",
           "final": "所以答案是 {ans}。"},
}


def make_example(rng: random.Random, n_steps: int, language: str, *, max_operand: int = 20,
                 ops: str = "+-*") -> dict:
  """A left-to-right chain: ((a op b) op c) ... with its step-by-step solution.

  Operands are drawn from 1..max_operand (multipliers from 2..min(9, max_operand));
  the first operation is never a product, so answers stay small.
  """
  if language not in _WORDS:
    raise ValueError(f"language must be one of {sorted(_WORDS)}, got {language!r}")
  words = _WORDS[language]
  value = rng.randint(1, max_operand)
  expr = str(value)
  steps = []
  first_ops = "".join(o for o in ops if o != "*") or ops
  for i in range(n_steps):
    op = rng.choice(ops) if i else rng.choice(first_ops)
    operand = rng.randint(2, min(9, max_operand)) if op == "*" else rng.randint(1, max_operand)
    new = _OPS[op](value, operand)
    steps.append(f"{value} {_SHOW[op]} {operand} = {new}")
    expr = f"({expr} {_SHOW[op]} {operand})" if i < n_steps - 1 else f"{expr} {_SHOW[op]} {operand}"
    value = new
  return {"question": words["ask"].format(expr=expr), "answer": str(value),
          "cot": render_cot(steps, str(value), [language] * (len(steps) + 1)),
          "language": language, "match": "exact", "expression": expr, "steps": steps}


def render_cot(steps: list[str], answer: str, languages: list[str]) -> str:
  """The worked solution, sentence i (each step, then the answer) in languages[i]."""
  if len(languages) != len(steps) + 1:
    raise ValueError(f"need {len(steps) + 1} sentence languages, got {len(languages)}")
  kinds = ["first"] + ["then"] * (len(steps) - 1)
  sentences = [_WORDS[lang][kind].format(step=step)
               for lang, kind, step in zip(languages, kinds, steps)]
  return " ".join(sentences + [_WORDS[languages[-1]]["final"].format(ans=answer)])


def drifting_cot(example: dict, rng: random.Random, into: str = "en") -> str:
  """The example's solution starting in its own language and switching to `into` from
  a random later sentence on: the language mixing R1-Zero showed (R1 §2.3.2), for
  pre-training documents of a base model that mixes. Needs `steps` (arithmetic
  examples carry them); a one-step solution switches for its last sentence; an
  example already in `into` comes back unchanged."""
  steps, own = example["steps"], example["language"]
  if own == into:
    return example["cot"]
  switch = rng.randint(1, len(steps))  # sentence index of the first one in `into`
  languages = [own] * switch + [into] * (len(steps) + 1 - switch)
  return render_cot(steps, example["answer"], languages)


def sample(rng: random.Random, *, min_steps: int = 1, max_steps: int = 3,
           zh_fraction: float = 0.25, max_operand: int = 20, ops: str = "+-*") -> dict:
  """One problem of `min_steps`..`max_steps` operations; deterministic in `rng`."""
  if not 1 <= min_steps <= max_steps:
    raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
  if not 0.0 <= zh_fraction <= 1.0:
    raise ValueError(f"zh_fraction must be in [0, 1], got {zh_fraction}")
  if max_operand < 2:
    raise ValueError(f"max_operand must be >= 2, got {max_operand}")
  if not ops or set(ops) - set(_OPS):
    raise ValueError(f"ops must be a non-empty string over {''.join(_OPS)!r}, got {ops!r}")
  n_steps = rng.randint(min_steps, max_steps)
  return make_example(rng, n_steps, "zh" if rng.random() < zh_fraction else "en",
                      max_operand=max_operand, ops=ops)


def problem_key(example: dict) -> str:
  """The problem's identity: the same expression asked in English or Chinese is one problem."""
  return f"arithmetic:{example['expression']}"
