"""Countdown: combine the given numbers with + - * / to make a target (TinyZero's task).

Rules, as in TinyZero's verifier: 3–4 numbers, each used *exactly* once (using
all of them is what makes the search hard; "at most once" would let a model
copy the one number closest to the target); binary + - * / and parentheses
only, so no unary minus, no exponent, no gluing digits into new numbers.
Division is exact: intermediate values may be fractions, the whole expression
must equal the target exactly.

Each example: {"question", "answer", "cot", "language", "match": "countdown",
"numbers" (list[int], in the order posed), "target" (int)}.

Answer semantics: `answer` is *one* reference solution, used as the SFT target.
Many expressions are correct, so a reward must check a completion's answer
with `check_countdown(candidate, example["numbers"], example["target"])`, never
by comparing it with `answer` as a string or a number (a numeric comparison
would accept the bare target "74"). `match` is "countdown" so that a reward
which only knows "math"/"exact" fails loudly instead of scoring it wrongly.

The worked solution is a trial-and-error search: up to `max_misses` complete
attempts that miss the target (every step computed correctly), each followed by
a self-check in reflective words ("Wait, 7 is not 12. Try again."; the R1
paper counts such words to trace its "aha moment"), then the attempt that hits it. Problems are built backwards from a random combination
of the numbers, so each one is solvable by construction.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Sequence

# A completion's expression is untrusted text: bound the work done on it.
_MAX_EXPR_CHARS = 200
_MAX_LITERAL_DIGITS = 6
_MAX_DEPTH = 16
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
# Symbols a model may write for the four operations and parentheses.
_ALIASES = str.maketrans({"×": "*", "÷": "/", "−": "-", "（": "(", "）": ")"})

_WORDS = {
    "en": {"ask": "Using the numbers {numbers}, each exactly once, and + - * /, make {target}.",
           "sep": ", ", "try": "Try {steps}.", "miss": "Wait, {value} is not {target}. Try again.",
           "hit": "That makes {target}.", "final": "So the answer is {expr}."},
    "zh": {"ask": "用 {numbers} 这几个数（每个数恰好用一次）和 + - * / 凑出 {target}。",
           "sep": "、", "try": "试试 {steps}。", "miss": "等等，{value} 不等于 {target}，再试。",
           "hit": "正好是 {target}。", "final": "所以答案是 {expr}。"},
}
# Chinese runs sentences together without spaces.
_SEP = {"en": {"step": ", ", "sentence": " "}, "zh": {"step": "，", "sentence": ""}}


# ------------------------------------------------------------------ checking


class _Parser:
  """Recursive descent over integer literals, + - * / and parentheses, in Fractions.

  expr := term (("+" | "-") term)* ; term := atom (("*" | "/") atom)* ;
  atom := INT | "(" expr ")".
  """

  def __init__(self, tokens: list[tuple[str, str]]):
    self.tokens, self.pos, self.literals = tokens, 0, []

  def peek(self) -> str | None:
    return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

  def take(self) -> tuple[str, str]:
    tok = self.tokens[self.pos]
    self.pos += 1
    return tok

  def expr(self, depth: int) -> Fraction:
    value = self.term(depth)
    while self.peek() in ("+", "-"):
      op = self.take()[1]
      rhs = self.term(depth)
      value = value + rhs if op == "+" else value - rhs
    return value

  def term(self, depth: int) -> Fraction:
    value = self.atom(depth)
    while self.peek() in ("*", "/"):
      op = self.take()[1]
      rhs = self.atom(depth)
      if op == "*":
        value = value * rhs
      elif rhs == 0:
        raise ZeroDivisionError
      else:
        value = value / rhs
    return value

  def atom(self, depth: int) -> Fraction:
    if self.pos >= len(self.tokens):
      raise SyntaxError("expression ends early")
    kind, text = self.take()
    if kind == "int":
      self.literals.append(int(text))
      return Fraction(int(text))
    if text != "(" or depth >= _MAX_DEPTH:
      raise SyntaxError(f"unexpected {text!r}")
    value = self.expr(depth + 1)
    if self.pos >= len(self.tokens) or self.take()[1] != ")":
      raise SyntaxError("unclosed parenthesis")
    return value


def _tokenize(expression: str) -> list[tuple[str, str]] | None:
  tokens, pos, text = [], 0, expression.rstrip()
  while pos < len(text):
    m = _TOKEN.match(text, pos)
    if m is None:
      return None  # anything else: a name, a dot, a comma, a quote
    if m.group(1) is not None:
      digits = m.group(1)
      if len(digits) > _MAX_LITERAL_DIGITS or (len(digits) > 1 and digits[0] == "0"):
        return None  # leading zeros would let "07" pass for 7
      tokens.append(("int", digits))
    else:
      tokens.append(("op", m.group(2)))
    pos = m.end()
  return tokens


def evaluate(expression: str) -> tuple[Fraction, list[int]] | None:
  """(exact value, integer literals in order) of a countdown expression, or None.

  None for anything outside the grammar (names, calls, `**`, unary minus,
  decimals), division by zero, or an expression over the length limit.
  """
  if not isinstance(expression, str) or len(expression) > _MAX_EXPR_CHARS:
    return None
  tokens = _tokenize(expression.translate(_ALIASES))
  if not tokens:
    return None
  parser = _Parser(tokens)
  try:
    value = parser.expr(0)
  except (SyntaxError, ZeroDivisionError):
    return None
  if parser.pos != len(tokens):
    return None
  return value, parser.literals


def check_countdown(expression: str, numbers: Sequence[int], target: int) -> bool:
  """Whether `expression` uses each of `numbers` exactly once and equals `target`.

  Pure and safe on untrusted text: no eval, bounded length and nesting.
  """
  if (isinstance(numbers, (str, bytes)) or
      not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)):
    raise ValueError(f"numbers must be a list of ints, got {numbers!r}")
  if not isinstance(target, int) or isinstance(target, bool):
    raise ValueError(f"target must be an int, got {target!r}")
  result = evaluate(expression)
  if result is None:
    return False
  value, literals = result
  return sorted(literals) == sorted(numbers) and value == target


# ---------------------------------------------------------------- generating


def _combine(a: int, b: int, op: str) -> int | None:
  """a op b when it keeps the solution in positive integers, else None."""
  if op == "+":
    return a + b
  if op == "-":
    return a - b if a > b else None
  if op == "*":
    return a * b if a > 1 and b > 1 else None  # × 1 is a wasted step
  return a // b if b > 1 and a % b == 0 else None


def _random_chain(rng: random.Random, numbers: list[int]) -> tuple[int, list[str], str]:
  """Combines random pairs until one value is left: (value, steps shown, expression)."""
  pool = [(n, str(n)) for n in numbers]
  steps = []
  while len(pool) > 1:
    i, j = rng.sample(range(len(pool)), 2)
    (a, ea), (b, eb) = pool[i], pool[j]
    ops = [op for op in "+-*/" if _combine(a, b, op) is not None]
    if not ops:  # + always applies, so this is unreachable; kept as a guard
      raise AssertionError((a, b))
    op = rng.choice(ops)
    value = _combine(a, b, op)
    steps.append(f"{a} {op} {b} = {value}")
    pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"({ea} {op} {eb})")]
  value, expr = pool[0]
  if expr.startswith("("):
    expr = expr[1:-1]  # the outermost parentheses say nothing
  return value, steps, expr


def sample(rng: random.Random, *, min_numbers: int = 3, max_numbers: int = 4,
           max_value: int = 50, max_target: int = 100, max_misses: int = 2,
           zh_fraction: float = 0.25) -> dict:
  """One solvable countdown problem with a worked search; deterministic in `rng`."""
  if not 2 <= min_numbers <= max_numbers <= 6:
    raise ValueError(f"need 2 <= min_numbers <= max_numbers <= 6, got {min_numbers}, {max_numbers}")
  if max_value < 2 or max_target < 10:
    raise ValueError(f"need max_value >= 2 and max_target >= 10, got {max_value}, {max_target}")
  if not 0.0 <= zh_fraction <= 1.0:
    raise ValueError(f"zh_fraction must be in [0, 1], got {zh_fraction}")
  if max_misses < 0:
    raise ValueError(f"max_misses must be >= 0, got {max_misses}")
  language = "zh" if rng.random() < zh_fraction else "en"
  words = _WORDS[language]
  count = rng.randint(min_numbers, max_numbers)  # drawn once: 3 and 4 numbers equally often
  for _ in range(10_000):
    numbers = [rng.randint(1, max_value) for _ in range(count)]
    target, steps, expr = _random_chain(rng, numbers)
    if 1 <= target <= max_target and target not in numbers:
      break
  else:
    raise RuntimeError("no countdown problem found; widen max_value/max_target")
  sep = _SEP[language]
  lines = []
  for _ in range(rng.randint(0, max_misses)):
    value, miss, _ = _random_chain(rng, numbers)
    if value != target:  # a random attempt that happens to hit is no miss
      lines += [words["try"].format(steps=sep["step"].join(miss)),
                words["miss"].format(value=value, target=target)]
  lines += [words["try"].format(steps=sep["step"].join(steps)),
            words["hit"].format(target=target), words["final"].format(expr=expr)]
  return {"question": words["ask"].format(numbers=words["sep"].join(map(str, numbers)),
                                          target=target),
          "answer": expr, "cot": sep["sentence"].join(lines), "language": language,
          "match": "countdown", "numbers": numbers, "target": target}


def problem_key(example: dict) -> str:
  """The problem's identity, whatever its language or the order its numbers are posed in."""
  return f"countdown:{sorted(example['numbers'])}->{example['target']}"
