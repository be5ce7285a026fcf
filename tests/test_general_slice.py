"""The non-reasoning "general" slice: its task, the documents and SFT rows it makes,
the preference-style reward of alignment RL, its votes, and its config errors."""

import random

import pytest

from r1jax.data import tokenizer as tokenizer_lib
from r1jax.data.tasks import general, make_splits
from r1jax.eval import metrics
from r1jax.pipeline import validate as validate_lib
from r1jax.pipeline.context import general_splits, pretrain_document
from r1jax.rewards import RewardSpec, accuracy, language, preference
from tests.experiment_loader import load_config


def test_requests_and_answers():
  e = general.make_example(["cat", "sun", "red"], "first", "en")
  assert (e["question"], e["answer"]) == ("Which word comes first: cat sun red?", "cat")
  e = general.make_example(["cat", "sun", "red"], "last", "en")
  assert (e["question"], e["answer"]) == ("Which word comes last: cat sun red?", "red")
  e = general.make_example(["猫", "日", "红"], "last", "zh")
  assert (e["question"], e["answer"]) == ("最后一个词是什么：猫 日 红？", "红")
  assert e["cot"] == general.DIRECT["zh"] and e["direct"] and e["match"] == "exact"
  with pytest.raises(ValueError, match="kind must be one of"):
    general.make_example(["cat"], "sort", "en")
  with pytest.raises(ValueError, match=r"words \['猫'\] are not in the en vocabulary"):
    general.make_example(["cat", "猫"], "first", "en")
  with pytest.raises(ValueError, match="min_words"):
    general.sample(random.Random(0), min_words=4, max_words=3)


def test_splits_are_deterministic_and_disjoint_across_languages():
  train, held_out = make_splits("general", n_train=400, n_eval=40, seed=3, zh_fraction=0.5)
  again = make_splits("general", n_train=400, n_eval=40, seed=3, zh_fraction=0.5)
  assert (train, held_out) == again
  assert {e["language"] for e in train} == {"en", "zh"}
  assert {e["kind"] for e in train} == set(general.KINDS)
  # One request in two languages is one problem: the same key, so the same side.
  en = general.make_example(["cat", "sun", "red"], "last", "en")
  zh = general.make_example(["猫", "日", "红"], "last", "zh")
  assert general.problem_key(en) == general.problem_key(zh)
  assert not {general.problem_key(e) for e in train} & {general.problem_key(e) for e in held_out}
  for e in train[:50]:
    assert e["answer"] == e["words"][0 if e["kind"] == "first" else -1]
    assert 3 <= len(e["words"]) <= 5 and " ".join(e["words"]) in e["question"]


def test_documents_and_sft_rows_answer_at_once():
  e = general.make_example(["cat", "sun"], "last", "en")
  assert (pretrain_document(e, "plain") ==
          "Question: Which word comes last: cat sun?\nThe answer is sun.")
  doc = pretrain_document(e, "r1_zero", random.Random(0), direct_answer_rate=0.0)
  assert "<think> I will answer directly. </think>" in doc
  assert "<answer> sun </answer>" in doc
  response = tokenizer_lib.get_template("r1_chat").response(e["cot"], e["answer"])
  assert response == "I will answer directly.\n</think>\n\n\\boxed{sun}"
  assert general.answers_at_once(" 直接回答。\n") and not general.answers_at_once("3 + 4 = 7.")
  # The SFT row earns every rule reward and the full preference score.
  ex = dict(e)
  assert accuracy(response, ex) == 1.0 and language(response, ex) == 1.0
  assert preference(response, ex) == 1.0


def test_preference_reward():
  e = general.make_example(["cat", "sun"], "last", "en")
  direct = "I will answer directly.\n</think>\n\n\\boxed{sun}"
  assert preference(direct, e) == 1.0
  assert preference("I will answer directly.\n</think>\n\nIt is \\boxed{sun}.", e) == 0.5
  assert preference("Sure.\n</think>\n\n\\boxed{sun} \\boxed{cat}", e) == 0.5
  # 12 reasoning words: 4 beyond the limit of 8 cost half of the brevity half.
  twelve = " ".join(["word"] * 12) + "\n</think>\n\n\\boxed{sun}"
  assert preference(twelve, e) == pytest.approx(0.75)
  long = " ".join(["word"] * 40) + "\n</think>\n\n\\boxed{sun}"
  assert preference(long, e) == 0.5
  assert preference(" ".join(["word"] * 40), e) == 0.0  # never stopped thinking
  # The R1-Zero shape: the answer tags hold the answer alone.
  assert preference("<think> ok </think> <answer> sun </answer>", e) == 1.0
  assert preference("<think> ok </think> <answer> sun </answer> cat", e) == 0.5
  # Reasoning prompts are left to the rule rewards: a constant, whatever the completion.
  arith = {"question": "Compute 2 + 3.", "answer": "5", "match": "exact", "language": "en"}
  assert preference(long, arith) == preference(direct, arith) == 1.0
  assert RewardSpec.create([("preference", 0.5)]).terms[0].bounds() == (0.0, 1.0)
  with pytest.raises(ValueError, match="max_think_words"):
    preference(direct, e, max_think_words=0)


def test_votes_of_exact_benchmarks_compare_strings():
  # math-verify reads words as products of symbols: "star" and "rats" are one answer.
  assert metrics.math_same("star", "rats")
  exact = [{"match": "exact"}] * 3
  assert metrics.same_for(exact) is metrics.exact_same
  assert metrics.same_for([{"match": "math"}]) is metrics.math_same
  assert metrics.vote(["rats", "star", " star"], metrics.same_for(exact)) == 1
  assert metrics.vote(["rats", "star", "star"], metrics.math_same) == 0


def _config(**changes):
  c = load_config("experiments/r1/tiny.py")
  with c.unlocked():
    for path, value in changes.items():
      *parents, key = path.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[key] = value
  return c


@pytest.mark.parametrize("changes, message", [
    ({"stages.sft.general_rows": 5000},
     "stages.sft: general_rows=5000: the general slice has data.general_n_train=1024"),
    ({"data.general_n_train": 0},
     "stages.sft: general_rows=384: the general slice has data.general_n_train=0"),
    ({"data.general_n_eval": 0},
     "stages.eval_cold_start: benchmarks entry 'general': 'task:general' needs the general "
     "slice"),
    ({"stages.eval.benchmarks": (("x", "task:generl"),)},
     "stages.eval: benchmarks entry 'x': unknown split 'task:generl'"),
])
def test_config_errors_name_the_key(changes, message):
  with pytest.raises(validate_lib.ConfigError) as e:
    validate_lib.validate(_config(**changes), n_devices=1)
  assert message in str(e.value)


def test_the_r1_experiment_mixes_the_slice_in():
  c = load_config("experiments/r1/tiny.py")
  train, held_out = general_splits(c)
  assert (len(train), len(held_out)) == (1024, 64)
  assert c.stages.sft.general_rows and c.stages.alignment_rl.general_prompts
  assert not c.stages.reasoning_rl.general_prompts  # R1's reasoning RL is reasoning only
  assert "preference" in [t[0] for t in c.stages.alignment_rl.rewards]
  assert ("general", "task:general") in c.stages.eval.benchmarks
  # Off by default: the main job draws no general requests.
  assert general_splits(load_config("experiments/r1_zero/tiny.py")) == ([], [])
