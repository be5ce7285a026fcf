"""Multi-step arithmetic with worked solutions, in English and Chinese.

Each example: {"question", "answer" (an integer as a string), "cot" (the worked
steps), "language" ("en" or "zh")}. A Chinese problem is posed and solved in
Chinese words around Arabic numerals, so that language mixing in the chain of
thought can be measured by the language-consistency reward.
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


def make_example(rng: random.Random, n_steps: int, language: str) -> dict:
  """A left-to-right chain: ((a op b) op c) ... with its step-by-step solution."""
  if language not in _WORDS:
    raise ValueError(f"language must be one of {sorted(_WORDS)}, got {language!r}")
  words = _WORDS[language]
  value = rng.randint(1, 20)
  expr = str(value)
  steps = []
  for i in range(n_steps):
    op = rng.choice("+-*") if i else rng.choice("+-")
    operand = rng.randint(2, 9) if op == "*" else rng.randint(1, 20)
    new = _OPS[op](value, operand)
    steps.append(f"{value} {_SHOW[op]} {operand} = {new}")
    expr = f"({expr} {_SHOW[op]} {operand})" if i < n_steps - 1 else f"{expr} {_SHOW[op]} {operand}"
    value = new
  cot = " ".join([words["first"].format(step=steps[0])] +
                 [words["then"].format(step=s) for s in steps[1:]] +
                 [words["final"].format(ans=value)])
  return {"question": words["ask"].format(expr=expr), "answer": str(value), "cot": cot,
          "language": language}


def generate(n: int, seed: int, *, min_steps: int = 1, max_steps: int = 3,
             zh_fraction: float = 0.25) -> list[dict]:
  """`n` examples, deterministic in `seed`."""
  rng = random.Random(seed)
  return [make_example(rng, rng.randint(min_steps, max_steps),
                       "zh" if rng.random() < zh_fraction else "en") for _ in range(n)]
