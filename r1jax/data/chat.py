"""Chat-format SFT data: JSONL conversations, rendered by the tokenizer's chat template,
with the loss on what the assistant says.

One conversation per line: {"messages": [{"role": "system"|"user"|"assistant",
"content": str}, ...]}: an optional system message first, then user and
assistant turns, at least one assistant turn. Bad lines raise `DataError`
naming file:line (as r1jax.data.tasks.jsonl does).

Loss mask: the conversation is rendered one message at a time; each message
adds a piece of text (the template must only append, as chat templates do).
An assistant message's piece is its role marker (e.g. "<｜Assistant｜>"),
then its content and end of turn (e.g. "<｜end▁of▁sentence｜>"): the loss covers
the content and the end of turn, never the marker, the system or user text.
Pieces are tokenized apart and joined, so a token never straddles a boundary.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from r1jax.data import pipelines
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.data.tasks.jsonl import DataError, _records

ROLES = ("system", "user", "assistant")


def _check(messages, where: str) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: 'messages' must be a non-empty list of "
                    "{{'role', 'content'}} objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m:
      raise DataError(f"{where}: message {i} must be {{'role': ..., 'content': ...}}, "
                      f"got {m!r:.80}")
    if m["role"] not in ROLES:
      raise DataError(f"{where}: message {i} has role {m['role']!r}; use one of {ROLES}")
    if m["role"] == "system" and i:
      raise DataError(f"{where}: message {i} is a system message; only the first may be")
    if not isinstance(m.get("content"), str) or not m["content"].strip():
      raise DataError(f"{where}: message {i} needs a non-empty string 'content'")
    out.append({"role": m["role"], "content": m["content"]})
  if not any(m["role"] == "assistant" for m in out):
    raise DataError(f"{where}: no assistant message, so nothing to learn from")
  return out


def read_chat(path: str) -> list[list[dict]]:
  """The conversations of a chat JSONL file (each a list of {"role", "content"})."""
  out = []
  for lineno, record in _records(path):
    where = f"{path}:{lineno}"
    if "messages" not in record:
      raise DataError(f"{where}: missing field 'messages'")
    out.append(_check(record["messages"], where))
  return out


def encode_chat(tok: tokenizer_lib.Tokenizer,
                messages: Sequence[dict]) -> tuple[list[int], list[int]]:
  """(ids starting with one BOS where the tokenizer has one, loss mask: 1 on assistant
  content and end of turn)."""
  ids, mask, text = [], [], ""
  for i, m in enumerate(messages):
    full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
    if not full.startswith(text):
      raise ValueError("the chat template rewrites earlier messages when a later one is "
                       "added; chat SFT needs one that only appends")
    piece, text = full[len(text):], full
    if m["role"] == "assistant":
      at = piece.find(m["content"])
      if at < 0:
        raise ValueError("the chat template changes the assistant's content (e.g. drops its "
                         "reasoning); chat SFT needs a template that keeps it")
      marker, said = piece[:at], piece[at:]
      for part, flag in ((marker, 0), (said, 1)):
        part_ids = tok.encode(part) if part else []
        ids += part_ids
        mask += [flag] * len(part_ids)
    else:
      part_ids = tok.encode(piece) if piece else []
      ids += part_ids
      mask += [0] * len(part_ids)
  if tok.bos_id is not None and ids[:1] != [tok.bos_id]:
    ids, mask = [tok.bos_id] + ids, [0] + mask
  return ids, mask


def chat_rows(tok: tokenizer_lib.Tokenizer, conversations: Sequence[Sequence[dict]],
              seq_len: int) -> tuple[dict[str, np.ndarray], int]:
  """({tokens, loss_mask, valid}: int32 [N, seq_len], conversations dropped for length)."""
  return pipelines.pad_rows([encode_chat(tok, m) for m in conversations], seq_len, tok.pad_id)
