"""One GRPO iteration: rollout → rewards → advantages → old/ref log-probs → μ updates.

Python orchestrates; the heavy parts are pure jitted functions:

  sample (r1jax/rl/rollout.py)  π_old = the current params draw G completions per prompt
  reward_fn                     Python (a RewardEvaluator's worker pool, or any callable)
  group_advantages              r1jax/rl/grpo.py
  logprob_fn (jit, update.py)   the trainer's own log-probs of the sampled tokens under π_old
                                and π_ref, one minibatch at a time
  train_step (jit, update.py)   one optimizer update on one minibatch, then the MoE
                                routers' bias rule (aux-loss-free balancing)

π_old's log-probs are recomputed by the trainer rather than taken from the
sampler: the ratio then starts at exactly 1, and the sampler/trainer mismatch
(small in f32, larger in bf16) is measured and, with `tis_cap`, corrected by
truncated importance sampling (Yao et al. 2025): each token's surrogate is
weighted by min(π_old,trainer / π_old,sampler, tis_cap). The trainer's π_old,
π_θ and π_ref are all softmax(logits / temperature), the sampling temperature
(as TRL and verl); π_old,sampler is what the sampler drew from, top-k/top-p
included (`Rollout.logprobs`), so the TIS weight also corrects for truncation.

A sequence is [prompt (left-padded to P slots); completion (N slots)]; a slot's
RoPE position is slot − pad count, as in the sampler.

Glossary: Q prompts per step, G group size, B = Q·G completions, S rollout
slice rows, b minibatch rows, P prompt slots, N new tokens, L = P + N, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from r1jax.model import ModelConfig, logical_axes
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel import multihost
from r1jax.rewards import text as text_lib
from r1jax.rl import grpo
from r1jax.rl.config import GRPOConfig
from r1jax.rl.rollout import sample
from r1jax.rl.update import RLState, _programs, _train_step, training_arrays
from r1jax.train import optim

# (completions, examples) -> (rewards [B], {reward name: [B]}, metrics);
# `r1jax.rewards.combine.RewardEvaluator` is one.
RewardFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]]],
                    tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]]


# ----------------------------------------------------------------------------
# Host-side helpers.

def reward_from_fn(fn: Callable[[str, Mapping[str, Any]], float], name: str = "reward"
                   ) -> RewardFn:
  """Wraps a per-completion `fn(completion, example) -> float` as a RewardFn, in process."""

  def reward_fn(completions, examples):
    r = np.array([float(fn(c, e)) for c, e in zip(completions, examples)], np.float64)
    return r, {name: r}, {}

  return reward_fn


def tied_groups(rewards_B: np.ndarray, group_size: int) -> np.ndarray:
  """[Q] True where every completion of the prompt got the same reward (DAPO drops these)."""
  r_QxG = np.asarray(rewards_B).reshape(-1, group_size)
  return r_QxG.max(-1) == r_QxG.min(-1)


def _mean_metrics(ms: list[dict]) -> dict[str, float]:
  out = {}
  for k in ms[0]:
    v = np.array([float(m[k]) for m in ms])
    out[k] = v.min() if k == "ratio_min" else v.max() if k == "ratio_max" else v.mean()
  return {k: float(v) for k, v in out.items()}


class GRPOStep:
  """One GRPO iteration per call: `state, metrics = grpo_step(state, examples, rng)`.

  examples: an iterator of dicts with "prompt_ids" (token ids) or "prompt"
  (text, needs `encode`), plus whatever the rewards read ("answer", ...).
  `decode` turns a completion's ids (EOS excluded) into the text the rewards
  score. With `mesh`, params live sharded by their logical axes and every
  batch is split over the data-parallel axes.
  """

  def __init__(self, cfg: ModelConfig, gcfg: GRPOConfig, ocfg: optim.OptimConfig,
               reward_fn: RewardFn, *, decode: Callable[[list[int]], str], eos_id: int | None,
               pad_id: int, encode: Callable[[str], list[int]] | None = None,
               mesh: Mesh | None = None):
    if gcfg.max_prompt_len + gcfg.max_new_tokens > cfg.max_seq_len:
      raise ValueError(f"max_prompt_len + max_new_tokens = {gcfg.max_prompt_len} + "
                       f"{gcfg.max_new_tokens} exceeds the model's max_seq_len={cfg.max_seq_len}")
    if gcfg.mask_truncated and eos_id is None:
      raise ValueError("mask_truncated needs an eos_id: without one every completion is "
                       "truncated and nothing would be trained")
    if mesh is not None:
      n_dp = int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH]))
      gcfg.check_data_parallel(n_dp)
    self.cfg, self.gcfg, self.ocfg = cfg, gcfg, ocfg
    self.reward_fn, self.decode, self.encode = reward_fn, decode, encode
    self.eos_id, self.pad_id, self.mesh = eos_id, pad_id, mesh
    self.optimizer, self._logprob_fn, self._ref_fn, self._copy = _programs(
        cfg, ocfg, gcfg.temperature, gcfg.top_p, gcfg.top_k)
    self._lr = optim.schedule(ocfg)

  # -- state

  def init_state(self, params) -> RLState:
    """Fresh optimizer state; the reference is a copy of `params` (none when β = 0).

    `params` are copied (and placed on the mesh), so the caller's stay valid
    after the donated updates. Every leaf is committed to its device(s): the
    compiled update then sees the same placement at every step.
    """
    if self.mesh is not None:
      params = jax.device_put(params, mesh_lib.logical_sharding(self.mesh, logical_axes(self.cfg)))
    params = self._copy_params(params)
    # Eager init: optax's zeros_like keeps each parameter's sharding.
    opt_state = self.optimizer.init(params)
    ref = self._copy_params(params) if self.gcfg.beta > 0 else None
    state = RLState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    ref_params=ref)
    return jax.device_put(state, jax.tree.map(self._placement, state))

  def _placement(self, x: jax.Array) -> jax.sharding.Sharding:
    """Where a state leaf lives: where it is, or replicated over the mesh (scalars)."""
    if self.mesh is None or getattr(x.sharding, "mesh", None) == self.mesh:
      return x.sharding
    return mesh_lib.replicated(self.mesh)

  def _copy_params(self, params):
    return jax.device_put(self._copy(params), jax.tree.map(lambda x: x.sharding, params))

  def _train_step(self, state: RLState, batch: dict, rng: jax.Array):
    leaves, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, state))
    step = _train_step(self.cfg, self.gcfg.loss_options(), self.ocfg, treedef, tuple(leaves),
                       micro_batches=self.gcfg.micro_batches)
    return step(state, batch, rng)

  def _put(self, batch: dict) -> dict:
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: jax.device_put(v, mesh_lib.batch_sharding(self.mesh, v.ndim))
            for k, v in batch.items()}

  # -- rollout

  def _prompt_ids(self, example: Mapping[str, Any]) -> list[int]:
    if "prompt_ids" in example:
      ids = [int(t) for t in example["prompt_ids"]]
    elif "prompt" in example:
      if self.encode is None:
        raise ValueError("an example has a text 'prompt' but GRPOStep got no `encode`; "
                         "pass encode= or give examples 'prompt_ids'")
      ids = list(self.encode(example["prompt"]))
    else:
      raise ValueError(f"an example needs 'prompt_ids' or 'prompt'; got keys {sorted(example)}")
    if not 1 <= len(ids) <= self.gcfg.max_prompt_len:
      raise ValueError(f"a prompt has {len(ids)} tokens; it must have 1..max_prompt_len="
                       f"{self.gcfg.max_prompt_len} (raise max_prompt_len or filter prompts)")
    return ids

  def _rollout_round(self, params, examples: Iterator[Mapping], rng: jax.Array) -> dict:
    """Samples G completions for Q fresh prompts and scores them; host numpy arrays."""
    g = self.gcfg
    G, Pn = g.group_size, g.max_prompt_len
    try:
      exs = [next(examples) for _ in range(g.prompts_per_step)]
    except StopIteration:
      raise ValueError("the examples iterator ran out; pass an endless one "
                       "(e.g. itertools.cycle) or fewer steps") from None
    prompts_QxP = np.full((len(exs), Pn), self.pad_id, np.int32)
    lengths_Q = np.zeros(len(exs), np.int32)
    for q, ex in enumerate(exs):
      ids = self._prompt_ids(ex)
      prompts_QxP[q, Pn - len(ids):] = ids
      lengths_Q[q] = len(ids)
    prompts_BxP, lengths_B = np.repeat(prompts_QxP, G, 0), np.repeat(lengths_Q, G)
    B, S = len(lengths_B), g.slice_size
    # The rollout in slices of S rows, each a global batch over the mesh with its
    # own latent cache; row i samples with fold_in(rng, i) whatever S is.
    t0 = time.perf_counter()
    parts, rows = [], []
    for s in range(0, B, S):
      ro = sample(self.cfg, params, prompts_BxP[s:s + S], lengths_B[s:s + S],
                  max_new_tokens=g.max_new_tokens, rng=rng, temperature=g.temperature,
                  top_p=g.top_p, top_k=g.top_k, eos_id=self.eos_id, pad_id=self.pad_id,
                  mesh=self.mesh, row_offset=s)
      parts.append(multihost.allgather(dict(tokens=ro.tokens, mask=ro.mask,
                                            finished=ro.finished, lengths=ro.lengths,
                                            sampler_logp=ro.logprobs)))
      rows.append(s + multihost.my_rows(ro.lengths))
      del ro
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    rows = np.concatenate(rows)
    t1 = time.perf_counter()
    # Each process detokenises and scores only the rows it owns; the rewards are
    # then gathered, since a group's advantages need all of its rewards.
    # A row's completion is its tokens without the EOS. Each row gets its own
    # copy of its prompt's example with that token count, for the length rewards.
    n_tokens = [int(out["lengths"][i]) - int(out["finished"][i]) for i in rows]
    texts = [self.decode([int(t) for t in out["tokens"][i, :n]]) for i, n in zip(rows, n_tokens)]
    row_examples = [{**exs[i // G], "completion_tokens": n} for i, n in zip(rows, n_tokens)]
    rewards, per_reward, reward_metrics = self.reward_fn(texts, row_examples)
    out["reflective"] = multihost.gather_rows(
        np.array([text_lib.reflective_words(t) for t in texts], np.float64), rows, B)
    out["rewards"] = multihost.gather_rows(np.asarray(rewards, np.float64), rows, B)
    out["per_reward"] = {k: multihost.gather_rows(np.asarray(v, np.float64), rows, B)
                         for k, v in sorted(per_reward.items())}
    # The evaluator's counters (timeouts, errors) add up over processes; its
    # per-process means are recomputed from the gathered rewards instead.
    out["reward_metrics"] = multihost.sum_over_processes(
        {k: v for k, v in reward_metrics.items() if not k.endswith("/mean")})
    t2 = time.perf_counter()
    return dict(out, prompts=prompts_BxP, prompt_lengths=lengths_B, rollout_s=t1 - t0,
                reward_s=t2 - t1)

  def _collect(self, params, examples: Iterator[Mapping], rng: jax.Array
               ) -> tuple[dict, list[dict], dict[str, float]]:
    """Rollout rounds until the batch is full: one, or with dynamic sampling up to
    1 + max_retries, keeping only groups whose rewards differ."""
    g = self.gcfg
    G, Q = g.group_size, g.prompts_per_step
    rounds, kept, spare = [], [], []  # kept/spare: (round index, group index)
    while True:
      r = self._rollout_round(params, examples, jax.random.fold_in(rng, len(rounds)))
      rounds.append(r)
      tied_Q = tied_groups(r["rewards"], G)
      for q in range(Q):
        (spare if g.dynamic_sampling and tied_Q[q] else kept).append((len(rounds) - 1, q))
      if len(kept) >= Q or not g.dynamic_sampling or len(rounds) > g.max_retries:
        break
    # Past the retry cap the batch is topped up with tied groups (advantage 0)
    # so its shape, and the compiled step, stay the same.
    chosen = (kept + spare)[:Q]
    rows = lambda key: np.concatenate(
        [rounds[i][key][q * G:(q + 1) * G] for i, q in chosen], axis=0)
    batch = {k: rows(k) for k in ("prompts", "prompt_lengths", "tokens", "mask", "finished",
                                  "sampler_logp", "rewards")}
    stats = {"dynamic/rounds": float(len(rounds)),
             "dynamic/informative_groups": float(np.sum(~tied_groups(batch["rewards"], G))),
             "zero_adv_group_frac/sampled": float(np.mean(np.concatenate(
                 [tied_groups(r["rewards"], G) for r in rounds])))}
    return batch, rounds, stats

  # -- the iteration

  def __call__(self, state: RLState, examples: Iterator[Mapping], rng: jax.Array
               ) -> tuple[RLState, dict[str, float]]:
    g = self.gcfg
    step = int(state.step)
    rng = jax.random.fold_in(rng, step)
    rollout_rng, shuffle_rng, update_rng = jax.random.split(rng, 3)

    # Rollout and rewards.
    batch, rounds, metrics = self._collect(state.params, examples, rollout_rng)
    metrics.update(self._rollout_metrics(rounds))

    # Advantages and the loss mask.
    adv_B = np.asarray(grpo.group_advantages(batch["rewards"], g.group_size,
                                             scale=g.advantage_scale, eps=g.advantage_eps))
    data = training_arrays(batch, adv_B, mask_truncated=g.mask_truncated)
    metrics["zero_adv_group_frac"] = float(grpo.zero_advantage_fraction(adv_B, g.group_size))

    t0 = time.perf_counter()
    phase = self._reference_only if self.on_policy else self._old_and_reference
    metrics.update(phase(state, data, batch))
    t1 = time.perf_counter()

    # μ passes over shuffled minibatches.
    b = g.minibatch_size
    step_metrics = []
    for it in range(g.num_iterations):
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_rng, it), g.batch_size))
      for k in range(g.n_minibatches):
        idx = perm[k * b:(k + 1) * b]
        mb = self._put({key: v[idx] for key, v in data.items()})
        state, m = self._train_step(state, mb, jax.random.fold_in(update_rng,
                                                                   it * g.n_minibatches + k))
        step_metrics.append(m)
    step_metrics = jax.device_get(step_metrics)
    t2 = time.perf_counter()
    metrics.update(_mean_metrics(step_metrics))

    # Reference reset (R1: every 400 updates), counted in updates like the paper.
    updates_before = step * g.updates_per_step
    updates_after = updates_before + g.updates_per_step
    state = state.replace(step=jax.device_put(state.step + 1, state.step.sharding))
    if (g.ref_reset_every and state.ref_params is not None
        and updates_after // g.ref_reset_every > updates_before // g.ref_reset_every):
      state = state.replace(ref_params=self._copy_params(state.params))
      metrics["ref_reset"] = 1.0

    n_train_tokens = float(data["valid"].sum()) * g.num_iterations
    metrics.update({
        "time/logprob_s": t1 - t0, "time/train_s": t2 - t1,
        "train_tokens_per_s": n_train_tokens / max(t2 - t1, 1e-9),
        "lr": float(self._lr(updates_after - 1)), "step": float(step + 1)})
    return state, metrics

  @property
  def on_policy(self) -> bool:
    """One update per rollout without top-k/top-p: π_old is π_θ at the update, so
    no forward computes it (the loss takes stop_gradient(log π_θ), as TRL does)
    and the sampler checks run inside the update (update.on_policy_checks)."""
    g = self.gcfg
    return (g.num_iterations == 1 and g.n_minibatches == 1
            and g.top_k == 0 and g.top_p >= 1.0)

  def _reference_only(self, state: RLState, data: dict, batch: dict) -> dict:
    """Adds the on-policy update's inputs to `data`: π_ref's log-probs (β > 0) and
    the sampler's. No metrics: the update computes the sampler checks."""
    data["sampler_logp"] = np.asarray(batch["sampler_logp"], np.float32)
    if state.ref_params is not None:
      chunk = self._put({k: data[k] for k in ("tokens", "positions", "valid", "mask")})
      ref = self._ref_fn(state.ref_params, chunk)
      data["ref_logp"] = np.concatenate(multihost.allgather([ref])).astype(np.float32)
    return {}

  def _old_and_reference(self, state: RLState, data: dict, batch: dict) -> dict:
    """Adds to `data` π_old (the trainer's recomputation) and π_ref, minibatch by
    minibatch, at the sampling temperature; also π_old under the sampler's
    top-k/top-p cut, for the sampler/trainer mismatch metrics and the TIS weights."""
    g = self.gcfg
    b = g.minibatch_size
    metrics = {}
    olds, refs, sampled = [], [], []
    for k in range(g.n_minibatches):
      chunk = self._put({key: data[key][k * b:(k + 1) * b]
                         for key in ("tokens", "positions", "valid", "mask")})
      old, ref, old_sampled = self._logprob_fn(state.params, state.ref_params, chunk)
      olds.append(old)
      refs.append(ref)
      sampled.append(old_sampled)
    data["old_logp"] = np.concatenate(multihost.allgather(olds)).astype(np.float32)
    if state.ref_params is not None:
      data["ref_logp"] = np.concatenate(multihost.allgather(refs)).astype(np.float32)
    truncated = g.top_k > 0 or g.top_p < 1.0
    sampled_BxN = (np.concatenate(multihost.allgather(sampled)) if truncated
                   else data["old_logp"])
    metrics.update(self._mismatch(data["old_logp"], sampled_BxN, batch["sampler_logp"],
                                  batch["mask"]))
    if g.tis_cap > 0:
      # π_old,trainer (untruncated: the policy the loss trains) over what the
      # sampler drew from: the importance weight of the behaviour actually used.
      # With top-k/top-p it includes the kept mass (w ≤ 1 but for numerics).
      log_w_BxN = np.where(batch["mask"], data["old_logp"] - batch["sampler_logp"], 0.0)
      w_BxN = np.minimum(np.exp(log_w_BxN), g.tis_cap)
      data["tis_weights"] = w_BxN.astype(np.float32)
      metrics["tis/capped_frac"] = float(np.sum((w_BxN >= g.tis_cap) & batch["mask"])
                                         / max(batch["mask"].sum(), 1))
    return metrics

  def _rollout_metrics(self, rounds: list[dict]) -> dict[str, float]:
    """Reward and length statistics over every completion sampled this step."""
    cat = lambda key: np.concatenate([r[key] for r in rounds])
    rewards, lengths, finished = cat("rewards"), cat("lengths"), cat("finished")
    reflective = cat("reflective")
    rollout_s = sum(r["rollout_s"] for r in rounds)
    m = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
         "response_len/mean": float(lengths.mean()), "response_len/max": float(lengths.max()),
         "truncation_rate": float(1.0 - finished.mean()),
         # R1's "aha" count: reflective words per completion, and the share using any
         "reflect/words_per_response": float(reflective.mean()),
         "reflect/rate": float((reflective > 0).mean()),
         "time/rollout_s": rollout_s, "time/reward_s": sum(r["reward_s"] for r in rounds),
         "rollout_tokens_per_s": float(lengths.sum()) / max(rollout_s, 1e-9)}
    for name in rounds[0]["per_reward"]:
      v = np.concatenate([r["per_reward"][name] for r in rounds])
      m[f"reward/{name}/mean"], m[f"reward/{name}/std"] = float(v.mean()), float(v.std())
    if "accuracy" in rounds[0]["per_reward"]:
      m["accuracy"] = m["reward/accuracy/mean"]
    for r in rounds:  # the evaluator's own counters (timeouts, errors), summed over rounds
      for k, v in r["reward_metrics"].items():
        if not k.endswith("/mean"):
          m[k] = m.get(k, 0.0) + float(v)
    return m

  @staticmethod
  def _mismatch(old_BxN: np.ndarray, sampled_BxN: np.ndarray, sampler_BxN: np.ndarray,
                mask_BxN: np.ndarray) -> dict[str, float]:
    """The trainer's π_old against the sampler's record of the same tokens, same params.

    logp_mismatch: |trainer − sampler| log-prob under the one distribution the
    sampler drew from (temperature and top-k/top-p on both sides): numerics
    alone (bf16, kernels), ~1e-6 in f32. A sampled token that the trainer's own
    cut drops (a near-tie at the top-k/top-p edge) counts in
    logp_mismatch/outside_frac instead of the mean and max.
    logp_truncation/mean: sampler − trainer π_old (untruncated), i.e. −log of
    the probability mass top-k/top-p kept: ≥ 0, 0 without truncation. It is how
    far the sampled distribution is from the trained one.
    """
    mask_BxN = np.asarray(mask_BxN, bool)
    sampled_BxN = np.asarray(sampled_BxN, np.float64)
    inside_BxN = mask_BxN & np.isfinite(sampled_BxN)
    d = np.abs(sampled_BxN - sampler_BxN)[inside_BxN]
    gap = (sampler_BxN - old_BxN)[mask_BxN]
    return {"logp_mismatch/mean": float(d.mean()) if d.size else 0.0,
            "logp_mismatch/max": float(d.max()) if d.size else 0.0,
            "logp_mismatch/outside_frac": float((mask_BxN & ~inside_BxN).sum()
                                                / max(mask_BxN.sum(), 1)),
            "logp_truncation/mean": float(gap.mean()) if gap.size else 0.0}
