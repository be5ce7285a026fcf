"""One evaluation code path: k samples per prompt, scored, voted and summarised.

Used by the `eval` stage and by the in-stage evaluation of sft and grpo
(`stages.evaluate`). Generation is multi-host aware (`stages.generate` gathers
every row onto every process); each process scores its own rows
(`stages.score`) and the scores are gathered, so every process computes the
same metrics; process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from r1jax import storage
from r1jax.data.tasks import general
from r1jax.eval import metrics as metrics_lib
from r1jax.pipeline import stages
from r1jax.pipeline.context import Context
from r1jax.rewards import text as text_lib
from r1jax.rewards.accuracy import extract_answers

# The per-sample scores an evaluation reads (format options follow the template).
REWARDS = (("accuracy", 1.0), ("format", 1.0), ("language", 1.0))


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the k samples per prompt are drawn (R1's evaluation: T 0.6, top-p 0.95)."""
  samples: int = 8
  temperature: float = 0.6
  top_p: float = 0.95
  top_k: int = 0
  template: str = "r1_chat"
  max_prompt_len: int = 112
  max_new_tokens: int = 64
  batch_rows: int = 256  # sampler batch (a cap: smaller when there are fewer rows)


def extracted_answer(completion: str) -> str | None:
  """The answer a sample votes for: its one distinct final answer, else None
  (no answer, or several different ones; see r1jax.rewards.accuracy)."""
  found = extract_answers(completion)
  return found[0] if found and len(found) == 1 else None


def run(ctx: Context, cfg, params, benchmarks: Sequence[tuple[str, list[dict]]],
        sampling: Sampling, seed: int, pass_ks: Sequence[int] = (),
        same: metrics_lib.Same | None = None) -> tuple[dict, list[dict]]:
  """({benchmark: metrics}, one record per sample), the same on every process.
  `same` groups the answers of a vote (None: by each benchmark's match mode,
  metrics.same_for).

  All benchmarks share one `generate` call, so the sampler's batches stay full."""
  examples = [dict(e, benchmark=name, prompt_index=i)
              for name, exs in benchmarks for i, e in enumerate(exs)]
  rows = stages.batch_rows(ctx, len(examples) * sampling.samples, sampling.batch_rows)
  gens = stages.generate(ctx, cfg, params, examples, template=sampling.template,
                         samples=sampling.samples, temperature=sampling.temperature,
                         top_p=sampling.top_p, top_k=sampling.top_k,
                         max_prompt_len=sampling.max_prompt_len,
                         max_new_tokens=sampling.max_new_tokens, batch_rows=rows, seed=seed)
  per = stages.score(ctx, gens, stages.reward_terms(REWARDS, sampling.template))
  records = []
  for i, e in enumerate(gens.examples):  # example-major: k consecutive rows per prompt
    completion = gens.completion(ctx.tok, i)
    records.append({
        "benchmark": e["benchmark"], "prompt_index": e["prompt_index"],
        "sample_index": i % sampling.samples, "question": e["question"], "gold": e["answer"],
        "completion": completion, "extracted": extracted_answer(completion),
        "correct": bool(per["accuracy"][i] >= 1.0), "tokens": len(gens.tokens[i]),
        "finished": bool(gens.finished[i]), "format": float(per["format"][i]),
        "language": float(per["language"][i]), "prompt_language": e.get("language", "en"),
        "reflective": text_lib.reflective_words(completion),
        "at_once": general.answers_at_once(text_lib.reasoning(completion))})
  results = {}
  for name, exs in benchmarks:
    mine = [r for r in records if r["benchmark"] == name]
    if not mine:
      ctx.log(f"  WARNING: benchmark {name}: no prompt fits max_prompt_len="
              f"{sampling.max_prompt_len}; skipped")
      continue
    results[name] = summarise(mine, sampling.samples, pass_ks,
                              same or metrics_lib.same_for(exs))
    results[name]["prompts_skipped"] = len(exs) - results[name]["n_prompts"]
  return results, records


def summarise(records: list[dict], k: int, pass_ks: Sequence[int] = (),
              same: metrics_lib.Same = metrics_lib.math_same) -> dict:
  """One benchmark's metrics from its sample records (k per prompt, in order)."""
  n_prompts = len(records) // k
  correct_PxK = np.array([r["correct"] for r in records], bool).reshape(n_prompts, k)
  answers = [[r["extracted"] for r in records[p * k:(p + 1) * k]] for p in range(n_prompts)]
  out = metrics_lib.benchmark_metrics(correct_PxK, answers, pass_ks, same)

  def mean(key):
    return float(np.mean([r[key] for r in records]))

  out.update({"n_prompts": n_prompts, "k": k, "response_len": mean("tokens"),
              "format": mean("format"), "truncated": 1.0 - mean("finished"),
              "language": mean("language"), "reflective_words": mean("reflective"),
              # answered without a chain of thought (general.DIRECT's one sentence)
              "at_once": mean("at_once"),
              "answered": float(np.mean([r["extracted"] is not None for r in records]))})
  out.update(_language_mixing(records))
  return out


def _language_mixing(records: list[dict]) -> dict:
  """"mixed": the share of samples whose reasoning is not all in the prompt's language
  (consistency < 1); with prompts in several languages, also each language's
  consistency and mixed share ("language/zh", "mixed/zh")."""
  consistency = np.array([r["language"] for r in records])
  out = {"mixed": float(np.mean(consistency < 1.0))}
  langs = [r.get("prompt_language", "en") for r in records]
  if len(set(langs)) > 1:
    for lang in sorted(set(langs)):
      mine = consistency[[x == lang for x in langs]]
      out[f"language/{lang}"] = float(mine.mean())
      out[f"mixed/{lang}"] = float(np.mean(mine < 1.0))
  return out


def write(ctx: Context, stage_dir: str, results: dict, records: list[dict]) -> None:
  """eval.json ({benchmark: metrics}) and samples.jsonl (one line per sample), by process 0."""
  if ctx.is_main_process:
    storage.write_json(storage.join(stage_dir, "eval.json"), results, indent=1)
    storage.write_jsonl(storage.join(stage_dir, "samples.jsonl"), records)


def log_table(ctx: Context, results: dict) -> None:
  for name, m in results.items():
    k = m["k"]
    ctx.log(f"  {name}: pass@1 {m['pass@1']:.3f}  cons@{k} {m[f'cons@{k}']:.3f}  "
            f"format {m['format']:.3f}  truncated {m['truncated']:.3f}  mixed {m['mixed']:.3f}  "
            f"length {m['response_len']:.1f}  ({m['n_prompts']} prompts × {k})")
