"""Accuracy reward: equivalent forms pass; near-misses and hacks fail."""

import random

import pytest

from r1jax.data.tasks import countdown
from r1jax.rewards import accuracy, extract_answers, is_equivalent


def _r1(answer: str) -> str:
  return f"<think>let me work it out</think>\nThe answer is $\\boxed{{{answer}}}$."


# (gold, predicted final answer) that must score 1.
EQUIVALENT = [
    ("3", "3"), ("3", "3.0"), ("3", "\\frac{6}{2}"), ("3", "x = 3"),
    ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "1/2"), ("0.5", "\\dfrac{1}{2}"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\sqrt{8}", "2\\sqrt{2}"),
    ("12345", "12,345"), ("\\{1, 2\\}", "\\{2, 1\\}"), ("(1, 2]", "(1,2]"),
    ("x^2 + 2x + 1", "(x+1)^2"), ("-7", "-7"), ("\\pi/2", "\\frac{\\pi}{2}"),
    ("10\\%", "10\\%"), ("$\\frac{3}{4}$", "0.75"),
]
# Near misses that must score 0.
WRONG = [
    ("3", "-3"), ("3", "3.0000001"), ("3", "3 + x"), ("3", "4"),
    ("(1, 2]", "[1, 2]"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("2\\sqrt{2}", "\\sqrt{2}"),
    ("3", "3, 4"), ("3", "3 \\text{ or } 4"), ("3", "\\{3, 4\\}"), ("x^2", "x^3"),
]


@pytest.mark.parametrize("gold,pred", EQUIVALENT)
def test_equivalent_forms_score_one(gold, pred):
  assert accuracy(_r1(pred), {"answer": gold}) == 1.0


@pytest.mark.parametrize("gold,pred", WRONG)
def test_near_misses_score_zero(gold, pred):
  assert accuracy(_r1(pred), {"answer": gold}) == 0.0


HACKS = [
    # The right answer only inside the reasoning.
    "<think>maybe \\boxed{3}</think> the answer is \\boxed{4}",
    "<think>\\boxed{3}</think> I am not sure.",
    "<think>the answer is \\boxed{3} and I never stop thinking",
    # Several competing final answers.
    "<think>x</think> \\boxed{3} or \\boxed{4}",
    "<think>x</think> \\boxed{4} \\boxed{3}",
    "<think>x</think> \\boxed{1}\\boxed{2}\\boxed{3}\\boxed{4}\\boxed{5}",
    "<think>x</think> <answer>3</answer> <answer>4</answer>",
    "<think>x</think> <answer>3, 4, 5</answer>",
    # Malformed answers.
    "<think>x</think> \\boxed{3",
    "<think>x</think> <answer>3} \\boxed{4</answer>",
    "<think>x</think> </answer>3<answer>",
    "<think>x</think> <answer>3",
    # No answer at all.
    "<think>x</think> 3", "", "\\boxed{}", "<answer></answer>",
    # Huge answer.
    "<think>x</think> \\boxed{" + "3+" * 1000 + "0}",
]


@pytest.mark.parametrize("completion", HACKS)
def test_hacks_score_zero(completion):
  assert accuracy(completion, {"answer": "3"}) == 0.0


def test_final_answer_shapes():
  assert extract_answers("<think>a</think><answer> 42 </answer>") == ["42"]
  assert extract_answers("<think>a</think><answer>so \\boxed{7}</answer>") == ["7"]
  assert extract_answers("\\boxed{\\frac{1}{2}}") == ["\\frac{1}{2}"]
  assert extract_answers("<think>a</think>\\boxed{5} so \\boxed{5}") == ["5"]
  assert extract_answers("<think>a</think>\\boxed{\\{1\\}}") == ["\\{1\\}"]
  assert accuracy("<think>a</think><answer>\\frac{1}{2}</answer>", {"answer": "0.5"}) == 1.0
  # The same answer written twice in different forms is not competing.
  assert accuracy("<think>a</think>\\boxed{0.5}, i.e. \\boxed{\\frac12}", {"answer": "1/2"}) == 1.0


def test_exact_match_and_format_score():
  ex = {"answer": "(1 + 2) * 3", "match": "exact"}
  assert accuracy("<think>a</think><answer>(1 + 2) * 3</answer>", ex) == 1.0
  assert accuracy("<think>a</think><answer>(1+2)*3</answer>", ex) == 0.0
  assert accuracy("<think>a</think><answer>9</answer>", ex) == 0.0
  # The kwarg overrides the example's mode: as mathematics, (1 + 2) * 3 is 9.
  assert accuracy("<think>a</think><answer>9</answer>", ex, match="math") == 1.0
  assert accuracy("<think>a</think><answer>8</answer>", {"answer": 9}, format_score=0.1) == 0.1
  assert accuracy("<think>a</think>no answer", {"answer": 9}, format_score=0.1) == 0.0
  assert accuracy("<think>a</think><answer>9</answer>", {"answer": 9}, format_score=0.1) == 1.0
  with pytest.raises(ValueError, match="unknown match mode"):
    is_equivalent("1", "2", "fuzzy")


# Countdown (r1jax/data/tasks/countdown.py): numbers [2, 25, 28], target 39.
COUNTDOWN = countdown.sample(random.Random(1))
COUNTDOWN_RIGHT = ["(28 / 2) + 25", "25 + 28 / 2", "28 ÷ 2 + 25", "(25 + 28 / 2)"]
COUNTDOWN_WRONG = [
    "25 + 14",  # 14 is not given, though 25 + 14 = 39
    "28 / 2 + 25 + 2 - 2",  # 2 used three times
    "28 + 25 - 2",  # every number once, but 51
    "39",  # the bare target: what a numeric comparison would accept
    "28 / 2 + 25 = 39", "28/2+25 and 39",  # not an expression alone
]


def test_countdown_example_is_what_the_checker_expects():
  assert COUNTDOWN["match"] == "countdown"
  assert (COUNTDOWN["numbers"], COUNTDOWN["target"]) == ([2, 25, 28], 39)


@pytest.mark.parametrize("expr", COUNTDOWN_RIGHT)
def test_countdown_correct_equations_score_one(expr):
  assert accuracy(f"<think>try</think><answer>{expr}</answer>", COUNTDOWN) == 1.0
  assert accuracy(f"<think>try</think>so \\boxed{{{expr}}}", COUNTDOWN) == 1.0


@pytest.mark.parametrize("expr", COUNTDOWN_WRONG)
def test_countdown_illegal_equations_score_zero(expr):
  completion = f"<think>try</think><answer>{expr}</answer>"
  assert accuracy(completion, COUNTDOWN) == 0.0
  assert accuracy(completion, COUNTDOWN, format_score=0.1) == 0.1


def test_countdown_needs_every_candidate_right():
  two = "<think>try</think>\\boxed{25 + 28 / 2} or \\boxed{28 + 25 - 2}"
  assert accuracy(two, COUNTDOWN) == 0.0


def test_unknown_match_mode_is_an_error_even_without_an_answer():
  # Failing closed: a mode no checker handles must not quietly score 0.
  with pytest.raises(ValueError, match="unknown match mode 'fuzzy'.*countdown"):
    accuracy("no answer here", {"answer": "3", "match": "fuzzy"})
