"""The peers' side of `bench --compare-hf` / `--compare-trl`: transformers and TRL in torch.

Two halves. The host half (no torch; imported by bench.py only when a
--compare flag is given) finds the peer interpreter, writes a job directory
and runs this file in that interpreter as a subprocess, so the JAX and torch
environments never mix, and checks the peer's outputs against ours. The peer
half (`python bench_peers.py JOB_DIR`, torch, transformers, trl) loads the
checkpoint that `r1jax.interop.hf.save` wrote into the job directory, so both
sides hold the same weights, does the job that job.json names and writes
result.json (timings, versions) and its outputs (logits.npy, tokens.npy).

This file imports nothing from r1jax, so the peer venv needs no JAX:

  python3 -m venv /work/peer && /work/peer/bin/pip install torch==2.13.0 transformers trl
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

INSTALL = ("python3 -m venv /work/peer && /work/peer/bin/pip install torch==2.13.0 "
           "transformers trl, then pass --peer_python=/work/peer/bin/python")
JOBS = ("forward", "train", "generate", "grpo")


# ----------------------------------------------------------------------------
# Host half (no torch).

def peer_modules(job: str) -> tuple[str, ...]:
  """What the peer interpreter must import for `job`."""
  if job not in JOBS:
    raise ValueError(f"unknown peer job {job!r}; one of {', '.join(JOBS)}")
  return ("torch", "transformers", "trl") if job == "grpo" else ("torch", "transformers")


def resolve_peer_python(flag: str | None, job: str) -> str:
  """--peer_python, else this interpreter if it has the peer's modules; else a one-line error."""
  need = peer_modules(job)
  if not flag:
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
      raise ValueError(f"--peer_python is not set and this interpreter cannot import "
                       f"{', '.join(missing)}; install the peer side with: {INSTALL}")
    return sys.executable
  if not os.access(flag, os.X_OK):
    raise ValueError(f"--peer_python={flag} is not an executable file; create it with: {INSTALL}")
  probe = subprocess.run([flag, "-c", f"import {', '.join(need)}"], capture_output=True,
                         text=True)
  if probe.returncode:
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    raise ValueError(f"--peer_python={flag} cannot import {', '.join(need)} ({last}); "
                     f"install with: {INSTALL}")
  return flag


def run_peer(python: str, job_dir: str, spec: dict, timeout_s: float | None = None) -> dict:
  """Writes job.json, runs the peer half in `python`, returns its result.json."""
  with open(os.path.join(job_dir, "job.json"), "w") as f:
    json.dump(spec, f)
  env = dict(os.environ, PYTHONPATH="")  # the peer venv's own packages only
  proc = subprocess.run([python, os.path.abspath(__file__), job_dir], capture_output=True,
                        text=True, env=env, timeout=timeout_s)
  if proc.returncode:
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise RuntimeError(f"the peer {spec['job']} job failed (exit {proc.returncode}):\n{tail}")
  with open(os.path.join(job_dir, "result.json")) as f:
    return json.load(f)


def parity(ours, theirs, atol: float) -> dict:
  """max |ours − theirs| of two same-shape float arrays, and whether it is within atol."""
  import numpy as np
  a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"parity: shapes differ, ours {a.shape} vs peer {b.shape}: the two "
                     "sides did not do the same work")
  diff = float(np.max(np.abs(a - b))) if a.size else 0.0
  return {"max_abs_diff": diff, "ok": bool(diff <= atol), "atol": atol}


def token_agreement(ours, theirs) -> dict:
  """Greedy tokens: fraction equal, and equal rows' share (f32 near-ties may flip a few)."""
  import numpy as np
  a, b = np.asarray(ours), np.asarray(theirs)
  if a.shape != b.shape:
    raise ValueError(f"token parity: shapes differ, ours {a.shape} vs peer {b.shape}")
  # Up to each row's first difference: past it the two continuations diverge by design.
  same = a == b
  prefix = np.where(same.all(1), a.shape[1], np.argmin(same, 1))
  return {"tokens_equal": float(same.mean()), "rows_equal": float(same.all(1).mean()),
          "mean_equal_prefix": float(prefix.mean())}


def speedup(ours_s: float, theirs_s: float) -> float:
  """theirs / ours: above 1 means r1jax is faster."""
  if ours_s <= 0 or theirs_s <= 0:
    raise ValueError(f"speedup needs positive times, got ours={ours_s} peer={theirs_s}")
  return round(theirs_s / ours_s, 3)


def token_text(ids) -> str:
  """The text both GRPO sides score: one word per token ("t17"), so the peer's
  word-level tokenizer maps it back to the same ids."""
  return " ".join(f"t{int(i)}" for i in ids)


def text_ids(text: str) -> list[int]:
  return [int(w[1:]) for w in text.split() if w[:1] == "t" and w[1:].isdigit()]


def low_id_reward(text: str, vocab_size: int) -> float:
  """The GRPO benchmark's reward: the share of completion tokens in the lower half
  of the vocabulary. Cheap and deterministic, so rewards are not what is timed."""
  ids = text_ids(text)
  return sum(i < vocab_size // 2 for i in ids) / len(ids) if ids else 0.0


# ----------------------------------------------------------------------------
# Peer half (torch; runs in the peer interpreter).

def _versions() -> dict:
  import torch
  import transformers
  out = {"torch": torch.__version__, "transformers": transformers.__version__,
         "torch_threads": torch.get_num_threads()}
  if importlib.util.find_spec("trl") is not None:
    import trl
    out["trl"] = trl.__version__
  return out


def _load_model(path: str):
  import torch
  from transformers import AutoModelForCausalLM
  try:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  except TypeError:  # transformers 4 spells it torch_dtype
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
  model.generation_config.eos_token_id = None  # every row makes all its new tokens
  return model


def _time(fn, repeats: int) -> tuple[float, float]:
  """(first call seconds, median of `repeats` later calls), as bench._timed."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def _peer_forward(job_dir: str, spec: dict) -> dict:
  import numpy as np
  import torch
  model = _load_model(os.path.join(job_dir, "ckpt")).eval()
  ids = torch.from_numpy(np.load(os.path.join(job_dir, "tokens_in.npy")).astype(np.int64))
  with torch.no_grad():
    logits = model(input_ids=ids).logits
    np.save(os.path.join(job_dir, "logits.npy"), logits.float().numpy())
    first, mean = _time(lambda: model(input_ids=ids).logits, spec["repeats"])
  return {"step_s": round(mean, 4), "first_s": round(first, 4)}


def _peer_train(job_dir: str, spec: dict) -> dict:
  """transformers' loss (next-token cross-entropy), backward, AdamW."""
  import numpy as np
  import torch
  model = _load_model(os.path.join(job_dir, "ckpt")).train()
  ids = torch.from_numpy(np.load(os.path.join(job_dir, "tokens_in.npy")).astype(np.int64))
  with torch.no_grad():
    np.save(os.path.join(job_dir, "logits.npy"), model(input_ids=ids).logits.float().numpy())
  opt = torch.optim.AdamW(model.parameters(), lr=spec.get("lr", 1e-4), betas=(0.9, 0.95),
                          weight_decay=0.1)

  def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  first, mean = _time(step, spec["repeats"])
  return {"step_s": round(mean, 4), "first_s": round(first, 4)}


def _peer_generate(job_dir: str, spec: dict) -> dict:
  """Greedy decoding with the KV cache: all `new` tokens for every row."""
  import numpy as np
  import torch
  model = _load_model(os.path.join(job_dir, "ckpt")).eval()
  ids = torch.from_numpy(np.load(os.path.join(job_dir, "tokens_in.npy")).astype(np.int64))
  n = spec["new"]

  def gen():
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0)

  with torch.no_grad():
    np.save(os.path.join(job_dir, "logits.npy"), model(input_ids=ids).logits.float().numpy())
    out = gen()
    np.save(os.path.join(job_dir, "tokens.npy"), out[:, ids.shape[1]:].numpy())
    first, mean = _time(gen, spec["repeats"])
  return {"step_s": round(mean, 4), "first_s": round(first, 4)}


def _word_tokenizer(vocab_size: int):
  """A word-level tokenizer: "t17" <-> id 17, so text prompts are exactly our token ids."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1",
                                 unk_token="t2", padding_side="left")


class _PhaseClock:
  """Wraps a GRPOTrainer's methods to time rollout, rewards and log-probs per step."""

  def __init__(self, trainer):
    self.split = {"rollout": 0.0, "rewards": 0.0, "logprobs": 0.0, "prepare": 0.0}
    self.preparing = False
    self._wrap(trainer, "_generate", "rollout")
    self._wrap(trainer, "_calculate_rewards", "rewards")
    self._wrap(trainer, "_generate_and_score_completions", "prepare", flag=True)
    # Log-probs computed while preparing the batch (the reference's; π_old's too when
    # TRL needs it); the same method inside the loss is the update's.
    self._wrap(trainer, "_get_per_token_logps_and_entropies", "logprobs", only_preparing=True)

  def _wrap(self, trainer, name: str, phase: str, flag: bool = False,
            only_preparing: bool = False) -> None:
    inner = getattr(trainer, name)

    def timed(*a, **kw):
      if only_preparing and not self.preparing:
        return inner(*a, **kw)
      self.preparing = self.preparing or flag
      t0 = time.perf_counter()
      try:
        return inner(*a, **kw)
      finally:
        self.split[phase] += time.perf_counter() - t0
        if flag:
          self.preparing = False

    setattr(trainer, name, timed)

  def take(self) -> dict:
    out, self.split = self.split, dict.fromkeys(self.split, 0.0)
    return out


def _peer_grpo(job_dir: str, spec: dict) -> dict:
  """TRL's GRPOTrainer: same model, prompts, group size, lengths, β, reward rule; CPU, no vLLM."""
  import numpy as np
  import torch
  from datasets import Dataset
  from transformers import TrainerCallback
  from trl import GRPOConfig, GRPOTrainer
  V, N = spec["vocab_size"], spec["new"]
  model = _load_model(os.path.join(job_dir, "ckpt"))
  ids = torch.from_numpy(np.load(os.path.join(job_dir, "tokens_in.npy")).astype(np.int64))
  with torch.no_grad():
    np.save(os.path.join(job_dir, "logits.npy"), model(input_ids=ids).logits.float().numpy())

  lengths: list[int] = []

  def low_ids(completions, completion_ids=None, **_):
    if completion_ids is not None:
      lengths.extend(len(c) for c in completion_ids)
      return [sum(int(i) < V // 2 for i in c) / max(len(c), 1) for c in completion_ids]
    return [low_id_reward(c, V) for c in completions]

  config = GRPOConfig(
      output_dir=os.path.join(job_dir, "trl"), use_cpu=True, report_to="none",
      save_strategy="no", logging_steps=10 ** 6, max_steps=spec["steps"], seed=0,
      per_device_train_batch_size=spec["prompts_per_step"] * spec["group"],
      gradient_accumulation_steps=1, steps_per_generation=1, num_generations=spec["group"],
      max_completion_length=N, generation_kwargs={"min_new_tokens": N},  # no early EOS
      temperature=1.0, top_p=1.0, top_k=0, beta=spec["beta"], num_iterations=1,
      epsilon=0.2, loss_type="grpo", scale_rewards="group", learning_rate=spec["lr"],
      lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, use_vllm=False,
      shuffle_dataset=False, bf16=False, fp16=False, disable_dropout=True,
      log_completions=False, dataloader_num_workers=0)
  data = Dataset.from_dict({"prompt": [token_text(p) for p in spec["prompts"]]})
  trainer = GRPOTrainer(model=model, reward_funcs=low_ids, args=config, train_dataset=data,
                        processing_class=_word_tokenizer(V))
  clock = _PhaseClock(trainer)
  steps: list[dict] = []

  class StepTimer(TrainerCallback):
    def on_step_begin(self, *a, **kw):
      clock.take()
      self.t0 = time.perf_counter()

    def on_step_end(self, *a, **kw):
      step_s = time.perf_counter() - self.t0
      split = clock.take()
      prepare = split.pop("prepare")
      split["update"] = step_s - prepare
      split["other"] = prepare - split["rollout"] - split["rewards"] - split["logprobs"]
      steps.append({"step_s": step_s, **split})

  trainer.add_callback(StepTimer())
  trainer.train()
  timed = sorted(steps[1:], key=lambda s: s["step_s"])
  median = timed[len(timed) // 2]
  r = lambda d: {k: round(v, 4) for k, v in d.items()}
  return {"step_s": round(median["step_s"], 4), "first_step": r(steps[0]),
          "median_step": r(median), "all_step_s": [round(s["step_s"], 4) for s in steps],
          "completion_len_mean": round(float(np.mean(lengths)), 2) if lengths else None,
          # Steps aligned with generations: TRL takes π_old = π_θ.detach() in the loss.
          "old_logps_recomputed": False}


def peer_main(job_dir: str) -> None:
  with open(os.path.join(job_dir, "job.json")) as f:
    spec = json.load(f)
  import torch
  torch.manual_seed(0)
  if spec.get("threads"):
    torch.set_num_threads(spec["threads"])
  run = {"forward": _peer_forward, "train": _peer_train, "generate": _peer_generate,
         "grpo": _peer_grpo}[spec["job"]]
  result = {**run(job_dir, spec), **_versions()}
  with open(os.path.join(job_dir, "result.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  peer_main(sys.argv[1])
