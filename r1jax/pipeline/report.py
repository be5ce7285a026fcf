"""End-of-run report: PNG plots of every stage's metrics and a summary table."""

from __future__ import annotations

from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only; no display on pods or CI
import matplotlib.pyplot as plt  # noqa: E402

from r1jax import storage  # noqa: E402
from r1jax.train.metrics import read_jsonl  # noqa: E402

# The curves worth a panel, in this order, when a stage logged them.
PANELS = (
    ("reward/mean", "reward"), ("accuracy", "accuracy (train rollouts)"),
    ("response_len/mean", "response length (tokens)"),
    ("reflect/words_per_response", "reflective words per response"), ("kl", "KL to reference"),
    ("loss", "loss"), ("lm_loss", "LM loss"), ("max_vio", "MaxVio (expert load)"),
    ("eval/accuracy", "held-out pass@1 and cons@k"),
)


def plot_stage(stage_dir: str, title: str) -> str | None:
  rows = read_jsonl(storage.join(stage_dir, "metrics.jsonl"))
  panels = [(k, label) for k, label in PANELS if any(k in r for r in rows)]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
  for ax, (key, label) in zip(axes[0], panels):
    # The in-stage evaluation's panel draws majority voting beside pass@1.
    keys = [key] + (sorted({k for r in rows for k in r if k.startswith("eval/cons@")})
                    if key == "eval/accuracy" else [])
    for k in keys:
      pts = [(r["step"], r[k]) for r in rows if k in r]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5, marker="." if len(keys) > 1
              else None, label=k.split("/", 1)[1] if len(keys) > 1 else None)
    if len(keys) > 1:
      ax.legend(fontsize=7)
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path = storage.join(stage_dir, "metrics.png")
  storage.save_figure(path, fig, dpi=110)
  plt.close(fig)
  return path


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.3f}"
  return str(v)


def summary_table(results: dict[str, dict]) -> str:
  keys = ("kind", "wall_s", "steps", "final_loss", "accuracy_before", "accuracy_after",
          "format_after", "rows_kept")
  lines = ["| stage | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
  for name, out in results.items():
    lines.append(f"| {name} | " + " | ".join(_fmt(out.get(k, "")) for k in keys) + " |")
  return "\n".join(lines)


def eval_table(results: dict[str, dict]) -> str:
  """One row per (eval stage, benchmark) from the stages' "<benchmark>/<metric>" outputs;
  "" when the run has no eval stage."""
  rows = []
  for name, out in results.items():
    if out.get("kind") != "eval":
      continue
    benches = dict.fromkeys(k.split("/")[0] for k in out if "/" in k)
    for b in benches:
      m = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith(b + "/")}
      k = int(m["k"])
      passes = ", ".join(f"{_fmt(m[f'pass@{n}'])} (@{n})" for n in (2, 4, 8, 16, 32, 64)
                         if f"pass@{n}" in m)
      rows.append(f"| {name} | {b} | {int(m['n_prompts'])} | {k} | {_fmt(m['pass@1'])} | "
                  f"{_fmt(m[f'cons@{k}'])} | {passes} | {_fmt(m['format'])} | "
                  f"{_fmt(m['truncated'])} | {_fmt(m['language'])} | "
                  f"{m['response_len']:.1f} |")
  if not rows:
    return ""
  head = ("| eval stage | benchmark | prompts | k | pass@1 | cons@k | pass@k | format | "
          "truncated | language | tokens |")
  return "\n".join([head, "|" + "---|" * 11] + rows)


def write(workdir: str, c, results: dict[str, dict], log: Callable[[str], None] = print) -> None:
  for name in results:
    path = plot_stage(storage.join(workdir, name), f"{name} ({results[name].get('kind', '')})")
    if path:
      log(f"[report] {path}")
  table = summary_table(results)
  evals = eval_table(results)
  if evals:
    table += "\n\n" + evals
  storage.write_text(storage.join(workdir, "summary.md"), table + "\n")
  log(table)
