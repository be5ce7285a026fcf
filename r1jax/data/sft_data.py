"""SFT examples as fixed-length token rows, and a resumable batch iterator.

A row is [BOS] prompt response [EOS], right-padded to `seq_len`; `loss_mask`
marks the response and EOS (the prompt is context only); `valid` marks
non-padding tokens. Rows longer than `seq_len` are dropped and counted, never
silently cut (a cut response would teach the model to stop mid-answer).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from r1jax.data.tokenizer import Tokenizer


def encode_rows(tok: Tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int):
  """(arrays dict of [N, seq_len], number of pairs dropped for length)."""
  rows, masks = [], []
  dropped = 0
  for prompt, response in pairs:
    p = [tok.bos_id] + tok.encode(prompt)
    r = tok.encode(response) + [tok.eos_id]
    if len(p) + len(r) > seq_len:
      dropped += 1
      continue
    rows.append(p + r)
    masks.append([0] * len(p) + [1] * len(r))
  n = len(rows)
  tokens = np.full((n, seq_len), tok.pad_id, np.int32)
  loss_mask = np.zeros((n, seq_len), np.int32)
  valid = np.zeros((n, seq_len), np.int32)
  for i, (row, m) in enumerate(zip(rows, masks)):
    tokens[i, :len(row)] = row
    loss_mask[i, :len(m)] = m
    valid[i, :len(row)] = 1
  return {"tokens": tokens, "loss_mask": loss_mask, "valid": valid}, dropped


@dataclasses.dataclass
class BatchIterator:
  """Epoch-wise shuffled batches; `state()`/`restore()` resume on the exact next batch."""
  arrays: dict
  batch_size: int
  seed: int
  epoch: int = 0
  index: int = 0  # batches already taken in this epoch

  def __post_init__(self):
    n = len(next(iter(self.arrays.values())))
    if n < self.batch_size:
      raise ValueError(f"dataset has {n} rows, fewer than batch_size={self.batch_size}")
    self._n = n

  def _order(self) -> np.ndarray:
    return np.random.default_rng([self.seed, self.epoch]).permutation(self._n)

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    per_epoch = self._n // self.batch_size
    if self.index >= per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    rows = self._order()[self.index * self.batch_size:(self.index + 1) * self.batch_size]
    self.index += 1
    return {k: v[rows] for k, v in self.arrays.items()}

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

  def restore(self, state: dict) -> None:
    if state["seed"] != self.seed:
      raise ValueError(f"iterator state has seed {state['seed']}, config has {self.seed}")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
