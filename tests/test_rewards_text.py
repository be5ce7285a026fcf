"""Format, language and shaping rewards."""

import math

import numpy as np
import pytest

from r1jax.rewards import text as text_lib
from r1jax.rewards import (cosine_accuracy, dapo_overlong, format_checks, format_reward,
                           language, overlong, repetition, script_counts)

R1_ZERO_OK = ["<think>reason</think><answer>3</answer>",
              "  <think>\nreason\n</think>\n<answer> 3 </answer>\n"]
R1_ZERO_BAD = [
    "", "reason <answer>3</answer>", "<think>reason</think>", "<think></think><answer>3</answer>",
    "<think>reason</think>text<answer>3</answer>", "<think>reason</think><answer>3</answer>tail",
    "<think>a</think><think>b</think><answer>3</answer>", "x<think>reason</think><answer>3</answer>",
    "<think>reason</think><answer></answer>", "<think>reason</think><answer>3<answer></answer>",
    "<answer>3</answer><think>reason</think>", "</think>reason<think><answer>3</answer>",
    "<think>reason</think></answer>3<answer>", "<think>reason<answer>3</answer></think>",
]
R1_OK = ["<think>reason</think>So the answer is \\boxed{3}.", "<think>r</think>\n$\\boxed{\\frac{1}{2}}$"]
R1_BAD = ["<think>reason</think>So the answer is 3.", "<think>r \\boxed{3}</think> done",
          "<think>r</think><answer>\\boxed{3}</answer>", "<think>r</think> \\boxed{3",
          "\\boxed{3}", "<think>r</think>\\boxed{}", "<think>r</think><think>\\boxed{3}"]


@pytest.mark.parametrize("completion", R1_ZERO_OK)
def test_r1_zero_template_accepted(completion):
  assert format_reward(completion, {}) == 1.0
  assert format_reward(completion, {}, partial=True) == 1.0


@pytest.mark.parametrize("completion", R1_ZERO_BAD)
def test_r1_zero_template_rejected(completion):
  assert format_reward(completion, {}) == 0.0
  assert format_reward(completion, {}, partial=True) < 1.0


@pytest.mark.parametrize("completion", R1_OK)
def test_r1_template_accepted(completion):
  assert format_reward(completion, {}, mode="r1") == 1.0


@pytest.mark.parametrize("completion", R1_BAD)
def test_r1_template_rejected(completion):
  assert format_reward(completion, {}, mode="r1") == 0.0


def test_partial_credit_counts_checks():
  assert format_checks("<think>reason</think>", "r1_zero") == [True, True, False, False]
  assert format_reward("<think>reason</think>", {}, partial=True) == 0.5
  assert format_reward("<think>reason</think> hi", {}, mode="r1", partial=True) == 0.75
  assert format_reward("reason</think><answer>3</answer>", {}, think_in_prompt=True) == 1.0
  with pytest.raises(ValueError, match="unknown format mode"):
    format_reward("", {}, mode="r2")


LANGUAGE_CASES = [
    ("<think>We add the two numbers and get the sum.</think>", "en", 1.0),
    ("<think>我们把两个数相加得到和</think>", "zh", 1.0),
    ("<think>我们把两个数相加得到和</think>", "en", 0.0),
    ("<think>We add 两个数</think>", "en", 2 / 5),   # 2 English words, 3 Han characters
    ("<think>We add 两个数</think>", "zh-CN", 3 / 5),
    # Math and variables are neutral: only 计算 and 得 count.
    ("<think>计算 $x^2 + \\frac{1}{2} = y$ 得</think>", "Chinese", 1.0),
    ("<think>Считаем сумму</think>", "ru", 1.0),
    ("<think>1 + 2 = 3</think>", "en", 0.0),  # no words at all
    ("", "en", 0.0),
    ("no tags here at all", "en", 1.0),   # without tags the whole text is the CoT
    ("<think>the reasoning</think> 答案是三", "en", 1.0),  # only the CoT counts
]


@pytest.mark.parametrize("completion,lang,expected", LANGUAGE_CASES)
def test_language_share(completion, lang, expected):
  assert language(completion, {"language": lang}) == pytest.approx(expected)


def test_language_rule_details():
  assert script_counts("hello 世界 x \\alpha") == {"latin": 1, "han": 2}
  assert script_counts("ｈｅｌｌｏ") == {"latin": 1}  # full-width folded by NFKC
  with pytest.raises(ValueError, match="unsupported language"):
    language("x", {"language": "klingon"})


def test_dapo_overlong_matches_paper():
  # DAPO eq. 13 with L_max = 20480, L_cache = 4096.
  assert dapo_overlong(100, 20480, 4096) == 0.0
  assert dapo_overlong(16384, 20480, 4096) == 0.0
  assert dapo_overlong(16384 + 2048, 20480, 4096) == -0.5
  assert dapo_overlong(20480, 20480, 4096) == -1.0
  assert dapo_overlong(30000, 20480, 4096) == -1.0
  assert overlong("x" * 15, {}, max_len=10, cache_len=5, unit="chars") == -1.0
  assert overlong("", {"completion_tokens": 8}, max_len=10, cache_len=4) == -0.5
  with pytest.raises(KeyError, match="completion_tokens.*rollout"):
    overlong("abc", {})
  # A count that is not one fails too, rather than reading as a short completion.
  for bogus in (-1, 2.5, "8", None, True):
    with pytest.raises(ValueError, match="token count"):
      overlong("abc", {"completion_tokens": bogus})
    with pytest.raises(ValueError, match="token count"):
      cosine_accuracy("abc", {"answer": "3", "completion_tokens": bogus})
  assert overlong("", {"completion_tokens": np.int32(8)}, max_len=10, cache_len=4) == -0.5


def test_cosine_accuracy_endpoints():
  right, wrong = "<think>a</think>\\boxed{3}", "<think>a</think>\\boxed{4}"
  kw = dict(max_len=100, correct=(2.0, 1.0), wrong=(-10.0, 0.0), exceed=-10.0)
  assert cosine_accuracy(right, {"answer": "3", "completion_tokens": 0}, **kw) == 2.0
  assert cosine_accuracy(right, {"answer": "3", "completion_tokens": 100}, **kw) == pytest.approx(1.0)
  assert cosine_accuracy(right, {"answer": "3", "completion_tokens": 50}, **kw) == pytest.approx(1.5)
  assert cosine_accuracy(wrong, {"answer": "3", "completion_tokens": 0}, **kw) == -10.0
  assert cosine_accuracy(wrong, {"answer": "3", "completion_tokens": 100}, **kw) == pytest.approx(0.0)
  assert cosine_accuracy(right, {"answer": "3", "completion_tokens": 101}, **kw) == -10.0
  # Monotone: a shorter correct answer earns more.
  values = [cosine_accuracy(right, {"answer": "3", "completion_tokens": t}, **kw)
            for t in range(0, 101, 10)]
  assert values == sorted(values, reverse=True)


def test_repetition_penalty():
  assert repetition("the cat sat on the mat", {}) == 0.0
  assert repetition("a b", {}) == 0.0
  looped = "I think so. " * 50
  assert -1.0 <= repetition(looped, {}) < -0.9
  assert math.isclose(repetition("a b c a b c", {}, ngram=3), -1.0 * (1 - 3 / 4))


def test_reflective_words_are_counted_in_the_reasoning_only():
  cot = ("<think>Try 3 + 4 = 7. Wait, 7 is not 12. Try again. Let me CHECK: 3 * 4 = 12. "
         "The waiter checks nothing; however it works. 等等，再试，验证一下。</think> "
         "<answer>wait 3 * 4</answer>")
  # wait, again, CHECK, however (not "waiter" or "checks"), 等等, 再试, 验证; the answer's
  # "wait" is not reasoning.
  assert text_lib.reflective_words(cot) == 7
  assert text_lib.reflective_words("<think>3 + 4 = 7.</think> <answer>7</answer>") == 0
  # A completion that never closes its thinking is all reasoning.
  assert text_lib.reflective_words("<think>wait wait") == 2
