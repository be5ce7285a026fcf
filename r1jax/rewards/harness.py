"""The trusted half of a sandboxed test run: this file runs *inside* the child.

It is not imported by r1jax: `sandbox.py` passes its source to
`python -I -S -c`, so it must use the standard library only (any Python 3.8+).

Protocol. The parent writes one JSON job to stdin: the candidate's code, one
test (an expression to evaluate, or statements to execute), a fresh random
nonce, the number of the result pipe, the resource limits and, in isolated
mode, the isolation spec. The harness reads it, isolates itself (below),
applies the limits, installs an audit hook, runs the candidate code and then
the test, and only if both finished normally writes
`nonce + b" " + payload` to the result pipe and `_exit`s. The parent counts a
test as passed only on that message; the exit status, stdout and stderr mean
nothing. So `sys.exit(0)`, `os._exit(0)`, killing the harness, printing
"PASSED" or raising from an `atexit` hook all leave no valid message.

Forging the message needs the nonce, which exists only in this function's
locals. The audit hook (which candidate code cannot remove) closes the ways
to reach it from Python: frame access (`sys._getframe`, traceback and
generator frames), `gc` object walks, trace/profile hooks, signal handlers
(which receive frames), `ctypes`, new audit hooks, and opening `/proc/...`
(`/proc/self/mem`). The process is made non-dumpable so another process of
the same uid cannot read its memory either. For value tests the payload is
the value itself, encoded here with builtins captured before candidate code
ran, and the *parent* compares it with the expected literal: a forger would
also need the expected value, which never enters the child.

Isolation (isolated mode). The parent starts this file as a fresh interpreter
(fork+exec done in C by `subprocess`, never Python in a forked copy of the
multithreaded trainer), still as root; `_isolate` then does the namespace and
uid switch itself, in this single-threaded process, before any candidate code
exists. It forks once: the parent half stays outside the new PID namespace as
a "keeper" that only waits; the child is the namespace's PID 1 and goes on to
run the job. At the deadline the caller SIGKILLs PID 1 (or SIGTERMs the
keeper, which then does it); when PID 1 dies the kernel kills and reaps
everything in the namespace (setsid or fork bomb alike) before the keeper's
`waitpid` returns, so the keeper's exit tells the caller that nothing of the
run is left.
"""

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x00020000, 0x08000000, 0x20000000, 0x40000000)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 32, 4096, 16384, 1 << 18)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


def _isolate(spec):
  """As root: new net/mount/PID/IPC namespaces, read-only shared dirs, a tmpfs
  cwd and the run's own uid. Returns in the namespace's PID 1."""
  import ctypes
  import os
  import signal

  libc = ctypes.CDLL(None, use_errno=True)

  def check(ret, what):
    if ret != 0:
      err = ctypes.get_errno()
      raise OSError(err, what + ": " + os.strerror(err))

  # If the reward worker that started us is killed (per-call timeout), die
  # too; PID 1 below dies with us, and the kernel then empties its namespace.
  check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
  if os.getppid() != spec["parent"]:  # it died before the line above
    os._exit(1)
  check(libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC),
        "unshare")
  # Until the keeper's handler is in place a SIGTERM must not kill it (that
  # would orphan PID 1): hold SIGTERM across the fork.
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
  pid = os.fork()
  if pid:  # the keeper: outside the namespace, root, runs no candidate code
    def on_term(signum, frame):
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass

    signal.signal(signal.SIGTERM, on_term)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.closerange(0, 1 << 16)  # the caller's EOF must mean "PID 1 is gone"
    try:
      os.waitpid(pid, 0)  # retried after the handler (PEP 475)
    except ChildProcessError:
      pass
    os._exit(0)
  check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
  check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount private")
  for d in spec["ro_dirs"]:
    b = d.encode()
    check(libc.mount(b, b, None, _MS_BIND | _MS_REC, None), "bind")
    check(libc.mount(None, b, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID
                     | _MS_NODEV, None), "remount ro")
  uid, workdir = spec["uid"], spec["workdir"]
  opts = "size=%dm,nr_inodes=4096,mode=0700,uid=%d,gid=%d" % (spec["disk_mb"], uid, uid)
  check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                   opts.encode()), "mount tmpfs")
  os.chdir(workdir)  # the old cwd is the directory under the new mount
  check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
  os.setgroups([])
  os.setresgid(uid, uid, uid)
  os.setresuid(uid, uid, uid)
  # After the uid change (which clears it): die with the keeper.
  check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")


def _main():
  import builtins
  import json
  import os
  import resource
  import sys

  # Capture everything used after candidate code runs: it may rebind names in
  # `builtins`, `os` or `sys`, but not the objects held in these locals.
  _type, _isinstance, _len, _hex = type, isinstance, len, hex
  _int, _float, _complex, _str, _bytes, _bool = int, float, complex, str, bytes, bool
  _list, _tuple, _set, _frozenset, _dict = list, tuple, set, frozenset, dict
  _write, _exit = os.write, os._exit
  _exec, _eval, _compile, _any = exec, eval, compile, any
  _exc_type, _ValueError, _RuntimeError, _ImportError, _PermissionError = (
      BaseException, ValueError, RuntimeError, ImportError, PermissionError)
  _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

  chunks = []
  while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
      break
    chunks.append(chunk)
  job = json.loads(b"".join(chunks))
  del chunks
  nonce = job["nonce"].encode()
  result_fd = job["fd"]
  devnull = os.open(os.devnull, os.O_RDONLY)
  os.dup2(devnull, 0)
  os.close(devnull)
  if job["isolate"] is not None:
    _isolate(job["isolate"])

  try:
    # Non-dumpable: /proc/<pid>/mem of this process is closed to other
    # processes of the same uid (e.g. a program the candidate execs).
    import ctypes
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
  except Exception:  # noqa: BLE001 - best effort, the hook below still applies
    pass
  for name, value in job["rlimits"].items():
    limit = getattr(resource, name)
    try:
      resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
      # The hard limit may already be lower than asked; keep the lower one.
      soft, hard = resource.getrlimit(limit)
      resource.setrlimit(limit, (min(value, hard), hard))
  if hasattr(sys, "set_int_max_str_digits"):
    sys.set_int_max_str_digits(0)  # big int results are legitimate

  # Modules that hand out frames or raw memory; drop the cached ones so a
  # new import has to pass the hook.
  for name in ("ctypes", "_ctypes", "signal", "_signal", "faulthandler"):
    sys.modules.pop(name, None)
  blocked_imports = {
      "ctypes", "_ctypes", "signal", "_signal", "_testcapi", "_testinternalcapi",
      "_xxsubinterpreters", "faulthandler", "tracemalloc", "_tracemalloc"}
  restricted = bool(job["restricted"])
  cwd = os.getcwd()
  # /proc/<pid>/mem and the fd links would expose this process's memory.
  hidden = ("/proc/", "/dev/fd/", "/dev/stdin", "/dev/stdout", "/dev/stderr")

  def normalize(path):
    # A path as the kernel will resolve it, minus symlinks, computed with
    # captured builtins only (os.path is Python code the candidate could
    # patch). None for anything but str/bytes: a PathLike could answer the
    # hook and the real open() differently.
    if _isinstance(path, _bytes):
      path = _bytes.decode(path, "utf-8", "surrogateescape")
    if not _isinstance(path, _str):
      return None
    path = _str.__str__(path)
    if not path.startswith("/"):
      path = cwd + "/" + path
    parts = []
    for part in path.split("/"):
      if part == "..":
        parts = parts[:-1]
      elif part and part != ".":
        parts.append(part)
    return "/" + "/".join(parts)

  def outside(path) -> bool:
    real = normalize(path)
    return real is None or not (real == cwd or real.startswith(cwd + "/"))

  def hook(event, args):
    if event == "sys._getframe":
      raise _ValueError("frames are not available in the sandbox")
    if event == "object.__getattr__":
      if _isinstance(args[1], _str) and (
          args[1].endswith("_frame") or args[1].startswith("f_")):
        raise _RuntimeError("frames are not available in the sandbox")
      return
    if event in ("sys._current_frames", "sys._current_exceptions",
                 "sys.settrace", "sys.setprofile", "sys.addaudithook",
                 "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                 "cpython.PyInterpreterState_New"):
      raise _RuntimeError(event + " is not allowed in the sandbox")
    if event.startswith("ctypes."):
      raise _RuntimeError("ctypes is not allowed in the sandbox")
    if event == "import" and args[0] in blocked_imports:
      raise _ImportError("this module is not allowed in the sandbox")
    if event == "open":
      path, mode, flags = args[0], args[1], args[2]
      if not _isinstance(path, _int):
        real = normalize(path)
        if real is None or _any(real.startswith(p) for p in hidden):
          raise _PermissionError("path not allowed in the sandbox")
      if restricted and not _isinstance(path, _int) and outside(path):
        writing = (_isinstance(mode, _str) and _any(c in mode for c in "wax+")) or (
            mode is None and _isinstance(flags, _int) and flags & _write_flags)
        if writing:
          raise _PermissionError("writing outside the sandbox directory")
      return
    if event == "os.chdir" and outside(args[0]):
      raise _PermissionError("chdir outside the sandbox directory")
    if not restricted:
      return
    # Restricted mode: no namespaces or uid of our own, so the hook is the
    # only barrier for network, processes, signals and the file system.
    if event.startswith("socket.") or event in (
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn",
        "os.spawn", "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
        "os.setuid", "os.setsid"):
      raise _PermissionError(event + " is not allowed in the sandbox")
    if event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                 "os.truncate", "os.utime", "os.link", "os.symlink", "os.rename",
                 "shutil.rmtree", "shutil.copyfile", "shutil.move"):
      for arg in args[:2]:
        if _isinstance(arg, (_str, _bytes)) and outside(arg):
          raise _PermissionError("writing outside the sandbox directory")

  sys.addaudithook(hook)

  budget = [0]

  def encode(value, depth):
    # Encodes a value of a builtin type as ASCII JSON; subclasses (Counter,
    # namedtuple, OrderedDict, ...) are encoded by their base type's data,
    # read through the base type's own methods, never the subclass's.
    budget[0] += 1
    if depth > 64 or budget[0] > 200000:
      raise _ValueError("value too large or too deep")
    if value is None:
      return '["n"]'
    if value is True or value is False:
      return '["b",' + ("1" if value is True else "0") + "]"
    if _isinstance(value, _int) and not _isinstance(value, _bool):
      return '["i","' + _hex(_int.__index__(value)) + '"]'
    if _isinstance(value, _float):
      return '["f","' + _float.hex(_float.__float__(value)) + '"]'
    if _isinstance(value, _complex):
      value = _complex.__complex__(value)
      return '["c","' + _float.hex(value.real) + '","' + _float.hex(value.imag) + '"]'
    if _isinstance(value, _str):
      text = _str.__str__(value)
      budget[0] += _len(text) // 64
      return '["s","' + text.encode("utf-8", "surrogatepass").hex() + '"]'
    if _isinstance(value, _bytes):
      data = _bytes(_bytes.__iter__(value))
      budget[0] += _len(data) // 64
      return '["y","' + data.hex() + '"]'
    if _isinstance(value, _dict):
      items = [
          "[" + encode(k, depth + 1) + "," + encode(v, depth + 1) + "]"
          for k, v in _dict.items(value)]
      return '["d",[' + ",".join(items) + "]]"
    for base, tag in ((_list, "l"), (_tuple, "t"), (_set, "S"), (_frozenset, "F")):
      if _isinstance(value, base):
        items = [encode(v, depth + 1) for v in base.__iter__(value)]
        return '["' + tag + '",[' + ",".join(items) + "]]"
    raise _ValueError("unsupported result type")

  namespace = {"__name__": "solution", "__builtins__": builtins}
  try:
    _exec(_compile(job["code"], "<solution>", "exec"), namespace)
    if job["kind"] == "eval":
      value = _eval(_compile(job["src"], "<test>", "eval"), namespace)
      payload = encode(value, 0)
    else:
      _exec(_compile(job["src"], "<test>", "exec"), namespace)
      payload = "null"
  except _exc_type as e:  # SystemExit and KeyboardInterrupt included
    try:
      _write(2, ("harness: " + _str(_type(e).__name__)[:80] + "\n").encode())
    except _exc_type:
      pass
    _exit(1)
  message = nonce + b" " + payload.encode()
  while message:
    message = message[_write(result_fd, message):]
  _exit(0)


_main()
