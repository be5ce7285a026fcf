"""Run paths anywhere: a local directory or a bucket (`gs://…`), through etils.epath.

Every file a run writes or reads (configs, metrics, plots, samples, datasets, the
tokenizer, summaries; orbax checkpoints take the same paths) goes through here,
so `--workdir=gs://bucket/run` works as a local path does. Local paths are made
absolute, so outputs.json files name their checkpoints unambiguously.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Any

import fsspec.config
from etils import epath

# Processes of one job read files that other hosts have just written (a stage's
# outputs.json, a rejection dataset, the tokenizer): gcsfs's cache of directory
# listings would hide them, so it is off unless the user configured it.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def path(p: str | os.PathLike) -> epath.Path:
  """An epath for `p`: as given for a URL (gs://, s3://), absolute for a local path."""
  s = os.fspath(p)
  if is_remote(s):
    return epath.Path(s)
  return epath.Path(os.path.abspath(s))


def is_remote(p: str | os.PathLike) -> bool:
  return "://" in os.fspath(p)


def join(base: str | os.PathLike, *parts: str) -> str:
  return os.fspath(path(base).joinpath(*parts))


def makedirs(p: str | os.PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def exists(p: str | os.PathLike) -> bool:
  return path(p).exists()


def read_text(p: str | os.PathLike) -> str:
  return path(p).read_text(encoding="utf-8")


def read_bytes(p: str | os.PathLike) -> bytes:
  return path(p).read_bytes()


def read_json(p: str | os.PathLike) -> Any:
  return json.loads(read_text(p))


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """Writes all of `data` or nothing: a reader never sees half a file. An object
  store's upload is already all-or-nothing; locally the file is renamed into place."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(target):
    target.write_bytes(data)
    return
  tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
  tmp.write_bytes(data)
  tmp.replace(target)


def write_text(p: str | os.PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def write_json(p: str | os.PathLike, obj: Any, **kw) -> None:
  write_text(p, json.dumps(obj, **kw))


def write_jsonl(p: str | os.PathLike, rows: list[dict]) -> None:
  write_text(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(p: str | os.PathLike) -> list[dict]:
  """The rows of a JSONL file; [] when it does not exist."""
  if not exists(p):
    return []
  return [json.loads(line) for line in read_text(p).splitlines() if line.strip()]


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Copies the files under `src` to the same places under `dst` (either may be a URL)."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copytree(path(src), path(dst), dirs_exist_ok=True)
    return
  for f in path(src).iterdir():  # one listing per folder (no recursive glob on buckets)
    if f.is_dir():
      copy_tree(f, path(dst) / f.name)
    else:
      write_bytes(path(dst) / f.name, f.read_bytes())


def save_figure(p: str | os.PathLike, fig, **kw) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format=os.path.splitext(os.fspath(p))[1].lstrip(".") or "png", **kw)
  write_bytes(p, buf.getvalue())
