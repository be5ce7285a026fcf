"""Runs untrusted Python in a throw-away child process; the trusted parent side.

One call of `run_job` = one fresh child that runs the candidate's code and one
test under `harness.py` (read that docstring for the result protocol). Two
modes, chosen at runtime by `sandbox_info()` (a probe that runs a trivial job):

"isolated" (root with namespaces, the normal case on our machines). In the
  forked child, before exec: new network namespace (no interface is up, so no
  connection at all, localhost included), new mount namespace in which every
  world-writable directory (/tmp, /var/tmp, /dev/shm, /run/lock) is bound
  read-only and the working directory is a fresh size-limited tmpfs, new PID
  namespace (the harness is its PID 1: when it exits the kernel kills and
  reaps everything the candidate started, setsid or not), IPC namespace, then
  `no_new_privs` and a switch to a fresh uid of its own (unique per run, not
  shared with any other process), so it can write nothing outside the tmpfs,
  cannot signal the reward worker, and `RLIMIT_NPROC` counts its processes
  only. At the deadline every process of that uid is SIGKILLed at once
  (`kill(-1)` issued as that uid: atomic against a fork bomb).
"restricted" (no privilege): same uid as the caller, a temp directory as cwd,
  and the harness's audit hook refuses sockets, fork/exec/spawn, kill and
  writes outside the directory. Weaker: code that reaches C without going
  through an audited call is not contained. `sandbox_info().mode` says which.

Both modes: fresh cwd, scrubbed environment, `python -I -S` (no site-packages,
no PYTHON* variables: stdlib only), rlimits on CPU, address space, processes,
file size and open files, stdout discarded, stderr and the result capped, and
the whole process group killed at the wall-clock deadline.
"""

from __future__ import annotations

import ctypes
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
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_WORKDIR_PREFIX = "r1jax_sbx_"

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x00020000, 0x08000000, 0x20000000, 0x40000000)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 32, 4096, 16384, 1 << 18)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  """Per-test limits. `wall_s` is the deadline for one test process."""
  wall_s: float = 3.0
  cpu_s: int = 2
  memory_mb: int = 512
  nproc: int = 32
  fsize_mb: int = 8
  nofile: int = 64
  disk_mb: int = 32  # tmpfs size (isolated mode only)
  result_kb: int = 1024
  stderr_kb: int = 8


@dataclasses.dataclass(frozen=True)
class SandboxInfo:
  mode: str  # "isolated" | "restricted"
  network: str  # "netns" | "audit_hook"
  user: str  # "own_uid" | "same_uid"
  python: str  # interpreter used in the child


@dataclasses.dataclass(frozen=True)
class RunResult:
  status: str  # "ok" | "failed" | "timeout" | "error"
  payload: str | None  # the harness's payload when status == "ok"
  stderr: str
  wall_s: float
  uid: int | None  # the run's own uid (isolated mode)


# ---------------------------------------------------------------- isolation


def _libc() -> ctypes.CDLL:
  return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
  if ret != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _isolate(uid: int, workdir: str, disk_mb: int, ro_dirs: tuple[str, ...]) -> None:
  """preexec_fn (runs in the forked child, as root): namespaces, mounts, uid."""
  libc = _libc()
  _check(libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC),
         "unshare")
  # If the reward worker that launched us is killed (per-call timeout), die
  # too; the harness below dies with us, and the kernel then kills its
  # namespace.
  _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
  # The new PID namespace applies to our children: fork once so the program
  # becomes its PID 1. This middle process only waits and passes the status.
  pid = os.fork()
  if pid:
    os.closerange(0, 1 << 16)
    status = 0
    while True:
      try:
        _, status = os.waitpid(pid, 0)
        break
      except InterruptedError:
        continue
      except ChildProcessError:
        break
    os._exit(1 if status else 0)
  _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount private")
  for d in ro_dirs:
    b = d.encode()
    _check(libc.mount(b, b, None, _MS_BIND | _MS_REC, None), "bind")
    _check(libc.mount(None, b, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID
                      | _MS_NODEV, None), "remount ro")
  opts = f"size={disk_mb}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}".encode()
  _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts),
         "mount tmpfs")
  os.chdir(workdir)  # the old cwd is the directory under the new mount
  _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
  os.setgroups([])
  os.setresgid(uid, uid, uid)
  os.setresuid(uid, uid, uid)
  # After the uid change (which clears it): die with the middle process.
  _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")


def kill_uid(uid: int) -> None:
  """SIGKILLs every process of `uid` at once: kill(-1) issued as that uid."""
  for _ in range(5):
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
      try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        os.kill(-1, signal.SIGKILL)
      except BaseException:  # noqa: BLE001
        pass
      os._exit(0)
    os.waitpid(pid, 0)
    if not processes_of(uid=uid):
      return
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
  isolated = info.mode == "isolated"
  uid = UID_BASE + secrets.randbelow(UID_SPAN) if isolated else None
  workdir = tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{os.getpid()}_")
  read_fd, write_fd = os.pipe()
  job = json.dumps({"code": code, "kind": kind, "src": src, "nonce": nonce,
                    "fd": write_fd, "rlimits": _rlimits(limits),
                    "restricted": not isolated}).encode()
  preexec = None
  if isolated:
    ro_dirs = tuple(d for d in _WORLD_WRITABLE if os.path.isdir(d) and not os.path.islink(d))
    preexec = functools.partial(_isolate, uid, workdir, limits.disk_mb, ro_dirs)
  proc = None
  try:
    proc = subprocess.Popen(
        [info.python, "-I", "-S", "-B", "-c", _HARNESS], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(write_fd,),
        cwd=workdir, env=_env(workdir), start_new_session=True, preexec_fn=preexec)
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
    _cleanup(proc, uid)
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


def _cleanup(proc: subprocess.Popen, uid: int | None) -> None:
  """Kills everything the run started and reaps the direct child."""
  if uid is not None:
    kill_uid(uid)  # first: the PID-1 harness and all it started
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  if uid is None:
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
  for stream in (proc.stdin, proc.stderr):
    if stream and not stream.closed:
      try:
        stream.close()
      except OSError:
        pass


# ---------------------------------------------------------------- probe

_PROBE_CODE = "def f(x):\n  return x + 1\n"


def _interpreters() -> list[str]:
  # The caller's interpreter may live where a fresh uid cannot reach it (e.g.
  # under /root): fall back to a system one; the child needs the stdlib only.
  found = [sys.executable]
  for path in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
    if path and os.access(path, os.X_OK) and path not in found:
      found.append(path)
  return found


@functools.cache
def sandbox_info() -> SandboxInfo:
  """The strongest mode that works on this machine (probed once per process)."""
  limits = SandboxLimits(wall_s=10.0)
  if os.geteuid() == 0 and sys.platform.startswith("linux"):
    for python in _interpreters():
      info = SandboxInfo("isolated", "netns", "own_uid", python)
      if run_job(_PROBE_CODE, "eval", "f(1)", limits, info=info).payload == '["i","0x2"]':
        return info
  for python in _interpreters():
    info = SandboxInfo("restricted", "audit_hook", "same_uid", python)
    if run_job(_PROBE_CODE, "eval", "f(1)", limits, info=info).payload == '["i","0x2"]':
      return info
  raise RuntimeError("no Python interpreter could run the sandbox harness; the code "
                     "reward needs a python3 binary reachable by the sandbox user")
