"""Runs untrusted Python in a throw-away child process; the trusted parent side.

One call of `run_job` = one fresh child that runs the candidate's code and one
test under `harness.py` (read that docstring for the result protocol). Three
modes; `sandbox_info()` picks the strongest that works here (a probe that runs
a trivial job) and never falls back to the unsafe one unless asked:

"isolated" (root). The harness, started as root in a fresh interpreter,
  isolates itself before it runs any candidate code (harness.py, `_isolate`):
  new network namespace (no interface is up, so no connection at all,
  localhost included), new mount namespace whose root is a fresh tmpfs holding
  read-only binds of the system directories, a few /dev nodes, a fresh /proc
  and a size-limited tmpfs as cwd (no /tmp, no home directory, no socket of
  the trainer is even visible), new PID namespace (the harness is its PID 1:
  when it exits the kernel kills and reaps everything the candidate started,
  setsid or not), IPC namespace, then `no_new_privs` and a switch to a fresh
  uid of its own (unique per run), so it cannot signal the reward worker and
  `RLIMIT_NPROC` counts its processes only. At the deadline the caller
  SIGKILLs PID 1 (the child of the harness's "keeper" half, left outside the
  namespace); the kernel then kills the whole namespace at once (atomic
  against a fork bomb), and the keeper exits only when all of it is reaped.
"userns" (not root, unprivileged user namespaces allowed). The same, inside
  a new user namespace that maps the caller's uid to nobody; every capability
  is dropped once the mounts are made. The run shares the caller's uid
  outside, so the same-uid attack surface (signals, ptrace, sockets, files)
  is closed by the namespaces themselves: other processes cannot be named
  (PID namespace), the trainer's files and sockets are not in the new root.
"restricted" (UNSAFE, only with `allow_unsafe=True`; the code reward's
  `allow_unsafe_sandbox` option): same uid as the caller, a temp directory as
  cwd, and the harness's audit hook refuses sockets, fork/exec/spawn, kill,
  `os.open` and writes outside the directory; where the kernel has Landlock,
  also no exec, no file system change outside the cwd, no TCP and (newer
  kernels) no signal out, whatever the path to C. Still weaker: the host's
  processes, files (to read), UDP and unix sockets stay reachable.

Every mode: fresh cwd, scrubbed environment, `python -I -S` (no site-packages,
no PYTHON* variables: stdlib only), rlimits on CPU, address space, processes,
file size and open files, a wall-clock alarm and PDEATHSIG in the harness,
stdout discarded, stderr and the result capped, and the whole process group
killed at the wall-clock deadline.

The caller is a multithreaded JAX process, where running Python in a forked
child can deadlock (a lock held by another thread at fork time). So this side
never forks: `subprocess.Popen` without `preexec_fn` forks and execs in C, and
everything privileged happens in the fresh, single-threaded harness process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

_HARNESS = (pathlib.Path(__file__).parent / "harness.py").read_text()
# Fresh per-run uids are drawn from here; tests scan /proc for this range.
UID_BASE, UID_SPAN = 3_000_000, 1 << 20
# What the sandbox's new root holds (read-only), besides the interpreter's
# library directory (`_binds`), a fresh /proc and the cwd.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
                 "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_WORKDIR_PREFIX = "r1jax_sbx_"
# Read by the probe only: "1" makes it report that namespaces are unavailable
# (tests of the refusal; it can only make the sandbox stricter).
NO_NAMESPACES_ENV = "R1JAX_SANDBOX_NO_NAMESPACES"
UNSAFE_OPTION = "allow_unsafe_sandbox"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  """Per-test limits. `wall_s` is the deadline for one test process."""
  wall_s: float = 3.0
  cpu_s: int = 2
  memory_mb: int = 512
  nproc: int = 32
  fsize_mb: int = 8
  nofile: int = 64
  disk_mb: int = 32  # cwd tmpfs size (namespace modes only)
  result_kb: int = 1024
  stderr_kb: int = 8


@dataclasses.dataclass(frozen=True)
class SandboxInfo:
  mode: str  # "isolated" | "userns" | "restricted"
  network: str  # "netns" | "audit_hook"
  user: str  # "own_uid" | "nobody_in_userns" | "same_uid"
  python: str  # interpreter used in the child

  @property
  def namespaced(self) -> bool:
    return self.mode in ("isolated", "userns")


class SandboxUnavailable(RuntimeError):
  """No safe sandbox on this machine and the unsafe one was not asked for."""


@dataclasses.dataclass(frozen=True)
class RunResult:
  status: str  # "ok" | "failed" | "timeout" | "error"
  payload: str | None  # the harness's payload when status == "ok"
  stderr: str
  wall_s: float
  uid: int | None  # the run's own uid (isolated mode only)


# ---------------------------------------------------------------- processes


def kill_uid(uid: int, timeout_s: float = 2.0) -> None:
  """SIGKILLs every process of `uid` by pid until none is left (or timeout).

  A fallback only, for when the harness's keeper itself was killed and could
  not see its namespace emptied. No fork: we are root and signal directly.
  """
  deadline = time.monotonic() + timeout_s
  while (pids := processes_of(uid=uid)) and time.monotonic() < deadline:
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    time.sleep(0.01)


def processes_of(*, uid: int | None = None, sid: int | None = None,
                 uid_range: tuple[int, int] | None = None) -> list[int]:
  """Pids (zombies included) with this real uid / session id, from /proc."""
  found = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", "rb") as f:
        stat = f.read()
      proc_uid = os.stat(f"/proc/{entry}").st_uid
    except OSError:
      continue
    # Fields after the parenthesised command: state ppid pgrp session ...
    fields = stat[stat.rfind(b")") + 2:].split()
    if uid is not None and proc_uid == uid:
      found.append(int(entry))
    elif uid_range is not None and uid_range[0] <= proc_uid < uid_range[1]:
      found.append(int(entry))
    elif sid is not None and int(fields[3]) == sid:
      found.append(int(entry))
  return found


# ---------------------------------------------------------------- one run


def remove_workdirs(pid: int) -> None:
  """Deletes run directories left by process `pid` (e.g. a killed worker)."""
  base = pathlib.Path(tempfile.gettempdir())
  for path in base.glob(f"{_WORKDIR_PREFIX}{pid}_*"):
    shutil.rmtree(path, ignore_errors=True)


def _env(workdir: str) -> dict[str, str]:
  return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
          "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


@functools.cache
def _binds(python: str) -> tuple[str, ...]:
  """Host paths bound read-only into the new root: the system directories and
  the interpreter's library directory when it lives elsewhere (e.g. pyenv).

  Only `<prefix>/lib` (stdlib, lib-dynload): the binary itself is loaded
  before the pivot, and a whole prefix may be a home directory.
  """
  paths = [p for p in _SYSTEM_PATHS if os.path.lexists(p)]
  lib = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(python))), "lib")
  if os.path.isdir(lib) and not any(lib == p or lib.startswith(p + "/") for p in paths):
    paths.append(lib)
  return tuple(paths)


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
  mb = 1 << 20
  return {"RLIMIT_CPU": max(1, int(limits.cpu_s)), "RLIMIT_AS": limits.memory_mb * mb,
          "RLIMIT_NPROC": limits.nproc, "RLIMIT_FSIZE": limits.fsize_mb * mb,
          "RLIMIT_NOFILE": limits.nofile, "RLIMIT_CORE": 0}


def run_job(code: str, kind: str, src: str, limits: SandboxLimits = SandboxLimits(),
            *, info: SandboxInfo | None = None) -> RunResult:
  """Runs `code` then the test `src` (kind "eval" or "exec") in a fresh child."""
  info = info or sandbox_info()
  start = time.monotonic()
  nonce = secrets.token_hex(16)
  uid = UID_BASE + secrets.randbelow(UID_SPAN) if info.mode == "isolated" else None
  workdir = tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{os.getpid()}_")
  read_fd, write_fd = os.pipe()
  isolate = None
  if info.namespaced:
    isolate = {"userns": info.mode == "userns", "uid": uid, "outer": [os.getuid(), os.getgid()],
               "workdir": workdir, "disk_mb": limits.disk_mb, "binds": _binds(info.python)}
  job = json.dumps({"code": code, "kind": kind, "src": src, "nonce": nonce,
                    "fd": write_fd, "rlimits": _rlimits(limits), "wall_s": limits.wall_s,
                    "parent": os.getpid(), "restricted": not info.namespaced,
                    "isolate": isolate}).encode()
  try:
    # No preexec_fn: the fork (vfork) and exec then happen in C, with no
    # Python run in a copy of this multithreaded process.
    proc = subprocess.Popen(
        [info.python, "-I", "-S", "-B", "-c", _HARNESS], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(write_fd,),
        cwd=workdir, env=_env(workdir), start_new_session=True)
  except (OSError, subprocess.SubprocessError) as e:
    os.close(read_fd)
    shutil.rmtree(workdir, ignore_errors=True)
    return RunResult("error", None, f"launch failed: {e}", time.monotonic() - start, uid)
  finally:
    os.close(write_fd)
  try:
    result, stderr, timed_out = _communicate(proc, read_fd, job, start + limits.wall_s,
                                            limits)
  finally:
    _cleanup(proc, info.namespaced, uid)
    os.close(read_fd)
    shutil.rmtree(workdir, ignore_errors=True)
  wall = time.monotonic() - start
  err = stderr.decode("utf-8", "replace")
  prefix = nonce.encode() + b" "
  if result.startswith(prefix) and len(result) <= limits.result_kb << 10:
    return RunResult("ok", result[len(prefix):].decode("ascii", "replace"), err, wall, uid)
  return RunResult("timeout" if timed_out else "failed", None, err, wall, uid)


def _communicate(proc: subprocess.Popen, read_fd: int, job: bytes, deadline: float,
                 limits: SandboxLimits) -> tuple[bytes, bytes, bool]:
  """Feeds the job and drains result/stderr (capped) until EOF or deadline."""
  result, stderr = bytearray(), bytearray()
  caps = {read_fd: (limits.result_kb << 10) + 1, proc.stderr.fileno(): limits.stderr_kb << 10}
  bufs = {read_fd: result, proc.stderr.fileno(): stderr}
  stdin_fd = proc.stdin.fileno()
  os.set_blocking(stdin_fd, False)
  with selectors.DefaultSelector() as sel:
    sel.register(read_fd, selectors.EVENT_READ)
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ)
    sel.register(stdin_fd, selectors.EVENT_WRITE)
    pending = memoryview(job)
    while len(sel.get_map()):
      timeout = deadline - time.monotonic()
      if timeout <= 0:
        return bytes(result), bytes(stderr), True
      for key, _ in sel.select(timeout):
        fd = key.fd
        if fd == stdin_fd:
          try:
            pending = pending[os.write(fd, pending[:1 << 16]):]
          except BlockingIOError:
            continue
          except BrokenPipeError:  # the child died before reading its job
            pending = pending[:0]
          if not pending:
            sel.unregister(fd)
            proc.stdin.close()
          continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
          sel.unregister(fd)
          continue
        buf = bufs[fd]
        # Keep reading past the cap (so the child never blocks on a full
        # pipe) but store nothing more.
        buf += chunk[:max(0, caps[fd] - len(buf))]
  # All pipes closed: the harness exited. Reap within what is left.
  try:
    proc.wait(max(0.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    return bytes(result), bytes(stderr), True
  return bytes(result), bytes(stderr), False


def _children(pid: int) -> list[int]:
  """Direct children of `pid` (empty if the kernel does not say)."""
  try:
    with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
      return [int(c) for c in f.read().split()]
  except OSError:
    return []


def _kill_pid1(keeper: int) -> bool:
  """SIGKILLs the keeper's only child, the namespace's PID 1; False if not done."""
  for pid in _children(keeper):
    try:
      fd = os.pidfd_open(pid)
    except OSError:  # gone already, or no pidfd (Linux < 5.3)
      continue
    try:
      # Still the keeper's child once the fd is open: the fd is PID 1, not
      # an unrelated process that got a recycled pid.
      if pid in _children(keeper):
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
      pass
    finally:
      os.close(fd)
  return False


def _cleanup(proc: subprocess.Popen, namespaced: bool, uid: int | None) -> None:
  """Kills everything the run started and reaps the direct child."""
  if namespaced and proc.poll() is None:
    # Once PID 1 dies the keeper exits, and only after the kernel has reaped
    # the whole namespace, so its exit means nothing is left. Killing PID 1
    # from here is quicker than asking the keeper (Python, starved by a fork
    # bomb); its SIGTERM handler is the fallback.
    if not _kill_pid1(proc.pid):
      proc.terminate()
    try:
      proc.wait(2.0)
    except subprocess.TimeoutExpired:
      pass
  if not namespaced or proc.poll() is None:  # restricted: also what outlived it
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
  if not namespaced:
    for pid in processes_of(sid=proc.pid):
      try:
        os.kill(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
  try:
    proc.wait(2.0)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait(2.0)
  if uid is not None and proc.returncode < 0:
    # The keeper was killed (by us just now, or e.g. the OOM killer): PID 1
    # still dies with it (PDEATHSIG), but nobody waited for its namespace.
    kill_uid(uid)
  for stream in (proc.stdin, proc.stderr):
    if stream and not stream.closed:
      try:
        stream.close()
      except OSError:
        pass


# ---------------------------------------------------------------- probe

# The import checks that the run's uid can read the interpreter's stdlib
# (`fractions` is not loaded by the harness itself, `_decimal` is a C module).
_PROBE_CODE = "import fractions\ndef f(x):\n  return x + 1\n"


def _interpreters() -> list[str]:
  # The caller's interpreter may not run for the sandbox (e.g. a non-root
  # caller cannot reach one under /root): fall back to a system one; the
  # child needs the stdlib only.
  found = [sys.executable]
  for path in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
    if path and os.access(path, os.X_OK) and path not in found:
      found.append(path)
  return found


_probe_errors: list[str] = []  # why each failed probe failed, for the refusal


def _first_working(mode: str, network: str, user: str) -> SandboxInfo | None:
  limits = SandboxLimits(wall_s=10.0)
  for python in _interpreters():
    info = SandboxInfo(mode, network, user, python)
    run = run_job(_PROBE_CODE, "eval", "f(1)", limits, info=info)
    if run.payload == '["i","0x2"]':
      return info
    lines = run.stderr.strip().splitlines() or [run.status]
    _probe_errors.append(f"{mode} with {python}: {lines[-1][:200]}")
  return None


@functools.cache
def _safe_mode() -> SandboxInfo | None:
  """The namespace mode that works here (probed once per process), or None."""
  if os.environ.get(NO_NAMESPACES_ENV) == "1":
    _probe_errors.append(f"{NO_NAMESPACES_ENV}=1")
    return None
  if not sys.platform.startswith("linux"):
    _probe_errors.append("not Linux")
    return None
  if os.geteuid() == 0:
    info = _first_working("isolated", "netns", "own_uid")
    if info is not None:
      return info
  # Also root without CAP_SYS_ADMIN (e.g. in a container) may get a user namespace.
  return _first_working("userns", "netns", "nobody_in_userns")


@functools.cache
def _unsafe_mode() -> SandboxInfo:
  info = _first_working("restricted", "audit_hook", "same_uid")
  if info is None:
    raise RuntimeError("no Python interpreter could run the sandbox harness; the code "
                       "reward needs a python3 binary reachable by the sandbox user")
  return info


def sandbox_info(allow_unsafe: bool = False) -> SandboxInfo:
  """The strongest mode that works here; the unsafe "restricted" one only
  when `allow_unsafe` and no namespace mode works, else SandboxUnavailable."""
  info = _safe_mode()
  if info is not None:
    return info
  if allow_unsafe:
    return _unsafe_mode()
  who = "root" if os.geteuid() == 0 else f"uid {os.getuid()}"
  why = "; ".join(_probe_errors[-3:]) or "unknown"
  raise SandboxUnavailable(
      f"code sandbox: no namespace isolation for {who} here (probe: {why}); refusing to "
      f"run untrusted code. Enable unprivileged user namespaces (Linux >= 5.12), or opt "
      f"into the UNSAFE audit-hook sandbox with the code reward option {UNSAFE_OPTION}=True, "
      f"e.g. (\"code\", 1.0, {{\"{UNSAFE_OPTION}\": True}})")
