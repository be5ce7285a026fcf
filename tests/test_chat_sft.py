"""Chat-format SFT data and prompt-only RL data, and the tokenizer's config checks.

The loss mask of a chat conversation covers what the assistant says (its content
and end-of-turn token), checked by decoding the masked tokens; an SFT stage on
tests/fixtures/data/chat.jsonl feeds exactly such rows to the trainer, and a GRPO
stage on prompt-only math JSONL (question + answer, no solution) runs after it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from r1jax import configs
from r1jax.data import chat as chat_lib
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.data.tasks.jsonl import DataError
from r1jax.pipeline import runner, stages
from r1jax.pipeline import validate as validate_lib
from tests.experiment_loader import ROOT

DATA = os.path.join(ROOT, "tests", "fixtures", "data")
CHAT = os.path.join(DATA, "chat.jsonl")
PROMPTS = os.path.join(DATA, "math_prompts.jsonl")
HF_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizer")


def _runs(mask) -> list[tuple[int, int]]:
  """[start, end) of each run of 1s in a 0/1 mask."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(mask), [0]])))
  return list(zip(edges[::2], edges[1::2]))


def _check_mask(tok, messages, ids, mask) -> None:
  """Each run of masked tokens decodes to one assistant message's content + EOS."""
  eos = tok.decode([tok.eos_id])
  said = [tok.decode(ids[a:b]) for a, b in _runs(mask)]
  assert said == [m["content"] + eos for m in messages if m["role"] == "assistant"]
  assert tok.decode(ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
  assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


@pytest.fixture(scope="module")
def toy_tok():
  conversations = chat_lib.read_chat(CHAT)
  return tokenizer_lib.train([m["content"] for c in conversations for m in c], vocab_size=400)


@pytest.mark.parametrize("which", ["hf", "toy"])
def test_loss_mask_covers_assistant_tokens_only(which, toy_tok):
  tok = tokenizer_lib.load(HF_DIR) if which == "hf" else toy_tok
  conversations = chat_lib.read_chat(CHAT)
  assert len(conversations) == 10 and max(len(c) for c in conversations) == 6
  for messages in conversations:
    ids, mask = chat_lib.encode_chat(tok, messages)
    _check_mask(tok, messages, ids, mask)
    marker = tok.encode(tokenizer_lib.ASSISTANT_TOKEN)[0]
    assert all(m == 0 for i, m in zip(ids, mask) if i == marker)
  rows, dropped = chat_lib.chat_rows(tok, conversations, seq_len=96)
  assert dropped == 0 and rows["tokens"].shape == (10, 96)
  assert (rows["loss_mask"] <= rows["valid"]).all()
  _, dropped = chat_lib.chat_rows(tok, conversations, seq_len=24)
  assert dropped > 0


@pytest.mark.parametrize("line, error", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x"}', "missing field 'messages'"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}, '
     '{"role": "assistant", "content": "z"}]}', "only the first may be"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
     "non-empty string 'content'"),
])
def test_bad_chat_line_names_file_and_line(tmp_path, line, error):
  path = tmp_path / "chat.jsonl"
  good = json.dumps({"messages": [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a"}]})
  path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
  with pytest.raises(DataError, match=f"{path}:3: .*{error}"):
    chat_lib.read_chat(str(path))


def test_missing_chat_file_is_one_line(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    chat_lib.read_chat(str(tmp_path / "nope.jsonl"))
  assert "nope.jsonl" in str(e.value) and "\n" not in str(e.value)


def _config(**sft):
  c = configs.base()
  with c.unlocked():
    c.data.task, c.data.train_path, c.data.eval_path = "math_jsonl", PROMPTS, PROMPTS
    c.data.n_train, c.data.n_eval = 0, 8
    c.model.n_layers, c.model.mtp_depth = 2, 0  # one dense and one MoE layer: quick to compile
    c.pipeline = ("sft", "grpo")
    c.stages.sft = configs.sft_stage(**{"data": f"chat:{CHAT}", "seq_len": 96, "steps": 2,
                                        "batch_size": 8, "log_every": 1,
                                        "checkpoint_every": 2,
                                        "optim": dict(warmup_steps=1, total_steps=2), **sft})
    c.stages.grpo = configs.grpo_stage(
        init="stage:sft", template="r1_chat", steps=1, log_every=1, checkpoint_every=1,
        eval_prompts=0, reward_workers=1,  # no before/after eval: one sampler compile less
        optim=dict(warmup_steps=1, total_steps=1),
        grpo=dict(prompts_per_step=4, group_size=2, n_minibatches=1, max_prompt_len=48,
                  max_new_tokens=8))
  c.lock()
  return c


def test_pretrained_init_needs_a_tokenizer_path(tmp_path):
  c = _config(init="hf:/somewhere/DeepSeek-R1")
  with pytest.raises(validate_lib.ConfigError) as e:
    validate_lib.validate(c, n_devices=8)
  assert str(e.value).startswith("data.tokenizer_path: unset (nor stages.sft.tokenizer_path), "
                                 "but stages.sft.init=")
  with c.unlocked():
    c.data.tokenizer_path = str(tmp_path / "missing")
  with pytest.raises(validate_lib.ConfigError, match="data.tokenizer_path: .*does not exist"):
    validate_lib.validate(c, n_devices=8)
  with c.unlocked():
    c.data.tokenizer_path = HF_DIR
  validate_lib.validate(c, n_devices=8)
  c = _config(data="chat:/no/such/chat.jsonl")
  with pytest.raises(validate_lib.ConfigError, match="stages.sft.data: no chat file"):
    validate_lib.validate(c, n_devices=8)


def test_chat_sft_then_grpo_on_prompt_only_data(tmp_path, monkeypatch, capsys):
  seen = {}
  train_supervised = stages.trainer.train_supervised

  def spy(ctx, stage_dir, **kw):
    seen.update(tok=ctx.tok, rows=kw["rows"], eval_rows=kw["eval_rows"])
    return train_supervised(ctx, stage_dir, **kw)

  monkeypatch.setattr(stages.trainer, "train_supervised", spy)
  c = _config()
  results = runner.run(c, str(tmp_path))
  out = capsys.readouterr().out
  assert "training the toy tokenizer on " in out and "tokenizer.model" in out
  assert results["grpo"]["steps"] == 1
  assert "accuracy_after" not in results["grpo"]  # eval_prompts=0: no in-stage evaluation
  # The rows the SFT stage trained on: the loss covers assistant tokens only.
  tok, rows = seen["tok"], seen["rows"]
  conversations = chat_lib.read_chat(CHAT)
  assert len(rows["tokens"]) == 9 and len(seen["eval_rows"]["tokens"]) == 1
  for messages, ids, mask, valid in zip(conversations, rows["tokens"], rows["loss_mask"],
                                        rows["valid"]):
    n = int(valid.sum())
    _check_mask(tok, messages, ids[:n].tolist(), mask[:n])
  # A rerun loads the toy tokenizer instead of training it again.
  runner.run(c, str(tmp_path))
  assert "loading the toy tokenizer from" in capsys.readouterr().out


def test_bad_chat_line_ends_the_run_with_one_line(tmp_path):
  bad = tmp_path / "chat.jsonl"
  bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n', encoding="utf-8")
  out = subprocess.run(
      [sys.executable, "-m", "r1jax.main", "--config=experiments/r1/tiny.py:smoke",
       f"--workdir={tmp_path / 'run'}", f"--config.stages.cold_start.data=chat:{bad}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: bad data: {bad}:1: no assistant message, so nothing to learn from")


def test_context_holds_what_the_runner_prepared(tmp_path, capsys):
  from r1jax.data.hf_tokenizer import HFTokenizer
  from r1jax.pipeline import context as context_lib
  c = _config()
  with c.unlocked():
    c.data.tokenizer_path = HF_DIR
  train, held_out = context_lib.load_splits(c)
  assert not any("cot" in e for e in train)  # prompt-only
  tok = context_lib.prepare_tokenizer(c, str(tmp_path), train)
  assert isinstance(tok, HFTokenizer)
  assert capsys.readouterr().out == f"loading tokenizer from {HF_DIR}\n"
  with pytest.raises(ValueError, match="model.vocab_size=512 is smaller than the tokenizer's 575"):
    context_lib.Context.create(c, str(tmp_path), tok, train, held_out)
  with c.unlocked():
    c.model.vocab_size = 640
  ctx = context_lib.Context.create(c, str(tmp_path), tok, train, held_out)
  assert ctx.tok is tok and os.listdir(tmp_path) == []  # building it wrote nothing
