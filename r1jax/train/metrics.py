"""Per-stage metric logging: metrics.jsonl, TensorBoard events, a progress bar.

Only the main process writes. On resume, `metrics.jsonl` is cut back to the
checkpoint's step so the lines after it are not duplicated when redone.
"""

from __future__ import annotations

import io
import json
import math
import time

import jax
import tqdm
from tensorboardX import SummaryWriter, record_writer

from r1jax import storage

# A bucket has no appends: remote metrics.jsonl is rewritten whole, at most this often
# (and at every checkpoint and at the end).
REMOTE_FLUSH_S = 30.0


def _scalar(v) -> float | None:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


read_jsonl = storage.read_jsonl


class _BucketEventFile:
  """A TensorBoard event file in a bucket: kept in memory, uploaded whole at each
  flush (scalars only, so it stays small). tensorboardX's own gs:// writer needs
  google-cloud-storage; this one goes through etils.epath like everything else."""

  def __init__(self, path: str):
    self.path, self.buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    storage.write_bytes(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _BucketEventFiles:
  def open(self, path: str) -> _BucketEventFile:
    return _BucketEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # buckets have no directories to create


record_writer.register_writer_factory("gs", _BucketEventFiles())


class MetricWriter:
  def __init__(self, stage_dir: str, *, total_steps: int, start_step: int = 0,
               show: tuple[str, ...] = ("loss",), desc: str = ""):
    self.main = jax.process_index() == 0
    self.path = storage.join(stage_dir, "metrics.jsonl")
    self.show = show
    if not self.main:
      return
    self._rows = [m for m in read_jsonl(self.path) if m["step"] <= start_step]
    self._remote = storage.is_remote(self.path)
    self._flushed_at = time.monotonic()
    storage.write_jsonl(self.path, self._rows)
    if not self._remote:
      self._file = open(self.path, "a")
    self._tb = SummaryWriter(storage.join(stage_dir, "tensorboard"), purge_step=start_step + 1)
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                          mininterval=1.0)

  def write(self, step: int, metrics: dict) -> dict:
    """Logs the scalar entries of `metrics` at `step`; returns them as floats."""
    row = {k: _scalar(v) for k, v in metrics.items()}
    row = {k: v for k, v in row.items() if v is not None}
    row["step"] = int(step)
    if not self.main:
      return row
    if self._remote:
      self._rows.append(row)
      if time.monotonic() - self._flushed_at > REMOTE_FLUSH_S:
        self.flush()
    else:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)
    self._bar.n = step
    self._bar.set_postfix({k: f"{row[k]:.3g}" for k in self.show if k in row}, refresh=False)
    self._bar.refresh()
    return row

  def flush(self) -> None:
    """Makes every row written so far durable (call it when a checkpoint is saved:
    a resume never redoes the steps before its checkpoint)."""
    if not self.main:
      return
    if self._remote:
      storage.write_jsonl(self.path, self._rows)
      self._flushed_at = time.monotonic()
    self._tb.flush()

  def close(self) -> None:
    if self.main:
      self.flush()
      self._bar.close()
      self._tb.close()
      if not self._remote:
        self._file.close()
