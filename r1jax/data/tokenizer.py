"""Tokenizers behind one interface, and the prompt templates.

`load(path)` reads a sentencepiece `.model` file or a Hugging Face tokenizer
directory (`tokenizer.json`, r1jax.data.hf_tokenizer); both give `Tokenizer`:
encode (no special tokens added; special tokens written in the text become
their ids), decode, apply_chat_template, bos_id / eos_id / pad_id,
vocab_size, token_id. For toy runs the pipeline trains a sentencepiece model
on the task corpus (`train`, byte fallback, so any text round-trips); it
carries DeepSeek's special tokens and R1's chat template, so prompts look the
same as with DeepSeek's own tokenizer.
"""

from __future__ import annotations

import dataclasses
import io
import re
from typing import Any, Callable, Iterable, Protocol, Sequence

import sentencepiece as spm

from r1jax import storage
from r1jax.data import chat_template

# DeepSeek-V3's control tokens (fullwidth bars, U+2581 for spaces).
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER_TOKEN, ASSISTANT_TOKEN = "<｜User｜>", "<｜Assistant｜>"
# Template and role markers are single tokens ("user-defined symbols").
SPECIAL_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", USER_TOKEN, ASSISTANT_TOKEN)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
  """What the pipeline needs of a tokenizer (SentencePieceTokenizer, HFTokenizer)."""

  @property
  def vocab_size(self) -> int: ...
  @property
  def bos_id(self) -> int | None: ...  # None: the tokenizer has no BOS (Qwen2.5)
  @property
  def eos_id(self) -> int: ...
  @property
  def pad_id(self) -> int: ...
  def token_id(self, piece: str) -> int: ...
  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def apply_chat_template(self, messages: Sequence[dict],
                          add_generation_prompt: bool = True) -> str: ...


def load(path: str) -> Tokenizer:
  """A sentencepiece `.model` file, or a Hugging Face directory holding tokenizer.json."""
  if storage.exists(storage.join(path, "tokenizer.json")):
    from r1jax.data.hf_tokenizer import HFTokenizer  # noqa: PLC0415
    return HFTokenizer.load(path)
  if not storage.exists(path):
    raise FileNotFoundError(f"no tokenizer at {path!r}: name a sentencepiece .model file or a "
                            "Hugging Face directory with tokenizer.json")
  if storage.path(path).is_dir():
    raise FileNotFoundError(f"{path}: a directory without tokenizer.json; a Hugging Face "
                            "tokenizer directory holds tokenizer.json and tokenizer_config.json")
  return SentencePieceTokenizer.load(path)


def with_bos(tok: Tokenizer, text: str) -> list[int]:
  """Ids of `text` starting with exactly one BOS (chat templates write their own);
  a tokenizer without one (bos_id None, Qwen2.5's) leaves the ids as they are."""
  ids = tok.encode(text)
  return ids if tok.bos_id is None or ids[:1] == [tok.bos_id] else [tok.bos_id] + ids


# DeepSeek-R1 paper, Table 1.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:")


def r1_zero_prompt(question: str) -> str:
  return R1_ZERO_TEMPLATE.format(prompt=question.rstrip("."))


def r1_chat_prompt(tok: Tokenizer, question: str) -> str:
  """R1's chat form from the tokenizer's own chat template: no system prompt; with
  DeepSeek's template the prompt ends in "<｜Assistant｜><think>\\n", opening the reasoning."""
  return tok.apply_chat_template([{"role": "user", "content": question}],
                                 add_generation_prompt=True)


def r1_zero_response(cot: str, answer: str) -> str:
  return f" <think> {cot} </think> <answer> {answer} </answer>"


def r1_chat_response(cot: str, answer: str) -> str:
  """Continues `r1_chat_prompt` (which opened <think>): reasoning, then the boxed answer."""
  return f"{cot}\n</think>\n\n\\boxed{{{answer}}}"


@dataclasses.dataclass(frozen=True)
class Template:
  prompt: Callable[[Tokenizer, str], str]  # (tokenizer, question) -> prompt text
  response: Callable[[str, str], str]  # (cot, answer) -> target text for SFT
  # The format reward's options for completions of this template's prompts.
  format_options: tuple[tuple[str, Any], ...] = ()


TEMPLATES: dict[str, Template] = {
    "r1_zero": Template(lambda tok, q: r1_zero_prompt(q), r1_zero_response,
                        (("mode", "r1_zero"),)),
    # The prompt opens <think>, and R1 answers in a \boxed{} after </think>.
    "r1_chat": Template(r1_chat_prompt, r1_chat_response,
                        (("mode", "r1"), ("think_in_prompt", True))),
}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f"unknown template {name!r}; known templates: {sorted(TEMPLATES)}")
  return TEMPLATES[name]




class SentencePieceTokenizer:
  """A sentencepiece model with R1's chat template built in.

  sentencepiece never matches its control pieces (BOS, EOS, pad) in text; so
  that chat templates work as with a Hugging Face tokenizer, `encode` turns
  those pieces written in the text into their ids and `decode` writes them back.
  """

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    for tok in SPECIAL_TOKENS:
      if self._sp.piece_to_id(tok) == self._sp.unk_id():
        raise ValueError(f"tokenizer lacks the special token {tok!r}; train it with "
                         "r1jax.data.tokenizer.train or add it as a user-defined symbol (a toy "
                         "tokenizer.model from before DeepSeek's fullwidth tokens: delete it)")
    self._control = {self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.pad_id)
                     if i >= 0}
    self._split = re.compile("(" + "|".join(map(re.escape, self._control)) + ")")

  @classmethod
  def load(cls, path: str) -> "SentencePieceTokenizer":
    return cls(storage.read_bytes(path))

  def save(self, path: str) -> None:
    storage.write_bytes(path, self.model_proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  def token_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def encode(self, text: str) -> list[int]:
    ids = []
    for part in self._split.split(text):
      if part in self._control:
        ids.append(self._control[part])
      elif part:
        ids += self._sp.encode(part)
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    pieces, run = [], []
    for i in ids:
      i = int(i)
      if i in self._control.values():
        pieces += [self._sp.decode(run), self._sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(pieces) + self._sp.decode(run)

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True
                          ) -> str:
    return chat_template.render(
        chat_template.R1_CHAT_TEMPLATE, messages, add_generation_prompt=add_generation_prompt,
        bos_token=self._sp.id_to_piece(self.bos_id), eos_token=self._sp.id_to_piece(self.eos_id))


def train(corpus: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
  """Trains a BPE model with byte fallback on `corpus` (deterministic).

  No dummy prefix: text encodes exactly as written (no space is invented at the
  start), so segments encoded apart and joined decode to the joined text.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(corpus)), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, character_coverage=1.0,
      user_defined_symbols=list(SPECIAL_TOKENS), pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
      eos_id=EOS_ID, pad_piece=PAD_TOKEN, bos_piece=BOS_TOKEN, eos_piece=EOS_TOKEN,
      split_digits=True, num_threads=1, hard_vocab_limit=False,
      max_sentence_length=8192, minloglevel=2, allow_whitespace_only_pieces=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False)
  return SentencePieceTokenizer(model.getvalue())
