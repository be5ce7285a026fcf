"""grain input pipelines: SFT token batches and RL prompt batches, both resumable.

Both are `grain.MapDataset`s: source -> shuffle(seed) -> batch(drop_remainder)
-> repeat(). Shuffling before batching makes each epoch a fresh permutation of
whole examples (grain folds the epoch number into the seed, so epochs differ
yet are reproducible), and every batch is full and inside one epoch (the
remainder of an epoch is dropped; the next epoch reshuffles all examples, so
none is dropped for good).

`Batches` iterates one of them. Its `state()` is plain JSON for the
checkpoint: grain's own iterator state ({"next_index": batches taken}) plus
what identifies the data (seed, size, batch size, a checksum), so `restore()`
continues on exactly the next batch, and refuses a checkpoint taken on other
data instead of silently resuming somewhere else.

SFT rows: [BOS] prompt response [EOS] (one BOS: a chat template that writes
its own is not given a second), right-padded to `seq_len`; `loss_mask`
marks the response and EOS (the prompt is context only); `valid` marks
non-padding tokens. Rows longer than `seq_len` are dropped and counted, never
cut (a cut response would teach the model to stop mid-answer). Packing several
rows into one is not offered: the model's attention has no segment ids, so
packed rows would attend to each other.

Prompts for RL: [BOS] prompt, LEFT-padded to `max_prompt_len` (the layout
r1jax.rl.rollout expects), with the examples alongside for the rewards
(`prompt_batches`); or one example at a time with its "prompt_ids"
(`prompt_examples`), for a consumer that batches itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from r1jax.data import tokenizer as tokenizer_lib
from r1jax.data.tokenizer import Tokenizer


class Batches:
  """An endless iterator over a grain dataset, resumable on exactly the next element."""

  def __init__(self, dataset: grain.MapDataset, identity: dict[str, Any]):
    # The data is in memory: no reader threads (grain's advice; they would
    # only contend for the GIL) and nothing to prefetch.
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    self._it = dataset.to_iter_dataset(options).__iter__()
    self._identity = identity

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def state(self) -> dict[str, Any]:
    return {**self._identity, "grain": self._it.get_state()}

  def restore(self, state: dict[str, Any]) -> None:
    if "grain" not in state:
      raise ValueError(f"not a data iterator state saved by r1jax.data.pipelines: {state!r:.200}; "
                       "the checkpoint predates the grain pipeline, start a fresh workdir")
    saved = {k: state.get(k) for k in self._identity}
    if saved != self._identity:
      diff = {k: (saved[k], v) for k, v in self._identity.items() if saved[k] != v}
      raise ValueError(f"the checkpoint's data iterator was saved on other data; (saved, now): "
                       f"{diff}. Resume with the config and data it was saved with.")
    self._it.set_state(state["grain"])


def _checksum(blobs: Sequence[bytes]) -> str:
  h = hashlib.sha256()
  for b in blobs:
    h.update(hashlib.sha256(b).digest())
  return h.hexdigest()[:16]


def _check_batching(n: int, batch_size: int, seed: int, what: str) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if n < batch_size:
    raise ValueError(f"{what} has {n} rows, fewer than batch_size={batch_size}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"the shuffle seed must be in [0, 2**32), got {seed}")


# ---------------------------------------------------------------------- SFT


def sft_pairs(tok: Tokenizer, examples: Sequence[dict],
              template: str) -> list[tuple[str, str]]:
  """(prompt, response) texts of examples that carry a worked solution ("cot")."""
  t = tokenizer_lib.get_template(template)
  for i, e in enumerate(examples):
    if "cot" not in e:
      raise ValueError(f"example {i} ({e.get('question', '')!r:.60}) has no 'cot': SFT needs "
                       "worked solutions; use a task with solutions or a dataset with 'cot'")
  return [(t.prompt(tok, e["question"]), t.response(e["cot"], e["answer"])) for e in examples]


def encode_rows(tok: Tokenizer, pairs: Sequence[tuple[str, str]],
                seq_len: int) -> tuple[dict[str, np.ndarray], int]:
  """({tokens, loss_mask, valid}: int32 [N, seq_len], number of pairs dropped for length)."""
  rows = []
  for prompt, response in pairs:
    p = tokenizer_lib.with_bos(tok, prompt)
    r = tok.encode(response) + [tok.eos_id]
    rows.append((p + r, [0] * len(p) + [1] * len(r)))
  return pad_rows(rows, seq_len, tok.pad_id)


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], seq_len: int,
             pad_id: int) -> tuple[dict[str, np.ndarray], int]:
  """(ids, loss mask) rows right-padded to `seq_len` as arrays, and the number of rows
  dropped as longer than `seq_len` (never cut)."""
  kept = [(ids, mask) for ids, mask in rows if len(ids) <= seq_len]
  n = len(kept)
  tokens = np.full((n, seq_len), pad_id, np.int32)
  loss_mask = np.zeros((n, seq_len), np.int32)
  valid = np.zeros((n, seq_len), np.int32)
  for i, (row, m) in enumerate(kept):
    tokens[i, :len(row)] = row
    loss_mask[i, :len(m)] = m
    valid[i, :len(row)] = 1
  return {"tokens": tokens, "loss_mask": loss_mask, "valid": valid}, len(rows) - n


class _Rows:
  """Row i of a dict of equally long arrays, as a dict: a grain data source."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"arrays must have the same number of rows, got {lengths}")
    self._arrays, self._n = arrays, next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self._arrays.items()}


def sft_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> Batches:
  """Endless shuffled batches of SFT rows: `next()` gives a dict of [batch_size, seq_len] arrays."""
  source = _Rows(arrays)
  _check_batching(len(source), batch_size, seed, "the SFT dataset")
  ds = grain.MapDataset.source(source).shuffle(seed=seed).batch(batch_size, drop_remainder=True)
  identity = {"kind": "sft", "seed": seed, "rows": len(source), "batch_size": batch_size,
              "checksum": _checksum([np.ascontiguousarray(arrays[k]).tobytes()
                                     for k in sorted(arrays)])}
  return Batches(ds.repeat(), identity)


# ----------------------------------------------------------------------- RL


def left_pad(ids: Sequence[Sequence[int]], length: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(prompts int32 [B, length] with each row's ids at the end, lengths int32 [B])."""
  prompts = np.full((len(ids), length), pad_id, np.int32)
  lengths = np.zeros((len(ids),), np.int32)
  for i, row in enumerate(ids):
    if not 1 <= len(row) <= length:
      raise ValueError(f"prompt {i} has {len(row)} tokens; need 1..{length}")
    prompts[i, length - len(row):] = row
    lengths[i] = len(row)
  return prompts, lengths


def encode_prompts(tok: Tokenizer, examples: Sequence[dict], template: str,
                   max_prompt_len: int) -> tuple[list[list[int]], list[dict], int]:
  """(templated question ids starting with one BOS, their examples, number dropped as
  too long). With "r1_chat" the prompt is the tokenizer's own chat template."""
  t = tokenizer_lib.get_template(template)
  ids, kept, dropped = [], [], 0
  for e in examples:
    row = tokenizer_lib.with_bos(tok, t.prompt(tok, e["question"]))
    if len(row) > max_prompt_len:
      dropped += 1
      continue
    ids.append(row)
    kept.append(e)
  return ids, kept, dropped


def prompt_batch(tok: Tokenizer, examples: Sequence[dict], template: str,
                 max_prompt_len: int) -> dict[str, Any]:
  """One batch for the sampler: {"prompts" [B, P], "prompt_lengths" [B], "examples"}."""
  ids, kept, dropped = encode_prompts(tok, examples, template, max_prompt_len)
  if dropped:
    raise ValueError(f"{dropped} of {len(examples)} prompts are longer than "
                     f"max_prompt_len={max_prompt_len} tokens; raise it")
  prompts, lengths = left_pad(ids, max_prompt_len, tok.pad_id)
  return {"prompts": prompts, "prompt_lengths": lengths, "examples": list(kept)}


def prompt_batches(tok: Tokenizer, examples: Sequence[dict], *, template: str, batch_size: int,
                   max_prompt_len: int, seed: int) -> tuple[Batches, int]:
  """(endless shuffled prompt batches like `prompt_batch`'s, prompts dropped for length).

  Every batch has the same static shape [batch_size, max_prompt_len], so the
  sampler compiles once.
  """
  ids, kept, dropped = encode_prompts(tok, examples, template, max_prompt_len)
  _check_batching(len(kept), batch_size, seed, "the prompt set (after dropping long prompts)")
  pad_id = tok.pad_id

  def collate(items: Sequence[tuple[list[int], dict]]) -> dict[str, Any]:
    prompts, lengths = left_pad([row for row, _ in items], max_prompt_len, pad_id)
    return {"prompts": prompts, "prompt_lengths": lengths, "examples": [e for _, e in items]}

  ds = (grain.MapDataset.source(list(zip(ids, kept))).shuffle(seed=seed)
        .batch(batch_size, drop_remainder=True, batch_fn=collate))
  identity = {"kind": "prompts", "seed": seed, "rows": len(kept), "batch_size": batch_size,
              "template": template, "max_prompt_len": max_prompt_len,
              "checksum": _checksum([json.dumps([row, e], sort_keys=True,
                                                ensure_ascii=False).encode()
                                     for row, e in zip(ids, kept)])}
  return Batches(ds.repeat(), identity), dropped


def prompt_examples(tok: Tokenizer, examples: Sequence[dict], *, template: str,
                    max_prompt_len: int, seed: int) -> tuple[Batches, int]:
  """(endless shuffled stream of single examples with "prompt_ids" added, number dropped).

  For consumers that assemble their own batches one prompt at a time, like
  r1jax.rl.step.GRPOStep (which left-pads "prompt_ids" itself); the state
  resumes on exactly the next example.
  """
  ids, kept, dropped = encode_prompts(tok, examples, template, max_prompt_len)
  _check_batching(len(kept), 1, seed, "the prompt set (after dropping long prompts)")
  items = [{**e, "prompt_ids": row} for row, e in zip(ids, kept)]
  ds = grain.MapDataset.source(items).shuffle(seed=seed)
  identity = {"kind": "prompt_examples", "seed": seed, "rows": len(items),
              "template": template, "max_prompt_len": max_prompt_len,
              "checksum": _checksum([json.dumps(x, sort_keys=True, ensure_ascii=False).encode()
                                     for x in items])}
  return Batches(ds.repeat(), identity), dropped
