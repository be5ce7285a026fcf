"""Evaluation: pass@k and cons@k by hand, benchmark layouts, sampling settings, stage seeds."""

import itertools
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from r1jax.data import tasks
from r1jax.eval import benchmarks, evaluate as eval_lib, metrics
from r1jax.parallel import mesh as mesh_lib
from r1jax.pipeline import stages
from r1jax.pipeline.context import Context
from r1jax.rl.rollout import SamplingConfig, generate
from tests.experiment_loader import load_config


# ------------------------------------------------------------------ pass@k, cons@k

def _brute_pass_at_k(correct: list[bool], k: int) -> float:
  """The definition: the share of k-subsets holding a correct sample."""
  subsets = list(itertools.combinations(correct, k))
  return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_by_hand_and_by_enumeration():
  assert metrics.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
  assert metrics.pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
  assert metrics.pass_at_k(8, 0, 8) == 0.0  # all wrong
  assert metrics.pass_at_k(8, 1, 8) == 1.0  # k = n: any correct sample is drawn
  assert metrics.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 = c/n
  for correct in ([1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1], [1] * 6, [0] * 6):
    for k in range(1, 7):
      assert metrics.pass_at_k(6, sum(correct), k) == pytest.approx(
          _brute_pass_at_k([bool(c) for c in correct], k)), (correct, k)
  with pytest.raises(ValueError):
    metrics.pass_at_k(4, 1, 5)


def test_vote_counts_equivalent_forms_as_one_answer():
  # 1/2, 0.5 and \frac12 are one answer (3 votes) and beat "3" (2 votes).
  assert metrics.vote(["3", "1/2", "0.5", "3", "\\frac12"]) == 1
  assert metrics.vote(["\\frac{1}{2}", "0.5"]) == 0
  assert metrics.math_same("1/2", "\\frac12") and not metrics.math_same("1/2", "2")


def test_vote_ties_go_to_the_answer_seen_first():
  assert metrics.vote(["4", "3", "3", "4"]) == 0  # 2 vs 2: "4" came first
  assert metrics.vote(["3", "4", "4", "3"]) == 0
  assert metrics.vote([None, "7", "8"]) == 1  # 1 vs 1, None casts no vote
  assert metrics.vote([None, None]) is None
  assert metrics.vote([None, "2", "5", "5"]) == 2  # a strict majority beats first-seen


def test_benchmark_metrics_by_hand():
  # Prompt 0: 2 right ("1/2", "0.5" one answer) tie 2-2 with a wrong "7": the first seen wins.
  # Prompt 1: 1 right, and "2" wins the vote with two wrong votes.
  correct = [[True, True, False, False], [True, False, False, False]]
  answers = [["1/2", "0.5", "7", "7"], ["\\frac12", None, "2", "2"]]
  m = metrics.benchmark_metrics(np.array(correct), answers, pass_ks=(1, 2, 4, 16))
  assert m["pass@1"] == pytest.approx(3 / 8)
  assert m["pass@2"] == pytest.approx((5 / 6 + 1 / 2) / 2)
  assert m["pass@4"] == 1.0  # k = n: the share of prompts with any correct sample
  assert "pass@16" not in m  # more than the k samples drawn
  assert m["cons@4"] == 0.5
  wrong = metrics.benchmark_metrics(np.zeros((3, 4), bool), [["5"] * 4] * 3, (4,))
  assert wrong == {"pass@1": 0.0, "pass@4": 0.0, "cons@4": 0.0}


def test_summarise_reads_sample_records():
  records = [dict(extracted=a, correct=c, tokens=t, finished=f, format=1.0, language=1.0,
                  reflective=r, at_once=t == 10)
             for a, c, t, f, r in [("12", True, 10, True, 0), ("12", True, 20, True, 3),
                                   ("11", False, 64, False, 1), (None, False, 64, False, 0)]]
  m = eval_lib.summarise(records, k=2, pass_ks=(2,))
  assert m["n_prompts"] == 2 and m["k"] == 2
  assert m["pass@1"] == 0.5 and m["cons@2"] == 0.5 and m["pass@2"] == 0.5
  assert m["response_len"] == pytest.approx(39.5) and m["truncated"] == 0.5
  assert m["answered"] == 0.75 and m["reflective_words"] == 1.0 and m["at_once"] == 0.25
  assert m["mixed"] == 0.0 and "mixed/en" not in m  # one prompt language: no split


def test_summarise_splits_language_mixing_by_prompt_language():
  # Two Chinese prompts (one sample drifts into English: consistency 0.6) and one
  # English prompt (all English), two samples each.
  rows = [("zh", 1.0), ("zh", 0.6), ("zh", 1.0), ("zh", 1.0), ("en", 1.0), ("en", 1.0)]
  records = [dict(extracted="1", correct=True, tokens=5, finished=True, format=1.0,
                  language=score, prompt_language=lang, reflective=0, at_once=False)
             for lang, score in rows]
  m = eval_lib.summarise(records, k=2)
  assert m["mixed"] == pytest.approx(1 / 6) and m["language"] == pytest.approx(5.6 / 6)
  assert m["mixed/zh"] == pytest.approx(1 / 4) and m["language/zh"] == pytest.approx(0.9)
  assert m["mixed/en"] == 0.0 and m["language/en"] == 1.0


def test_extracted_answer_is_the_one_final_answer():
  assert eval_lib.extracted_answer("<think> 3 + 4 = 7 </think> <answer> 7 </answer>") == "7"
  assert eval_lib.extracted_answer("x\n</think>\n\n\\boxed{\\frac12}") == "\\frac12"
  assert eval_lib.extracted_answer("</think> \\boxed{3} or \\boxed{4}") is None
  assert eval_lib.extracted_answer("no answer here") is None


# ------------------------------------------------------------------ benchmark layouts

def _write(tmp_path, rows, name="bench.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n",
                  encoding="utf-8")
  return str(path)


GSM8K = {"question": "Natalia sold 48 clips in April and half as many in May. How many?",
         "answer": "In May she sold 48/2 = <<48/2=24>>24.\nAltogether 48+24 = <<48+24=72>>72."
                   "\n#### 1,072"}
MATH500 = {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
           "solution": "Add: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.",
           "answer": "\\frac{3}{4}", "subject": "Prealgebra", "level": 1}
AIME = {"problem": "Find the remainder when 2024 is divided by 1000.", "answer": 24, "id": 1}


@pytest.mark.parametrize("layout", ["auto", "gsm8k"])
def test_gsm8k_gold_is_what_follows_the_marks(tmp_path, layout):
  [e] = tasks.read_math(_write(tmp_path, [GSM8K]), layout)
  assert e["answer"] == "1072"  # commas dropped; not the whole solution
  assert e["cot"].startswith("In May") and "####" not in e["cot"]
  assert e["question"] == GSM8K["question"]


@pytest.mark.parametrize("layout", ["auto", "math500"])
def test_math500_gold_is_the_answer_field(tmp_path, layout):
  [e] = tasks.read_math(_write(tmp_path, [MATH500]), layout)
  assert e["answer"] == "\\frac{3}{4}" and e["cot"] == MATH500["solution"]
  assert e["match"] == "math"


@pytest.mark.parametrize("layout", ["auto", "aime"])
def test_aime_gold_is_the_answer_number(tmp_path, layout):
  [e] = tasks.read_math(_write(tmp_path, [AIME]), layout)
  assert e == {"question": AIME["problem"], "answer": "24", "language": "en", "match": "math"}


@pytest.mark.parametrize("layout,bad,message", [
    ("gsm8k", {"question": "q", "answer": "72"}, "needs the final answer after '####'"),
    ("math500", {"problem": "q", "answer": "1"}, "layout 'math500' needs field 'solution'"),
    ("aime", {"question": "q", "answer": "1"}, "layout 'aime' needs field 'problem'"),
    ("auto", {"question": "q", "answer": "#### "}, "'answer' is empty"),
    ("auto", '{"problem": "q", "answer": 1', "not valid JSON"),
])
def test_bad_benchmark_line_names_file_and_line(tmp_path, layout, bad, message):
  good = {"gsm8k": GSM8K, "math500": MATH500, "aime": AIME, "auto": AIME}[layout]
  path = _write(tmp_path, [good, bad, good])
  with pytest.raises(tasks.DataError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
    tasks.read_math(path, layout)


def test_benchmark_specs_are_checked(tmp_path):
  path = _write(tmp_path, [AIME])
  got = benchmarks.parse([("held_out", benchmarks.HELD_OUT), ("aime", path, "aime")])
  assert [b.name for b in got] == ["held_out", "aime"]
  loaded = benchmarks.load(got, held_out=[{"question": "q", "answer": "1"}] * 5, max_prompts=3)
  assert [len(e) for _, e in loaded] == [3, 1]
  assert benchmarks.parse([("file", "experiments/data/arith_math500.jsonl")])  # from the root
  for specs, message in [((), "empty"), ((("a", path), ("a", path)), "used twice"),
                         ((("a", path, "gsm9k"),), "layout 'gsm9k'"),
                         ((("a", str(tmp_path / "nope.jsonl")),), "no file"),
                         ((("a",),), "expected \\(name, source\\)")]:
    with pytest.raises(ValueError, match=message):
      benchmarks.parse(specs)


def test_committed_math_file_is_math500_layout():
  examples = tasks.read_math(benchmarks.Benchmark("f", "experiments/data/arith_math500.jsonl").path,
                             "math500")
  assert len(examples) == 100 and all(e["answer"].isdigit() for e in examples)


# ------------------------------------------------------------------ sampling settings

def test_top_k_restricts_sampling():
  """top_k=2 draws only the two best tokens; top_k=1 is greedy; top_k=0 draws them all."""
  V = 6
  logits_V = jnp.log(jnp.array([0.3, 0.05, 0.25, 0.1, 0.2, 0.1]))

  def decode(state, tokens_BxT, positions_BxT, start, valid_BxS):
    return jnp.broadcast_to(logits_V, tokens_BxT.shape[:1] + (1, V)), state

  prompts = jnp.ones((64, 2), jnp.int32)

  def drawn(top_k):
    ro = generate(decode, None, prompts, jnp.full((64,), 2), jax.random.key(0),
                          max_new_tokens=8, settings=SamplingConfig(1.0, 1.0, top_k),
                          eos_id=None, pad_id=0)
    return set(np.asarray(ro.tokens).ravel().tolist())

  assert drawn(2) == {0, 2}
  assert drawn(1) == {0}
  assert drawn(0) == set(range(V))


class _ByteTok:
  """A stand-in tokenizer: one id per byte (ids 4..259), BOS 2, EOS 3, pad 0."""
  pad_id, bos_id, eos_id, vocab_size = 0, 2, 3, 260

  def encode(self, text):
    return [4 + b for b in text.encode()]

  def decode(self, ids):
    return bytes((i - 4) % 256 for i in ids if i >= 4).decode("utf-8", errors="replace")

  def apply_chat_template(self, messages, add_generation_prompt=True):
    text = "".join(m["content"] for m in messages)  # role markers would cost bytes
    return text + ("<think>\n" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def byte_ctx(tiny_cfg):
  held_out = [{"question": f"Compute {a} + 1.", "answer": str(a + 1), "language": "en",
               "match": "exact"} for a in range(4)]
  return Context(None, "", mesh_lib.make_mesh((-1, 1, 1, 1)), _ByteTok(), [], held_out,
                 tiny_cfg)


def test_eval_settings_reach_the_sampler(byte_ctx, tiny_cfg, tiny_params, monkeypatch):
  seen = []
  real = stages.sample

  def spy(*args, **kw):
    seen.append((kw["temperature"], kw["top_p"], kw["top_k"]))
    return real(*args, **kw)

  monkeypatch.setattr(stages, "sample", spy)
  sc = ml_collections.ConfigDict(dict(eval_prompts=4, eval_samples=2, eval_temperature=0.7,
                                      eval_top_p=0.9, eval_top_k=5))
  out = stages.evaluate(byte_ctx, tiny_cfg, tiny_params, sc, template="r1_chat",
                        max_prompt_len=48, max_new_tokens=4, seed=0)
  assert seen and set(seen) == {(0.7, 0.9, 5)}
  assert {"accuracy", "cons@2", "format", "language", "truncated", "response_len"} <= set(out)


# ------------------------------------------------------------------ stage seeds

def test_stage_seeds_differ_between_stages_and_are_stable():
  c = load_config("experiments/r1/tiny.py")
  rl = [n for n in c.pipeline if c.stages[n].kind == "grpo"]
  assert len(rl) == 2
  for purpose in ("rollout", "prompts", "eval"):
    assert stages.stage_seed(c.seed, rl[0], purpose) != stages.stage_seed(c.seed, rl[1], purpose)
  a = stages.stage_seed(0, "reasoning_rl", "rollout")
  assert stages.stage_seed(0, "reasoning_rl", "prompts") != a
  assert stages.stage_seed(1, "reasoning_rl", "rollout") != a
  # The same across runs and processes (a stable hash, not Python's salted one).
  assert a == 316652084 and stages.stage_seed(0, "grpo", "prompts") == 1343317231
