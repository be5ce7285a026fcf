"""Tasks: deterministic disjoint splits, solvable countdown, a safe checker, strict readers."""

import os
import random
import re
import time
from fractions import Fraction

import pytest

from r1jax.data import tasks
from r1jax.data.tasks import arithmetic, countdown, general

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
_HAN = re.compile("[\u4e00-\u9fff]")


# ------------------------------------------------------------------ registry


def test_unknown_task_and_option_are_clear_errors():
  known = r"\['arithmetic', 'countdown', 'general'\]"
  with pytest.raises(ValueError, match=r"unknown task 'gsm9k'.*" + known):
    tasks.make_splits("gsm9k", n_train=1, n_eval=1, seed=0)
  with pytest.raises(ValueError, match=r"unknown options \['max_steps'\].*min_numbers"):
    tasks.make_splits("countdown", n_train=1, n_eval=1, seed=0, max_steps=3)
  with pytest.raises(ValueError, match="min_steps <= max_steps"):
    tasks.make_splits("arithmetic", n_train=1, n_eval=1, seed=0, min_steps=3, max_steps=1)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_splits_are_deterministic_and_held_out_is_disjoint(name):
  task = tasks.get(name)
  train, held = tasks.make_splits(name, n_train=600, n_eval=60, seed=0)
  assert (train, held) == tasks.make_splits(name, n_train=600, n_eval=60, seed=0)
  # A training set does not depend on how much is held out.
  assert tasks.make_splits(name, n_train=600, n_eval=5, seed=0)[0] == train
  other_train, other_held = tasks.make_splits(name, n_train=600, n_eval=60, seed=1)
  assert other_train != train
  keys = lambda xs: {task.key(e) for e in xs}
  # Disjoint by problem (any language), also across seeds; held-out problems are distinct.
  assert not keys(train) & keys(held)
  assert not keys(other_train) & keys(held) and not keys(train) & keys(other_held)
  assert len(keys(held)) == len(held) == 60


def test_too_small_a_problem_space_says_so():
  with pytest.raises(ValueError, match="problem space is too small"):
    tasks.make_splits("arithmetic", n_train=0, n_eval=500, seed=0, min_steps=1, max_steps=1)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_examples_carry_the_reward_fields_in_two_languages(name):
  train, _ = tasks.make_splits(name, n_train=400, n_eval=0, seed=3, zh_fraction=0.5)
  for e in train:
    assert {"question", "answer", "cot", "language", "match"} <= set(e)
    assert all(isinstance(e[k], str) and e[k] for k in ("question", "answer", "cot"))
    if e.get("direct"):  # the general slice answers at once: one fixed sentence
      assert e["cot"] == general.DIRECT[e["language"]]
    else:
      assert e["cot"].endswith(e["answer"] + ("。" if e["language"] == "zh" else "."))
    has_han = bool(_HAN.search(e["question"])) and bool(_HAN.search(e["cot"]))
    assert has_han == (e["language"] == "zh"), e
  share_zh = sum(e["language"] == "zh" for e in train) / len(train)
  assert 0.4 < share_zh < 0.6


def test_arithmetic_answers_are_exact_integers_of_their_expression():
  rng = random.Random(0)
  for _ in range(300):
    e = arithmetic.sample(rng, min_steps=1, max_steps=4)
    assert e["match"] == "exact"
    value, _ = countdown.evaluate(e["expression"])  # the same + - × grammar
    assert value == int(e["answer"])


def test_drifting_solution_switches_to_english_once_and_stays_correct():
  from r1jax.pipeline.context import pretrain_document
  from r1jax.rewards.language import language
  rng = random.Random(1)
  scores = []
  for _ in range(200):
    e = arithmetic.make_example(rng, rng.randint(1, 4), "zh")
    drifted = arithmetic.drifting_cot(e, rng)
    chinese = [bool(_HAN.search(x)) for x in re.split(r"(?<=[。.]) ", drifted)]
    # Chinese first, then English to the end: one switch, after at least one sentence.
    assert chinese[0] and not chinese[-1] and chinese == sorted(chinese, reverse=True), drifted
    assert drifted.endswith(f"So the answer is {e['answer']}.")
    # The same steps and numbers, only the words around them change.
    assert re.findall(r"-?\d+", drifted) == re.findall(r"-?\d+", e["cot"])
    scores.append(language(f"<think> {drifted} </think>", e))
  assert 0.2 < min(scores) and max(scores) < 1.0
  english = arithmetic.make_example(rng, 3, "en")
  assert arithmetic.drifting_cot(english, rng) == english["cot"]
  # In pre-training documents: that share of the Chinese ones drift, none of the English.
  docs = [pretrain_document(arithmetic.make_example(rng, 3, lang), "plain", rng,
                            mixed_language_rate=0.5) for lang in ["zh"] * 400 + ["en"] * 50]
  drifted_share = sum("So the answer" in d for d in docs[:400]) / 400
  assert 0.42 < drifted_share < 0.58
  assert all("Then," in d for d in docs[400:])


# ----------------------------------------------------------------- countdown


@pytest.mark.parametrize("lo,hi", [(3, 4), (2, 2), (5, 6)])
def test_countdown_is_always_solvable_with_a_worked_search(lo, hi):
  rng = random.Random(lo)
  for _ in range(400):
    e = countdown.sample(rng, min_numbers=lo, max_numbers=hi, max_misses=3, zh_fraction=0.3)
    assert lo <= len(e["numbers"]) <= hi and 1 <= e["target"] <= 100
    assert all(1 <= n <= 50 for n in e["numbers"])
    assert e["match"] == "countdown"
    assert countdown.check_countdown(e["answer"], e["numbers"], e["target"]), e
    assert str(e["target"]) in e["question"]
    # Each missed attempt ends on a wrong value; the last attempt hits.
    misses = re.findall(r"(\d+) (?:is not|不等于) (\d+)", e["cot"])
    assert all(int(v) != e["target"] and int(t) == e["target"] for v, t in misses)
    assert len(misses) <= 3


def _reference_value(expr: str) -> Fraction:
  # The test builds `expr` itself, so eval is safe here; Fractions make `/` exact.
  return eval(re.sub(r"\d+", lambda m: f"F({m.group()})", expr), {"F": Fraction})  # noqa: S307


def _random_expression(rng: random.Random, numbers: list[int]) -> str:
  parts = [str(n) for n in numbers]
  while len(parts) > 1:
    i, j = sorted(rng.sample(range(len(parts)), 2))
    b, a = parts.pop(j), parts.pop(i)
    parts.append(f"({a} {rng.choice('+-*/')} {b})" if rng.random() < 0.7 else
                 f"{a} {rng.choice('+-*/')} {b}")
  return parts[0]


def test_evaluator_agrees_with_python_on_random_expressions():
  rng = random.Random(0)
  checked = 0
  for _ in range(500):
    numbers = [rng.randint(0, 30) for _ in range(rng.randint(2, 5))]
    expr = _random_expression(rng, numbers)
    try:
      want = _reference_value(expr)
    except ZeroDivisionError:
      assert countdown.evaluate(expr) is None
      continue
    value, literals = countdown.evaluate(expr)
    assert value == want, expr
    assert sorted(literals) == sorted(numbers)
    if want.denominator == 1:
      assert countdown.check_countdown(expr, numbers, int(want))
      assert not countdown.check_countdown(expr, numbers, int(want) + 1)
      checked += 1
  assert checked > 300


@pytest.mark.parametrize("expr", [
    "50 + 25 + 7 - 3",  # well-formed, but 79
    "71",  # the bare target
    "(50 + 25) - (7 - 3) + 3 - 3",  # 71, but 3 used three times
    "(50 + 25) - (7 - 3) * (7 / 7)",  # 71, but 7 used three times
    "50 + 25 - 4",  # 71 from a number not given, 7 and 3 unused
    "50 + 25 - (7 - 3) + 0",  # an extra number
    "-(7 - 3) + 50 + 25",  # unary minus
    "(50 + 25) - (7 - 3) ** 1",  # a power
    "9 ** 9 ** 9 ** 9",  # a huge exponent never runs
    "__import__('os').system('true')",
    "x + 50 + 25 - (7 - 3)",  # a name
    "abs(50) + 25 - (7 - 3)",  # a call
    "50.0 + 25 - (7 - 3)",  # a decimal
    "50 + 25 - (07 - 3)",  # a leading zero
    "50 + 25 - (7 - 3) + 7 / (3 - 3)",  # division by zero
    "(50 + 25 - (7 - 3)",  # unbalanced
    "50 + 25 - (7 - 3) = 71",  # an equation, not an expression
    "",
])
def test_check_countdown_rejects_wrong_and_unsafe_answers(expr):
  assert countdown.check_countdown(expr, [50, 25, 7, 3], 71) is False


def test_check_countdown_accepts_any_correct_form():
  for expr in ["(50 + 25) - (7 - 3)", "50+25-7+3", "  50 + 25 + 3 - 7 ", "3 - 7 + 25 + 50",
               "((50)) + 25 - (7 - 3)", "50 + 25 − 7 + 3"]:
    assert countdown.check_countdown(expr, [50, 25, 7, 3], 71), expr
  assert countdown.check_countdown("8 × 3 ÷ 2", [2, 3, 8], 12)
  # Fractions in the middle are fine when the whole is exact: 8 / (3 - 8/3) = 24.
  assert countdown.check_countdown("8 / (3 - 8 / 3)", [8, 3, 8, 3], 24)


def test_check_countdown_is_bounded_on_hostile_input():
  t0 = time.perf_counter()
  assert not countdown.check_countdown("1+" * 5000 + "1", [1, 1], 2)
  assert not countdown.check_countdown("(" * 90 + "1 + 1" + ")" * 90, [1, 1], 2)
  assert not countdown.check_countdown("9" * 100 + " + 1", [1], 1)
  assert time.perf_counter() - t0 < 0.5
  with pytest.raises(ValueError, match="numbers must be a list of ints"):
    countdown.check_countdown("1 + 2", "12", 3)
  with pytest.raises(ValueError, match="target must be an int"):
    countdown.check_countdown("1 + 2", [1, 2], "3")


# --------------------------------------------------------------------- JSONL


def test_read_math_accepts_documented_aliases():
  examples = tasks.read_math(os.path.join(FIXTURES, "math.jsonl"))
  assert examples[0] == {"question": "What is 6 times 7?", "answer": "42", "language": "en",
                         "match": "math"}
  assert examples[1]["question"] == "Simplify $\\sqrt{8}$."  # "problem"
  assert examples[1]["cot"].endswith("$\\boxed{2\\sqrt{2}}$.")  # "solution" is a cot
  assert examples[2] == {"question": "3 加 4 等于几？", "answer": "7", "language": "zh",
                         "match": "exact"}  # numbers become strings; blank line skipped


def test_read_code_fixture():
  examples = tasks.read_code(os.path.join(FIXTURES, "code.jsonl"))
  assert [len(e["tests"]) for e in examples] == [2, 1]
  assert examples[0]["question"].startswith("Write a function add")
  assert [e["language"] for e in examples] == ["en", "zh"]


_GOOD_MATH = '{"question": "q", "answer": "1"}'
_GOOD_CODE = '{"prompt": "p", "tests": ["assert f() == 1"]}'


@pytest.mark.parametrize("reader,bad,message", [
    ("math", '{"question": "q", "answer": "1"', "not valid JSON"),
    ("math", '["q", "1"]', "expected a JSON object, got list"),
    ("math", '{"answer": "1"}', "missing field 'question' \\(or 'problem'\\)"),
    ("math", '{"question": "q"}', "missing field 'answer'"),
    ("math", '{"question": "q", "problem": "q", "answer": "1"}', "both 'question' and 'problem'"),
    ("math", '{"question": 3, "answer": "1"}', "'question' must be a non-empty string"),
    ("math", '{"question": "q", "answer": true}', "'answer' must be a string or a number"),
    ("math", '{"question": "q", "answer": " "}', "'answer' is empty"),
    ("math", '{"question": "q", "answer": "1", "match": "fuzzy"}', "'match' must be one of"),
    ("code", '{"prompt": "p"}', "missing field 'tests'"),
    ("code", '{"prompt": "p", "tests": "assert f() == 1"}', "'tests' must be a non-empty list"),
    ("code", '{"prompt": "p", "tests": []}', "'tests' must be a non-empty list"),
    ("code", '{"prompt": "p", "tests": ["assert f()", 3]}', "'tests' must be a non-empty list"),
    ("code", '{"tests": ["assert f()"]}', "missing field 'prompt'"),
])
def test_malformed_records_name_the_file_and_line(tmp_path, reader, bad, message):
  good = _GOOD_MATH if reader == "math" else _GOOD_CODE
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join([good, "", bad, good]) + "\n", encoding="utf-8")
  read = tasks.read_math if reader == "math" else tasks.read_code
  with pytest.raises(tasks.DataError, match=re.escape(f"{path}:3: ") + ".*" + message):
    read(str(path))


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    tasks.read_math(str(tmp_path / "nope.jsonl"))
