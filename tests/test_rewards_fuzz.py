"""Property-based fuzzing: arbitrary unicode plus adversarial tags and brackets.

Every reward must return a float in its documented range, never raise on
completion text, and return quickly.
"""

import math
import time

from hypothesis import given, settings, strategies as st

from r1jax.rewards import (accuracy, code, cosine_accuracy, format_reward, language,
                           overlong, repetition)
from r1jax.rewards import sandbox as sb

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "\\boxed", "{", "}",
             "\\{", "\\}", "$", "$$", "\\(", "\\)", "\\frac{1}{2}", "3", "x", "=", "^{9^{9}}",
             "```python\n", "```\n", "```", "\n", " ", "def f():\n  return 1\n", "我们", "Считаем",
             "\ud800", "\x00", "\u202e", "<think", "</", "(", "]", "1/0", "\\sqrt{", "\\text{"]
completions = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)),
                       max_size=30).map("".join)
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def _check(fn, completion, example, lo, hi, max_s=5.0, **kwargs):
  start = time.monotonic()
  value = fn(completion, example, **kwargs)
  assert time.monotonic() - start < max_s
  assert isinstance(value, float) and math.isfinite(value)
  assert lo <= value <= hi, value


@SETTINGS
@given(completions, st.sampled_from(["3", "\\frac{1}{2}", "(1, 2]", "x^2"]))
def test_accuracy_fuzz(completion, answer):
  _check(accuracy, completion, {"answer": answer}, 0.0, 1.0)
  _check(accuracy, completion, {"answer": answer, "match": "exact"}, 0.0, 1.0)
  _check(accuracy, completion, {"answer": answer}, 0.0, 1.0, format_score=0.1)


@SETTINGS
@given(completions, st.sampled_from(["r1_zero", "r1"]), st.booleans(), st.booleans())
def test_format_fuzz(completion, mode, partial, think_in_prompt):
  _check(format_reward, completion, {}, 0.0, 1.0, mode=mode, partial=partial,
         think_in_prompt=think_in_prompt)


@SETTINGS
@given(completions, st.sampled_from(["en", "zh", "ja", "ko", "ru"]))
def test_language_fuzz(completion, lang):
  _check(language, completion, {"language": lang}, 0.0, 1.0)


@SETTINGS
@given(completions, st.integers(0, 50_000))
def test_shaping_fuzz(completion, tokens):
  ex = {"answer": "3", "completion_tokens": tokens}
  _check(overlong, completion, ex, -1.0, 0.0)
  _check(cosine_accuracy, completion, ex, -1.0, 1.0)
  _check(repetition, completion, ex, -1.0, 0.0)


PROGRAM = ["def f():\n", "  return 1\n", "return", "1", "(", ")", ":", "\n", "  ", "import os\n",
           "raise SystemExit\n", "f = lambda: 1\n", "\ud800", "\\", "'", '"""', "\x00"]
with_code = st.tuples(completions, st.lists(st.one_of(st.sampled_from(PROGRAM), st.text(max_size=8)),
                                            max_size=12).map("".join)).map(
    lambda parts: parts[0] + "</think>```python\n" + parts[1] + "\n```")


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(st.one_of(completions, with_code))
def test_code_fuzz(completion):
  limits = sb.SandboxLimits(wall_s=2.0)
  _check(code, completion, {"tests": ["assert f() == 1"]}, 0.0, 1.0, max_s=4.0, limits=limits)
  assert sb.processes_of(uid_range=(sb.UID_BASE, sb.UID_BASE + sb.UID_SPAN)) == []
