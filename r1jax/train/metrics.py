"""Per-stage metric logging: metrics.jsonl, TensorBoard events, a progress bar.

Only the main process writes. On resume, `metrics.jsonl` is cut back to the
checkpoint's step so the lines after it are not duplicated when redone.
"""

from __future__ import annotations

import json
import math
import os

import jax
import tqdm
from tensorboardX import SummaryWriter


def _scalar(v) -> float | None:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  def __init__(self, stage_dir: str, *, total_steps: int, start_step: int = 0,
               show: tuple[str, ...] = ("loss",), desc: str = ""):
    self.main = jax.process_index() == 0
    self.path = os.path.join(stage_dir, "metrics.jsonl")
    self.show = show
    if not self.main:
      return
    kept = [m for m in read_jsonl(self.path) if m["step"] <= start_step]
    with open(self.path, "w") as f:
      f.writelines(json.dumps(m) + "\n" for m in kept)
    self._file = open(self.path, "a")
    self._tb = SummaryWriter(os.path.join(stage_dir, "tensorboard"), purge_step=start_step + 1)
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                          mininterval=1.0)

  def write(self, step: int, metrics: dict) -> dict:
    """Logs the scalar entries of `metrics` at `step`; returns them as floats."""
    row = {k: _scalar(v) for k, v in metrics.items()}
    row = {k: v for k, v in row.items() if v is not None}
    row["step"] = int(step)
    if not self.main:
      return row
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)
    self._bar.n = step
    self._bar.set_postfix({k: f"{row[k]:.3g}" for k in self.show if k in row}, refresh=False)
    self._bar.refresh()
    return row

  def close(self) -> None:
    if self.main:
      self._bar.close()
      self._tb.close()
      self._file.close()
