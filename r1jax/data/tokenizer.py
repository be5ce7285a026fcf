"""A sentencepiece tokenizer with the R1 template tokens, and the prompt templates.

For toy runs the tokenizer is trained on the task corpus (byte fallback, so any
text round-trips) and cached as a `.model` file; real runs load a file.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, Iterable, Sequence

import sentencepiece as spm

from r1jax import storage

# Template and role markers are single tokens ("user-defined symbols").
SPECIAL_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", "<|User|>", "<|Assistant|>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# DeepSeek-R1 paper, Table 1.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:")


def r1_zero_prompt(question: str) -> str:
  return R1_ZERO_TEMPLATE.format(prompt=question.rstrip("."))


def r1_chat_prompt(question: str) -> str:
  """R1's chat form: no system prompt, the model opens its reasoning with <think>."""
  return f"<|User|>{question}<|Assistant|><think>\n"


def r1_zero_response(cot: str, answer: str) -> str:
  return f" <think> {cot} </think> <answer> {answer} </answer>"


def r1_chat_response(cot: str, answer: str) -> str:
  """Continues `r1_chat_prompt` (which opened <think>): reasoning, then the boxed answer."""
  return f"{cot}\n</think>\n\n\\boxed{{{answer}}}"


@dataclasses.dataclass(frozen=True)
class Template:
  prompt: Callable[[str], str]  # question -> prompt text
  response: Callable[[str, str], str]  # (cot, answer) -> target text for SFT
  # The format reward's options for completions of this template's prompts.
  format_options: tuple[tuple[str, Any], ...] = ()


TEMPLATES: dict[str, Template] = {
    "r1_zero": Template(r1_zero_prompt, r1_zero_response, (("mode", "r1_zero"),)),
    # The prompt opens <think>, and R1 answers in a \boxed{} after </think>.
    "r1_chat": Template(r1_chat_prompt, r1_chat_response,
                        (("mode", "r1"), ("think_in_prompt", True))),
}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f"unknown template {name!r}; known templates: {sorted(TEMPLATES)}")
  return TEMPLATES[name]


class Tokenizer:
  """Thin typed wrapper over a sentencepiece model."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    for tok in SPECIAL_TOKENS:
      if self._sp.piece_to_id(tok) == self._sp.unk_id():
        raise ValueError(f"tokenizer lacks the special token {tok!r}; train it with "
                         "r1jax.data.tokenizer.train or add it as a user-defined symbol")

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
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
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


def train(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a BPE model with byte fallback on `corpus` (deterministic)."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(corpus)), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, character_coverage=1.0,
      user_defined_symbols=list(SPECIAL_TOKENS), pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
      eos_id=EOS_ID, split_digits=True, num_threads=1, hard_vocab_limit=False,
      max_sentence_length=8192, minloglevel=2, allow_whitespace_only_pieces=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False)
  return Tokenizer(model.getvalue())


def train_or_load(path: str, corpus: Iterable[str], vocab_size: int) -> Tokenizer:
  """The tokenizer cached at `path`, trained on `corpus` the first time."""
  if storage.exists(path):
    return Tokenizer.load(path)
  tok = train(corpus, vocab_size)
  tok.save(path)
  return tok
