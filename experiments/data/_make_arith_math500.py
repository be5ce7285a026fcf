"""Writes arith_math500.jsonl: problems of the toy experiments' arithmetic task in
the MATH-500 layout ({problem, solution, answer}, plus unique_id and language),
so the tiny models are benchmarked through the same JSONL reader as real ones.

  python experiments/data/_make_arith_math500.py

The problems follow experiments/r1_zero/tiny.py's task (sums of one to three
single digits, a quarter in Chinese), drawn from the held-out part of the
problem space (never trained on) and distinct from the experiments' own
held-out split, so the two benchmarks share no problem.
"""

import json
import os

from r1jax.data import tasks

N_PROBLEMS = 100
SEED = 2026
OPTIONS = dict(min_steps=1, max_steps=3, max_operand=9, ops="+", zh_fraction=0.25)


def main() -> None:
  # The experiments' held-out split: seed 0, n_eval 200 (smaller ones are its prefix).
  _, theirs = tasks.make_splits("arithmetic", n_train=0, n_eval=200, seed=0, **OPTIONS)
  taken = {tasks.get("arithmetic").key(e) for e in theirs}
  _, pool = tasks.make_splits("arithmetic", n_train=0, n_eval=3 * N_PROBLEMS, seed=SEED,
                              **OPTIONS)
  held_out = [e for e in pool if tasks.get("arithmetic").key(e) not in taken][:N_PROBLEMS]
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arith_math500.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for i, e in enumerate(held_out):
      row = {"problem": e["question"], "solution": f"{e['cot']} $\\boxed{{{e['answer']}}}$",
             "answer": e["answer"], "unique_id": f"arith/{i}", "language": e["language"]}
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  print(f"wrote {len(held_out)} problems to {path}")


if __name__ == "__main__":
  main()
