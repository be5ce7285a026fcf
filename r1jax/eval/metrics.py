"""Benchmark metrics as R1 reports them, from per-sample correctness and answers.

Per prompt there are n samples, c of them correct:
- pass@1: mean correctness over all samples (= the mean over prompts of c/n);
- unbiased pass@k (Codex, Chen et al. 2021): 1 - C(n-c, k)/C(n, k), the chance
  that at least one of k samples drawn without replacement from the n is right;
- cons@n: the majority vote over the n extracted answers is right. Answers that
  math-verify finds equivalent (`1/2`, `0.5`, `\\frac12`) are one answer (in a
  benchmark matched exactly: the same string, `same_for`); a
  sample with no extracted answer casts no vote. Ties go to the answer first
  seen in sample order (lowest sample index), so the vote is deterministic.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Same = Callable[[str, str], bool]  # (answer a, answer b) -> equivalent?


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k for one prompt with n samples of which c are correct."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:  # every draw of k holds a correct sample
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def math_same(a: str, b: str) -> bool:
  """Whether two extracted answers are the same under math-verify (either direction)."""
  from r1jax.rewards.accuracy import is_equivalent  # noqa: PLC0415 - pulls in sympy
  return is_equivalent(a, b, "math") or is_equivalent(b, a, "math")


def exact_same(a: str, b: str) -> bool:
  """Whether two extracted answers are the same string, whitespace normalised."""
  return " ".join(a.split()) == " ".join(b.split())


def same_for(examples: Sequence[dict]) -> Same:
  """How a benchmark's votes are grouped: as exact strings when every problem is
  matched exactly (math-verify reads "star" and "rats" as one product of symbols),
  else under math-verify."""
  if examples and all(e.get("match") == "exact" for e in examples):
    return exact_same
  return math_same


def vote(answers: Sequence[str | None], same: Same = math_same) -> int | None:
  """Index of the sample whose answer wins the majority vote, or None if none answered.

  Answers are grouped in sample order: each joins the first earlier group whose
  first answer it equals (identical strings never reach `same`). The biggest
  group wins; among equals, the group that started first. The returned index
  is that group's first sample."""
  groups: list[list[int]] = []  # sample indices; groups[g][0] is the representative
  by_text: dict[str, int] = {}  # normalised answer -> its group
  for i, a in enumerate(answers):
    if a is None:
      continue
    key = " ".join(a.split())
    g = by_text.get(key)
    if g is None:
      g = next((j for j, grp in enumerate(groups) if same(answers[grp[0]], a)), None)
      if g is None:
        groups.append([])
        g = len(groups) - 1
      by_text[key] = g
    groups[g].append(i)
  if not groups:
    return None
  best = max(range(len(groups)), key=lambda g: (len(groups[g]), -g))
  return groups[best][0]


def benchmark_metrics(correct_PxK: np.ndarray, answers: Sequence[Sequence[str | None]],
                      pass_ks: Sequence[int], same: Same = math_same) -> dict[str, float]:
  """{"pass@1", "pass@k" for k in pass_ks (k <= K), "cons@K"} over P prompts × K samples."""
  correct_PxK = np.asarray(correct_PxK, bool)
  P, K = correct_PxK.shape
  if P == 0:
    raise ValueError("no prompts to score")
  c_P = correct_PxK.sum(-1)
  out = {"pass@1": float(correct_PxK.mean())}
  for k in sorted(set(pass_ks)):
    if 1 < k <= K:
      out[f"pass@{k}"] = float(np.mean([pass_at_k(K, int(c), k) for c in c_P]))
  winners = [vote(a, same) for a in answers]
  out[f"cons@{K}"] = float(np.mean([w is not None and bool(correct_PxK[p, w])
                                    for p, w in enumerate(winners)]))
  return out
