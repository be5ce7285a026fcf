"""A local Google Cloud Storage emulator, so tests can read and write gs:// paths.

`emulator()` runs `gcp-storage-emulator` (the GCS JSON API, in memory) as a
subprocess on a free 127.0.0.1 port and points every client of this project at
it through environment variables, for this process and for its subprocesses:
etils.epath (via fsspec's gcsfs), google-cloud-storage (which orbax asks about
the bucket) and tensorstore (which orbax writes arrays through).

Run as a script, this file is that subprocess: the emulator, patched where
tensorstore relies on GCS behaviour the emulator lacks (see `_patch_emulator`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Emulator:
  endpoint: str  # http://127.0.0.1:PORT
  bucket: str
  env: dict[str, str]  # what `emulator()` put in os.environ

  @property
  def url(self) -> str:
    return f"gs://{self.bucket}"


def client_env(endpoint: str) -> dict[str, str]:
  """Environment that sends every GCS client used here to `endpoint`, uncredentialed."""
  # A closed local port: a client that still looks for a GCE metadata server
  # fails at once instead of waiting on 169.254.169.254 or a DNS lookup.
  nowhere = "127.0.0.1:9"
  return {
      # gcsfs (hence etils.epath) and google-cloud-storage: the JSON API endpoint.
      "STORAGE_EMULATOR_HOST": endpoint,
      # Read when gcsfs is imported. Otherwise gcsfs >= 2026 uses its
      # ExtendedGcsFileSystem, which first asks the gRPC Storage Control API for
      # the bucket's type over TLS and gives up after 60 s, on every call.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # gcsfs defaults, read by fsspec on import: no credentials (else gcsfs tries
      # gcloud's files, then the metadata server), and no listings cache, so this
      # process sees objects that a subprocess wrote a moment ago.
      "FSSPEC_GCS": json.dumps({"token": "anon", "use_listings_cache": False}),
      # tensorstore: the endpoint, and a fixed bearer token (the emulator ignores
      # it) so tensorstore never looks for real credentials.
      "TENSORSTORE_GCS_HTTP_URL": endpoint,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      # Belt and braces; none of the settings above should reach these.
      "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": nowhere,
      "GCE_METADATA_IP": nowhere,
      "GCE_METADATA_ROOT": nowhere,
  }


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, endpoint: str, log, timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while True:
    if proc.poll() is not None:
      log.seek(0)
      raise RuntimeError(f"gcp-storage-emulator exited with code {proc.returncode}:\n"
                         f"{log.read().decode(errors='replace')[-3000:]}")
    try:
      with urllib.request.urlopen(endpoint + "/", timeout=1) as r:  # its health check
        if r.status == 200:
          return
    except (urllib.error.URLError, ConnectionError, TimeoutError):
      pass
    if time.monotonic() > deadline:
      raise TimeoutError(f"gcp-storage-emulator did not answer at {endpoint} in {timeout_s} s")
    time.sleep(0.02)


def _create_bucket(endpoint: str, bucket: str) -> None:
  def call(method: str, url: str, body: dict) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()
  call("POST", f"{endpoint}/storage/v1/b?project=test", {"name": bucket})
  # New buckets keep deleted objects for 7 days, in the emulator's memory too; tests
  # that rotate checkpoints would pile them up.
  call("PATCH", f"{endpoint}/storage/v1/b/{bucket}",
       {"softDeletePolicy": {"retentionDurationSeconds": "0"}})


def _stop(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    proc.send_signal(signal.SIGINT)  # the emulator's own clean shutdown
    try:
      proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def reset_gcs_clients() -> None:
  """Makes the next gs:// access in this process build its clients from os.environ."""
  import fsspec
  import gcsfs
  from etils.epath import backend

  # fsspec read FSSPEC_* when it was imported, which may have been before now; what
  # it read then for gcs may no longer hold.
  fsspec.config.conf.pop("gcs", None)
  fsspec.config.set_conf_env(fsspec.config.conf)
  if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
    # gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set.
    for protocol in ("gs", "gcs"):
      fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
  # gcsfs and etils both keep filesystem instances, credentials fixed when built.
  gcsfs.core.GCSFileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()


@contextlib.contextmanager
def emulator(bucket: str = "r1jax-test", *, timeout_s: float = 30) -> Iterator[Emulator]:
  """Runs the emulator with `bucket` created; os.environ points the clients at it meanwhile."""
  port = free_port()
  endpoint = f"http://127.0.0.1:{port}"
  with tempfile.TemporaryFile() as log:  # a file, not a pipe nobody drains
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(os.getpid()), "start",
         "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    saved = {}
    try:
      _wait_until_up(proc, endpoint, log, timeout_s)
      _create_bucket(endpoint, bucket)
      env = client_env(endpoint)
      saved = {k: os.environ.get(k) for k in env}
      os.environ.update(env)
      reset_gcs_clients()
      yield Emulator(endpoint, bucket, env)
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      if saved:
        reset_gcs_clients()
      _stop(proc)


def _patch_emulator() -> None:
  """Makes the emulator answer as GCS does where tensorstore depends on it.

  tensorstore takes an object's generation from the `x-goog-generation` header
  of a media read; without it the generation reads as 0, and OCDBT's next
  conditional write of its manifest (orbax's default format) fails with
  "Malformed StorageGeneration". The emulator also ignores `ifGenerationMatch`
  and `ifGenerationNotMatch`, the conditions that OCDBT's commits rest on, and
  lacks objects.move: gcsfs renames with it, retries the 501 for ~33 s, and
  only then falls back to copy and delete.
  """
  from http import HTTPStatus
  from http import server as http_server

  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def generation(storage, bucket: str, name: str) -> str | None:
    try:
      return storage.get_file_obj(bucket, name)["generation"]
    except NotFound:
      return None

  def unmet(request, current: str | None) -> HTTPStatus | None:
    match, not_match = (request.query.get(k, [None])[0]
                        for k in ("ifGenerationMatch", "ifGenerationNotMatch"))
    if match is not None and match != (current or "0"):  # 0: "must not exist yet"
      return HTTPStatus.PRECONDITION_FAILED
    if not_match is not None and not_match == current:
      return HTTPStatus.NOT_MODIFIED
    return None

  def read(original):
    def handler(request, response, storage, *args, **kwargs):
      bucket, name = request.params["bucket_name"], request.params["object_id"]
      current = generation(storage, bucket, name)
      if current is not None and (status := unmet(request, current)):
        response.status = status
        return
      original(request, response, storage, *args, **kwargs)
      if current is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        response["x-goog-generation"] = current
        response["x-goog-metageneration"] = storage.get_file_obj(bucket, name)["metageneration"]
    return handler

  def insert(original):
    def handler(request, response, storage, *args, **kwargs):
      name = request.query.get("name", [None])[0]  # multipart uploads name it in the body
      if name is not None:
        if status := unmet(request, generation(storage, request.params["bucket_name"], name)):
          response.status = status
          return
      original(request, response, storage, *args, **kwargs)
    return handler

  def move(request, response, storage, *args, **kwargs):
    bucket, source, dest = (request.params[k]
                            for k in ("bucket_name", "object_id", "dest_object_id"))
    if status := unmet(request, generation(storage, bucket, dest)):
      response.status = status
      return
    try:
      obj = objects._copy(request.base_url, storage, bucket, source, bucket, dest)
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return
    storage.delete_file(bucket, source)
    response.json(obj)

  patched = {objects.download: read(objects.download), objects.get: read(objects.get),
             objects.insert: insert(objects.insert)}
  for _, handlers in server.HANDLERS:
    for method, fn in handlers.items():
      handlers[method] = patched.get(fn, fn)
  # Ahead of the plain object route, which would take "a/moveTo/o/b" for an object name.
  move_route = (rf"^{server.settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)"
                r"/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$")
  server.HANDLERS = ((move_route, {"POST": move}),) + tuple(server.HANDLERS)
  # `get` (alt=media) and the router's upload fallback look these up by name.
  objects.download, objects.get, objects.insert = (
      patched[objects.download], patched[objects.get], patched[objects.insert])
  # The server answers one request at a time; tensorstore opens many connections
  # at once, and past the default backlog of 5 a connection waits out a SYN retry.
  http_server.HTTPServer.request_queue_size = 128


def _exit_with_parent(parent_pid: int) -> None:
  """Stops this emulator if the test process dies without stopping it."""
  def watch():
    while os.getppid() == parent_pid:
      time.sleep(1)
    os._exit(0)
  threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main
  _exit_with_parent(int(sys.argv[1]))
  _patch_emulator()
  main(sys.argv[2:])
