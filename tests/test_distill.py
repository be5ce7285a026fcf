"""Distillation into a pretrained student: which model and tokenizer each stage uses.

The end-to-end smoke run of experiments/distill/tiny.py is in tests/test_pipeline.py
(and, across two processes, tests/test_multihost.py)."""

import os

import pytest

from r1jax import configs
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.pipeline import runner, validate
from tests.experiment_loader import load_config


def test_each_stage_trains_its_own_lineage_of_model():
  c = load_config("experiments/distill/tiny.py")
  teacher, student = configs.model_config(c), configs.stage_model(c, "student_pretrain")
  assert (teacher.attention_kind, teacher.n_routed_experts) == ("mla", 8)
  assert (student.attention_kind, student.n_routed_experts, student.d_model) == ("gqa", 0, 96)
  for name in ("pretrain", "grpo", "eval"):
    assert configs.stage_model(c, name) == teacher
  for name in ("eval_student_base", "distill", "eval_student"):
    assert configs.stage_model(c, name) == student
  assert configs.teacher_model(c, "distill") == teacher
  # The RL arm of the comparison trains the same pretrained student.
  rl = load_config("experiments/ablations/distill_vs_rl.py", "rl")
  assert configs.stage_model(rl, "student_rl") == student
  assert configs.stage_model(rl, "eval_student") == student


def test_a_stage_tokenizer_follows_its_init_and_the_teacher_keeps_its_own():
  c = load_config("experiments/distill/tiny.py")
  assert all(configs.stage_tokenizer(c, n) == "" for n in c.pipeline)
  with c.unlocked():
    c.data.tokenizer_path = "/tok/teacher"
    c.stages.student_pretrain.tokenizer_path = "/tok/student"
  assert configs.stage_tokenizer(c, "eval") == "/tok/teacher"
  for name in ("student_pretrain", "eval_student_base", "distill", "eval_student"):
    assert configs.stage_tokenizer(c, name) == "/tok/student"
  assert configs.teacher_tokenizer(c, "distill") == "/tok/teacher"
  pod = load_config("experiments/distill/qwen2_5_1_5b.py")
  assert configs.stage_tokenizer(pod, "eval") == "gs://BUCKET/qwen2_5_math_1_5b"
  assert configs.teacher_tokenizer(pod, "distill") == "gs://BUCKET/deepseek_v3"
  assert configs.stage_model(pod, "eval") == configs.model_config(pod, configs.model_fields(
      "qwen2_5_1_5b", max_seq_len=32_768))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.stages.distill.student.update({"d_model": 64}),
     r"^stages\.distill: student: leave it \{\} when init='stage:student_pretrain'"),
    (lambda c: c.stages.eval_student.update({"tokenizer_path": __file__}),
     r"^stages\.eval_student: tokenizer_path=.* but init='stage:distill' was trained with"),
    (lambda c: c.stages.student_pretrain.update({"tokenizer_path": "/no/such/tokenizer"}),
     r"^stages\.student_pretrain\.tokenizer_path: '/no/such/tokenizer' does not exist"),
    (lambda c: c.stages.distill.update({"init": "hf:/ckpt/Qwen2.5-1.5B"}),
     r"^data\.tokenizer_path: unset \(nor stages\.distill\.tokenizer_path\), but "
     r"stages\.distill\.init='hf:/ckpt/Qwen2.5-1.5B' is a pretrained checkpoint"),
])
def test_student_mistakes_are_one_line_errors(edit, message):
  c = load_config("experiments/distill/tiny.py")
  with c.unlocked():
    edit(c)
  with pytest.raises(validate.ConfigError, match=message) as e:
    validate.validate(c, n_devices=8)
  assert "\n" not in str(e.value)


def test_the_runner_hands_each_stage_its_model_tokenizer(tmp_path, monkeypatch):
  """The student's stages get the student's tokenizer, the teacher's the run's; a
  model with fewer embedding rows than its tokenizer's pieces is refused."""
  teacher_corpus = [f"the sum of {a} and {b} is {a + b}" for a in range(30) for b in range(30)]
  student_path = str(tmp_path / "student.model")
  tokenizer_lib.train(teacher_corpus[::3], 300).save(student_path)
  c = load_config("experiments/distill/tiny.py", "smoke")
  with c.unlocked():
    c.stages.student_pretrain.tokenizer_path = student_path
  seen = {}

  def fake(ctx, name, sc, inputs, stage_dir):
    seen[name] = ctx.tok.vocab_size
    return {}

  monkeypatch.setattr(runner, "_registry", lambda: {k: fake for k in validate.STAGE_KINDS})
  runner.run(c, str(tmp_path / "run"))
  run_vocab = tokenizer_lib.load(str(tmp_path / "run" / "tokenizer.model")).vocab_size
  assert run_vocab == 512
  assert seen == {"pretrain": 512, "grpo": 512, "eval": 512, "student_pretrain": 300,
                  "eval_student_base": 300, "distill": 300, "eval_student": 300}
  with c.unlocked():
    c.stages.student_pretrain.model.vocab_size = 256
  with pytest.raises(ValueError, match=r"^stages\.student_pretrain: the model's vocab_size=256 "
                                       r"is smaller than its tokenizer's 300 pieces"):
    runner.run(c, str(tmp_path / "run2"))
  assert not os.path.exists(tmp_path / "run2" / "student_pretrain" / "outputs.json")
