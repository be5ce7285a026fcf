"""grain pipelines: exact resume from saved state, per-epoch reshuffles, left-padded prompts."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.data import pipelines, tasks
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.rl.rollout import left_pad as rollout_left_pad


@pytest.fixture(scope="module")
def examples():
  train, _ = tasks.make_splits("countdown", n_train=64, n_eval=0, seed=0, zh_fraction=0.3)
  arith, _ = tasks.make_splits("arithmetic", n_train=64, n_eval=0, seed=0, zh_fraction=0.3)
  return train + arith


@pytest.fixture(scope="module")
def tok(examples):
  corpus = [tokenizer_lib.r1_zero_prompt(e["question"]) +
            tokenizer_lib.r1_zero_response(e["cot"], e["answer"]) for e in examples]
  corpus += [e["question"] + tokenizer_lib.r1_chat_response(e["cot"], e["answer"])
             for e in examples]
  return tokenizer_lib.train(corpus, vocab_size=512)


def _rows(n: int, seq_len: int = 6) -> dict:
  """Row i holds i in every token, so a batch's first column names its rows."""
  tokens = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
  return {"tokens": tokens, "loss_mask": np.ones_like(tokens), "valid": np.ones_like(tokens)}


def _ids(batch) -> list[int]:
  return batch["tokens"][:, 0].tolist()


# ---------------------------------------------------------------------- SFT


def test_encode_rows_masks_the_response_and_drops_long_rows(tok):
  pairs = [("Compute 1 + 2.", " <think> 3 </think>"), ("a" * 400, "b")]
  arrays, dropped = pipelines.encode_rows(tok, pairs, seq_len=48)
  assert dropped == 1 and arrays["tokens"].shape == (1, 48)
  assert {a.dtype for a in arrays.values()} == {np.dtype(np.int32)}
  row, mask, valid = arrays["tokens"][0], arrays["loss_mask"][0], arrays["valid"][0]
  n_prompt = 1 + len(tok.encode(pairs[0][0]))
  n = int(valid.sum())
  assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id and (row[n:] == tok.pad_id).all()
  assert mask[:n_prompt].sum() == 0 and mask[n_prompt:n].all() and mask[n:].sum() == 0
  assert tok.decode(row[n_prompt:n - 1]) == pairs[0][1]


def test_sft_batches_resume_on_exactly_the_next_batch():
  it = pipelines.sft_batches(_rows(10), batch_size=3, seed=7)
  for _ in range(5):  # into the second epoch (3 batches per epoch)
    next(it)
  state = json.loads(json.dumps(it.state()))  # what the checkpoint's JsonSave stores
  expected = [next(it) for _ in range(7)]
  resumed = pipelines.sft_batches(_rows(10), batch_size=3, seed=7)
  resumed.restore(state)
  for want in expected:
    got = next(resumed)
    assert set(got) == {"tokens", "loss_mask", "valid"}
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_epochs_reshuffle_deterministically():
  n, bs = 10, 3
  order = lambda seed: [_ids(b) for b, _ in zip(pipelines.sft_batches(_rows(n), bs, seed),
                                                 range(12))]
  a = order(0)
  assert a == order(0) and a != order(1)
  epochs = [sum(a[e * 3:(e + 1) * 3], []) for e in range(4)]  # 3 full batches per epoch
  for rows in epochs:
    assert len(set(rows)) == 9  # within an epoch no row repeats; one is left over
  assert len({tuple(r) for r in epochs}) == 4  # every epoch in a new order
  assert all(len(b) == bs for b in a)


def test_restore_refuses_other_data_or_an_old_state():
  it = pipelines.sft_batches(_rows(10), batch_size=3, seed=7)
  next(it)
  state = it.state()
  for other in (pipelines.sft_batches(_rows(10), 3, seed=8),
                pipelines.sft_batches(_rows(10), 2, seed=7),
                pipelines.sft_batches(_rows(11), 3, seed=7)):
    with pytest.raises(ValueError, match="saved on other data"):
      other.restore(state)
  changed = _rows(10)
  changed["loss_mask"][0, 0] = 0
  with pytest.raises(ValueError, match="checksum"):
    pipelines.sft_batches(changed, 3, seed=7).restore(state)
  with pytest.raises(ValueError, match="predates the grain pipeline"):
    it.restore({"epoch": 0, "index": 1, "seed": 7})


def test_bad_batching_is_a_clear_error():
  with pytest.raises(ValueError, match="has 2 rows, fewer than batch_size=3"):
    pipelines.sft_batches(_rows(2), batch_size=3, seed=0)
  with pytest.raises(ValueError, match="same number of rows"):
    pipelines.sft_batches({"tokens": np.zeros((4, 2)), "valid": np.zeros((3, 2))}, 2, 0)


def test_sft_pairs_need_a_cot_and_a_known_template(tok, examples):
  with pytest.raises(ValueError, match="unknown template 'chatml'.*r1_chat.*r1_zero"):
    pipelines.sft_pairs(tok, examples, "chatml")
  with pytest.raises(ValueError, match="example 1 .* has no 'cot'"):
    pipelines.sft_pairs(tok, [examples[0], {"question": "q", "answer": "1"}], "r1_zero")
  prompt, response = pipelines.sft_pairs(tok, examples[:1], "r1_chat")[0]
  # The toy tokenizer's own chat template, in DeepSeek's tokens.
  assert prompt == f"<｜begin▁of▁sentence｜><｜User｜>{examples[0]['question']}<｜Assistant｜><think>\n"
  assert response.endswith(f"</think>\n\n\\boxed{{{examples[0]['answer']}}}")


# ----------------------------------------------------------------------- RL


@pytest.mark.parametrize("template", sorted(tokenizer_lib.TEMPLATES))
def test_prompt_batch_is_left_padded_like_the_sampler_expects(tok, examples, template):
  batch = pipelines.prompt_batch(tok, examples[60:68], template, max_prompt_len=128)
  prompts, lengths = batch["prompts"], batch["prompt_lengths"]
  assert prompts.shape == (8, 128) and prompts.dtype == np.int32 and lengths.dtype == np.int32
  fill = tokenizer_lib.get_template(template).prompt
  for row, n, e in zip(prompts, lengths, batch["examples"]):
    assert (row[:128 - n] == tok.pad_id).all() and row[128 - n] == tok.bos_id
    assert (row == tok.bos_id).sum() == 1  # a chat template's own BOS is not doubled
    assert tok.decode(row[128 - n + 1:]) == fill(tok, e["question"]).removeprefix(
        tokenizer_lib.BOS_TOKEN)
  # The same layout as the sampler's own conversion from right padding.
  right = np.full_like(prompts, tok.pad_id)
  for i, n in enumerate(lengths):
    right[i, :n] = prompts[i, 128 - n:]
  np.testing.assert_array_equal(
      np.asarray(rollout_left_pad(jnp.asarray(right), jnp.asarray(lengths), tok.pad_id)), prompts)
  with pytest.raises(ValueError, match="longer than max_prompt_len=10"):
    pipelines.prompt_batch(tok, examples[:2], template, max_prompt_len=10)


def test_prompt_batches_resume_and_keep_examples_with_their_prompts(tok, examples):
  make = lambda: pipelines.prompt_batches(tok, examples, template="r1_zero", batch_size=16,
                                          max_prompt_len=120, seed=3)
  it, dropped = make()
  assert 0 < dropped < len(examples)  # the longest countdown prompts do not fit
  for _ in range(9):  # past the first epoch
    next(it)
  state = json.loads(json.dumps(it.state()))
  expected = [next(it) for _ in range(4)]
  resumed, _ = make()
  resumed.restore(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["prompts"], want["prompts"])
    np.testing.assert_array_equal(got["prompt_lengths"], want["prompt_lengths"])
    assert got["examples"] == want["examples"]
    for row, n, e in zip(got["prompts"], got["prompt_lengths"], got["examples"]):
      assert tok.decode(row[120 - n + 1:]) == tokenizer_lib.r1_zero_prompt(e["question"])


def test_prompt_examples_stream_one_example_at_a_time_and_resume(tok, examples):
  make = lambda: pipelines.prompt_examples(tok, examples, template="r1_chat", max_prompt_len=64,
                                           seed=5)
  it, dropped = make()
  assert dropped == 0
  first_epoch = [next(it) for _ in range(len(examples))]
  assert sorted(e["question"] for e in first_epoch) == sorted(e["question"] for e in examples)
  state = json.loads(json.dumps(it.state()))
  expected = [next(it) for _ in range(5)]
  resumed, _ = make()
  resumed.restore(state)
  assert [next(resumed) for _ in range(5)] == expected
  e = expected[0]
  assert e["prompt_ids"] == tok.encode(tokenizer_lib.r1_chat_prompt(tok, e["question"]))
  assert e["prompt_ids"][0] == tok.bos_id
