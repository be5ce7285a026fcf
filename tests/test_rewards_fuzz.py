"""Property-based fuzzing: arbitrary unicode plus adversarial tags and brackets.

Every reward must return a float in its declared range (`RewardTerm.bounds`),
never raise on completion text, and return quickly. The examples have the
production shape: what the task generators and JSONL readers produce, plus
"prompt_ids" (the prompt pipeline) and "completion_tokens" (the rollout).
"""

import math
import os
import random
import time

import pytest
from hypothesis import given, settings, strategies as st

from r1jax.data.tasks import arithmetic, countdown, general, read_code, read_math
from r1jax.rewards import REWARDS, RewardTerm
from r1jax.rewards import sandbox as sb

# Sandbox runs are checked for leftover processes system-wide (any sandbox uid):
# one xdist worker runs them all, so no worker sees another's live sandbox.
pytestmark = pytest.mark.xdist_group("sandbox")


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
MATH_EXAMPLES = ([arithmetic.sample(random.Random(s), zh_fraction=0.5) for s in range(4)] +
                 [countdown.sample(random.Random(s)) for s in range(4)] +
                 [general.sample(random.Random(s), zh_fraction=0.5) for s in range(4)] +
                 read_math(os.path.join(FIXTURES, "math.jsonl")))
CODE_EXAMPLES = read_code(os.path.join(FIXTURES, "code.jsonl"))

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "\\boxed", "{", "}",
             "\\{", "\\}", "$", "$$", "\\(", "\\)", "\\frac{1}{2}", "3", "x", "=", "^{9^{9}}",
             "```python\n", "```\n", "```", "\n", " ", "def f():\n  return 1\n", "我们",
             "Считаем", "\ud800", "\x00", "\u202e", "<think", "</", "(", "]", "1/0", "\\sqrt{",
             "\\text{", "+", "-", "*", "/", "×", "÷", "07"]
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def completions(example: dict) -> st.SearchStrategy[str]:
  """Fragments of any text, and of this example's answer, numbers and target;
  half of them in the template, so that every answer checker gets to run."""
  own = [str(example[k]) for k in ("answer", "target") if k in example] + [
      str(n) for n in example.get("numbers", [])]
  parts = st.one_of(st.sampled_from(FRAGMENTS + own), st.text(max_size=12))
  text = st.lists(parts, max_size=30).map("".join)
  answer = st.lists(st.sampled_from(own + ["+", "-", "*", "/", "(", ")", " ", "x"]),
                    min_size=1, max_size=9).map("".join)
  templated = st.tuples(text, answer).map(
      lambda p: f"<think>{p[0]}</think>\n<answer>{p[1]}</answer>")
  return st.one_of(text, templated)


def rollout_rows(examples: list[dict]) -> st.SearchStrategy[tuple[str, dict]]:
  """(completion, the row's example as the rollout hands it to the rewards)."""
  def row(example):
    shaped = st.integers(0, 50_000).map(
        lambda n: {**example, "prompt_ids": [1, 2, 3], "completion_tokens": n})
    return st.tuples(completions(example), shaped)
  return st.sampled_from(examples).flatmap(row)


@pytest.fixture(autouse=True, scope="module")
def _warm_math_verify():
  """math-verify's first call imports sympy and its LaTeX parser (seconds on a busy
  machine): done once here, so the time bound below is the reward's own."""
  REWARDS["accuracy"]("\\boxed{\\frac{1}{2}}", {"answer": "0.5"})


def _check(name, completion, example, max_s=5.0, **kwargs):
  lo, hi = RewardTerm(name, 1.0, kwargs).bounds()
  start = time.monotonic()
  value = REWARDS[name](completion, example, **kwargs)
  assert time.monotonic() - start < max_s
  assert isinstance(value, float) and math.isfinite(value)
  assert lo <= value <= hi, (value, lo, hi)


@SETTINGS
@given(rollout_rows(MATH_EXAMPLES))
def test_accuracy_fuzz(row):
  completion, example = row
  _check("accuracy", completion, example)
  _check("accuracy", completion, example, format_score=0.1)


@SETTINGS
@given(rollout_rows(MATH_EXAMPLES + CODE_EXAMPLES), st.sampled_from(["r1_zero", "r1"]),
       st.booleans(), st.booleans())
def test_format_fuzz(row, mode, partial, think_in_prompt):
  _check("format", *row, mode=mode, partial=partial, think_in_prompt=think_in_prompt)


@SETTINGS
@given(rollout_rows(MATH_EXAMPLES + CODE_EXAMPLES),
       st.sampled_from([None, "en", "zh", "ja", "ko", "ru"]))
def test_language_fuzz(row, lang):
  completion, example = row
  # A JSONL record may name any supported language; None keeps the generator's.
  _check("language", completion, example if lang is None else {**example, "language": lang})


@SETTINGS
@given(rollout_rows(MATH_EXAMPLES))
def test_shaping_fuzz(row):
  _check("overlong", *row)
  _check("cosine_accuracy", *row)
  _check("repetition", *row)
  _check("preference", *row)


PROGRAM = ["def add(a, b):\n", "  return a + b\n", "return", "1", "(", ")", ":", "\n", "  ",
           "import os\n", "raise SystemExit\n", "add = lambda a, b: a + b\n", "\ud800", "\\", "'",
           '"""', "\x00"]
with_code = st.tuples(completions({}), st.lists(
    st.one_of(st.sampled_from(PROGRAM), st.text(max_size=8)), max_size=12).map("".join)).map(
        lambda parts: parts[0] + "</think>```python\n" + parts[1] + "\n```")
code_row = st.tuples(st.one_of(completions({}), with_code), st.integers(0, 5_000).map(
    lambda n: {**CODE_EXAMPLES[0], "prompt_ids": [1, 2, 3], "completion_tokens": n}))


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(code_row)
def test_code_fuzz(row):
  _check("code", *row, max_s=4.0, limits=sb.SandboxLimits(wall_s=2.0))
  assert sb.processes_of(uid_range=(sb.UID_BASE, sb.UID_BASE + sb.UID_SPAN)) == []
