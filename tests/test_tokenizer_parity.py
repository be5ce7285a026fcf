"""The Hugging Face tokenizer path against transformers' AutoTokenizer, and the toy path.

tests/fixtures/tokenizer/ holds a byte-level BPE tokenizer with DeepSeek's special
tokens and an R1-shaped chat template, and expected.json: what transformers gave
for it (make_fixture.py). Nothing here imports transformers.
"""

import json
import os

import pytest

from r1jax.data import chat_template
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.data.hf_tokenizer import HFTokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer")


@pytest.fixture(scope="module")
def expected():
  with open(os.path.join(FIXTURE, "expected.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def hf():
  return tokenizer_lib.load(FIXTURE)


def test_load_picks_the_hugging_face_directory(hf, expected):
  assert isinstance(hf, HFTokenizer)
  assert (hf.bos_id, hf.eos_id, hf.pad_id) == (expected["bos_id"], expected["eos_id"],
                                               expected["pad_id"])
  assert hf.vocab_size == expected["vocab_size"]
  assert hf.token_id("<｜Assistant｜>") == hf.encode("<｜Assistant｜>")[0]


def test_ids_equal_transformers(hf, expected):
  cases = expected["cases"]
  assert len(cases) >= 20
  wrong = [(c["text"], hf.encode(c["text"]), c["ids"]) for c in cases
           if hf.encode(c["text"]) != c["ids"]]
  assert not wrong, wrong[:3]


def test_decode_equals_transformers_and_round_trips(hf, expected):
  for c in expected["cases"]:
    assert hf.decode(c["ids"]) == c["decoded"] == c["text"]
  for c in expected["decode_only"]:  # cut multi-byte characters decode the same way too
    assert hf.decode(c["ids"]) == c["decoded"]


def test_chat_template_equals_transformers(hf, expected):
  for chat in expected["chats"]:
    text = hf.apply_chat_template(chat["messages"],
                                  add_generation_prompt=chat["add_generation_prompt"])
    assert text == chat["text"]
    assert hf.encode(text) == chat["ids"]
  # Both tokenizers render R1's shape: the fixture's template and the toy's agree.
  special = {"bos_token": tokenizer_lib.BOS_TOKEN, "eos_token": tokenizer_lib.EOS_TOKEN}
  for chat in expected["chats"]:
    assert chat_template.render(chat_template.R1_CHAT_TEMPLATE, chat["messages"],
                                add_generation_prompt=chat["add_generation_prompt"],
                                **special) == chat["text"]


def test_r1_chat_prompt_comes_from_the_tokenizer(hf):
  prompt = tokenizer_lib.get_template("r1_chat").prompt(hf, "What is 2 + 3?")
  assert prompt == "<｜begin▁of▁sentence｜><｜User｜>What is 2 + 3?<｜Assistant｜><think>\n"
  ids = tokenizer_lib.with_bos(hf, prompt)
  assert ids[0] == hf.bos_id and ids.count(hf.bos_id) == 1
  assert hf.decode(ids) == prompt
  zero = tokenizer_lib.with_bos(hf, tokenizer_lib.get_template("r1_zero").prompt(hf, "2 + 3?"))
  assert zero[0] == hf.bos_id and zero.count(hf.bos_id) == 1


def test_template_errors_are_clear(hf):
  with pytest.raises(chat_template.ChatTemplateError, match="unknown role tool"):
    hf.apply_chat_template([{"role": "tool", "content": "x"}])
  with pytest.raises(chat_template.ChatTemplateError, match="system message must come first"):
    hf.apply_chat_template([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


def test_load_errors_are_one_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer at") as e:
    tokenizer_lib.load(str(tmp_path / "missing.model"))
  assert "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match="without tokenizer.json"):
    tokenizer_lib.load(str(tmp_path))


def test_sentencepiece_tokenizer_shares_the_interface(tmp_path):
  corpus = ["Compute 12 + 7. 计算 5 乘 6。 <think> x </think> \\boxed{5}"] * 30
  sp = tokenizer_lib.train(corpus, vocab_size=300)
  path = str(tmp_path / "tok.model")
  sp.save(path)
  sp = tokenizer_lib.load(path)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
              {"role": "assistant", "content": "<think>\n5\n</think> \\boxed{5}"},
              {"role": "user", "content": "再来 🙂"}]
  text = sp.apply_chat_template(messages)
  assert text == chat_template.render(chat_template.R1_CHAT_TEMPLATE, messages,
                                      add_generation_prompt=True,
                                      bos_token=tokenizer_lib.BOS_TOKEN,
                                      eos_token=tokenizer_lib.EOS_TOKEN)
  ids = sp.encode(text)
  assert ids[0] == sp.bos_id and sp.eos_id in ids  # control pieces written in text
  assert sp.decode(ids) == text
  for s in ("  two  spaces\t\ttab\n\n", "🙂👍🏽 emoji", ""):
    assert sp.decode(sp.encode(s)) == s


def test_template_features_beyond_r1s():
  """tojson keeps non-ASCII text and takes json.dumps' options; `{% generation %}`
  blocks render their body; loop controls work."""
  source = ("{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
            "{{ m | tojson(sort_keys=True) }}{% generation %}[{{ m['content'] }}]"
            "{% endgeneration %}{% endfor %}")
  text = chat_template.render(source, [{"role": "system", "content": "s"},
                                       {"role": "user", "content": "计算 <b>"}],
                              add_generation_prompt=False)
  assert text == '{"content": "计算 <b>", "role": "user"}[计算 <b>]'


def test_a_tokenizer_without_bos_writes_rows_without_one(tmp_path):
  """Qwen2.5's tokenizer names no BOS: prompts, packed documents and chat rows start
  with the text itself, and every document and turn still ends with EOS."""
  from r1jax.data import chat as chat_lib
  from r1jax.data import pipelines
  from r1jax.pipeline.stages import pack_documents
  with open(os.path.join(FIXTURE, "tokenizer_config.json"), encoding="utf-8") as f:
    config = json.load(f)
  config["bos_token"] = None
  config["chat_template"] = config["chat_template"].replace("{{ bos_token }}", "")
  os.makedirs(tmp_path / "qwen_like")
  with open(tmp_path / "qwen_like" / "tokenizer_config.json", "w", encoding="utf-8") as f:
    json.dump(config, f)
  with open(os.path.join(FIXTURE, "tokenizer.json"), encoding="utf-8") as f:
    (tmp_path / "qwen_like" / "tokenizer.json").write_text(f.read(), encoding="utf-8")
  tok = tokenizer_lib.load(str(tmp_path / "qwen_like"))
  assert tok.bos_id is None and tok.eos_id == 1
  prompt = tokenizer_lib.get_template("r1_chat").prompt(tok, "What is 2 + 3?")
  assert prompt == "<｜User｜>What is 2 + 3?<｜Assistant｜><think>\n"
  assert tokenizer_lib.with_bos(tok, prompt) == tok.encode(prompt)
  rows, dropped = pipelines.encode_rows(tok, [("2 + 3?", " 5")], 32)
  n = len(tok.encode("2 + 3?") + tok.encode(" 5")) + 1
  assert dropped == 0 and rows["tokens"][0, :n].tolist() == (
      tok.encode("2 + 3?") + tok.encode(" 5") + [tok.eos_id])
  packed = pack_documents(tok, ["one", "two"], 32)["tokens"][0].tolist()
  assert packed[:len(tok.encode("one")) + 1] == tok.encode("one") + [tok.eos_id]
  ids, mask = chat_lib.encode_chat(tok, [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "yo"}])
  assert ids == tok.encode("<｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜>")
  assert tok.decode([i for i, m in zip(ids, mask) if m]) == "yo<｜end▁of▁sentence｜>"
  del config["eos_token"]
  with open(tmp_path / "qwen_like" / "tokenizer_config.json", "w", encoding="utf-8") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="names no eos_token") as e:
    tokenizer_lib.load(str(tmp_path / "qwen_like"))
  assert "\n" not in str(e.value)
