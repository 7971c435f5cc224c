"""One writer at a time: an exclusive lock on a run's workdir (train, evaluate) and on predict's
outputs.

`hold(lock_path, what)` takes an flock(2) on `lock_path` and writes the holder into it (pid, host,
since when, command). A second process stops at once with one line naming that holder. The kernel
drops the lock when its holder dies, even by kill -9, but the file stays behind: the next run
finds it unlocked with a holder in it, takes it over and says so in a warning. A clean release
removes the file.

On a filesystem without flock (some network mounts answer ENOLCK), the run goes on unlocked
after a one-line warning.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Callable, Iterator

from dpmamba_jax import errors

LOCK_NAME = ".dpmamba.lock"  # in a workdir; predict: .<map name>.lock beside the map


def _holder() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": _shorten(" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]))}


def _shorten(text: str, most: int = 120) -> str:
  return text if len(text) <= most else text[:text.rfind(" ", 0, most - 4)] + " ..."


def describe_holder(info: dict | None) -> str:
  """"pid 123 on host h since 2026-12-06T20:30:01+00:00 (train.py --workdir ...)", for messages."""
  if not info:
    return "another process (its lock file does not say which)"
  text = (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since "
          f"{info.get('since', '?')}")
  return text + (f" ({info['command']})" if info.get("command") else "")


def _read_holder(fd: int) -> dict | None:
  """The holder written in an open lock file; None when it is empty; {} when it cannot be read
  (cut short by a kill, say)."""
  try:
    raw = os.pread(fd, 4096, 0)
  except OSError:
    return {}
  if not raw.strip():
    return None
  try:
    info = json.loads(raw.decode("utf-8"))
  except ValueError:
    return {}
  return info if isinstance(info, dict) else {}


def _same_file(fd: int, path: str) -> bool:
  """Whether `path` still names the file open as `fd` (a releasing holder may have removed it
  between our open and our flock: then that lock is worthless and we retry)."""
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


@contextlib.contextmanager
def hold(lock_path: str, what: str, *, warn: Callable[[str], None],
         enabled: bool = True) -> Iterator[None]:
  """Holds the exclusive lock `lock_path` for the block (the folder must exist).

  what: what the lock protects, named in the messages (e.g. "--workdir runs/x"). A live holder:
  UserError naming it (pid, host, since when, command). A holder that died without releasing:
  a `warning: ...` through `warn`, then the lock is taken over. enabled=False: no lock (the
  other processes of a multi-host run, whose process 0 holds it).
  """
  if not enabled:
    yield
    return
  fd = _acquire(lock_path, what, warn)
  try:
    yield
  finally:
    if fd is not None:
      with contextlib.suppress(OSError):
        os.unlink(lock_path)  # before the unlock: a waiting opener then sees another file
      os.close(fd)


def _acquire(lock_path: str, what: str, warn: Callable[[str], None]) -> int | None:
  while True:
    try:
      fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise errors.UserError(f"{lock_path}: cannot create the lock of {what} "
                             f"({e.strerror or e})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      info = _read_holder(fd)
      os.close(fd)
      raise errors.UserError(
          f"{what}: in use by {describe_holder(info)}; wait for it to finish or stop it, or "
          f"use another folder (lock file {lock_path})") from None
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
        warn(f"warning: {lock_path}: this filesystem cannot lock files ({e.strerror}); make "
             f"sure no other process writes {what}")
        return None
      raise
    if not _same_file(fd, lock_path):
      os.close(fd)
      continue
    previous = _read_holder(fd)
    if previous is not None:
      warn(f"warning: {lock_path}: taking over the lock of {describe_holder(previous)}, which "
           "ended without releasing it (killed?)")
    data = (json.dumps(_holder()) + "\n").encode("utf-8")
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, data, 0)
    except OSError as e:  # a full disk: a lock without a holder in it still excludes others
      if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        os.close(fd)
        raise
    return fd
