"""A Hugging Face tokenizer directory (`tokenizer.json` + `tokenizer_config.json`).

DeepSeek-V3/R1 ship their tokenizer this way (byte-level BPE, special tokens
with fullwidth bars such as `<｜begin▁of▁sentence｜>`, and a Jinja chat
template). The `tokenizers` library reads `tokenizer.json`; the config gives
the special tokens and the chat template (inline, as a list of named
templates, or in a `chat_template.jinja` file beside it as transformers 5
saves it). Ids equal transformers' `AutoTokenizer` with add_special_tokens=False
(tests/test_tokenizer_parity.py).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import tokenizers

from r1jax import storage
from r1jax.data import chat_template

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _content(token: Any) -> str | None:
  """A special token as config files write it: a string, or an AddedToken dict."""
  if isinstance(token, dict):
    return token.get("content")
  return token


def _chat_template(directory: str, config: dict) -> str | None:
  jinja_path = storage.join(directory, "chat_template.jinja")
  if storage.exists(jinja_path):
    return storage.read_text(jinja_path)
  template = config.get("chat_template")
  if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
    named = {t["name"]: t["template"] for t in template}
    return named.get("default")
  return template


class HFTokenizer:
  """encode/decode with `tokenizers`, chat prompts from the directory's own template."""

  def __init__(self, tok: tokenizers.Tokenizer, config: dict, template: str | None,
               where: str = "<memory>"):
    self._tok, self.where = tok, where
    self.special_tokens = {k: _content(config.get(k)) for k in _SPECIAL_KEYS
                           if _content(config.get(k)) is not None}
    self._template = template
    self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
    ids = {}
    if "eos_token" not in self.special_tokens:
      raise ValueError(f"{where}: tokenizer_config.json names no eos_token; r1jax ends every "
                       "document and completion with EOS")
    for key, text in self.special_tokens.items():
      ids[key] = tok.token_to_id(text)
      if ids[key] is None:
        raise ValueError(f"{where}: {key} {text!r} is not in tokenizer.json's vocabulary")
    # No BOS (Qwen2.5 ships none): rows start with the text itself, as Qwen's do.
    self._bos, self._eos = ids.get("bos_token"), ids["eos_token"]
    # No pad token (Llama-3 ships none): pad with EOS; padding is masked out anyway.
    self._pad = ids.get("pad_token", self._eos)

  @classmethod
  def load(cls, directory: str) -> "HFTokenizer":
    json_path = storage.join(directory, "tokenizer.json")
    if not storage.exists(json_path):
      raise FileNotFoundError(f"{directory}: no tokenizer.json (a Hugging Face tokenizer "
                              "directory holds tokenizer.json and tokenizer_config.json)")
    config_path = storage.join(directory, "tokenizer_config.json")
    config = json.loads(storage.read_text(config_path)) if storage.exists(config_path) else {}
    tok = tokenizers.Tokenizer.from_str(storage.read_text(json_path))
    return cls(tok, config, _chat_template(directory, config), where=directory)

  @property
  def vocab_size(self) -> int:
    """Ids in use, added tokens included (the model's embedding needs at least this many)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad

  def token_id(self, piece: str) -> int:
    i = self._tok.token_to_id(piece)
    if i is None:
      raise KeyError(f"{self.where}: no token {piece!r}")
    return i

  def encode(self, text: str) -> list[int]:
    """Ids of `text`; special tokens written in the text become their ids, none are added."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    text = self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
    return _clean_up_spaces(text) if self._clean_up_spaces else text

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True
                          ) -> str:
    if self._template is None:
      raise ValueError(f"{self.where}: the tokenizer has no chat_template (tokenizer_config.json "
                       "or chat_template.jinja); R1-chat prompts and chat SFT data need one")
    return chat_template.render(self._template, messages,
                                add_generation_prompt=add_generation_prompt,
                                **self.special_tokens)


def _clean_up_spaces(text: str) -> str:
  """The space removal older tokenizers ask for (`clean_up_tokenization_spaces`)."""
  for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                        (" 're", "'re")):
    text = text.replace(before, after)
  return text
