"""File helpers: atomic writes, content hashes, PyTorch state dicts.

Writes go to a temp file in the destination folder, fsync, then os.replace: a reader (or a run
killed mid-write) sees either the old file or the whole new one, never a half-written file.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Iterator

from dpmamba_jax.errors import NoSpace, UserError, is_no_space


# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def give_ordinary_permissions(path: str | os.PathLike) -> None:
  """chmod `path` to what open() would have created (0666 less the umask): mkstemp's temp
  files are 0600, which would leave maps and metrics unreadable to colleagues on a shared
  machine."""
  os.chmod(path, 0o666 & ~_UMASK)


def what_is(path: str | os.PathLike) -> str:
  """What is at `path`, for messages: "a folder", "a file", "a symlink loop", "a broken symlink
  (to TARGET)", "not found", or "neither a file nor a folder" (a device, a pipe, ...)."""
  if os.path.islink(path):
    try:
      os.stat(path)
    except OSError as e:
      if e.errno == errno.ELOOP:
        return "a symlink loop"
      return f"a broken symlink (to {os.readlink(path)})"
  if os.path.isdir(path):
    return "a folder"
  if os.path.isfile(path):
    return "a file"
  if not os.path.lexists(path):
    return "not found"
  return "neither a file nor a folder"


# ----------------------------------------------------------------------------------------------
# A full disk.

NO_SPACE_HINT = "free some space, then rerun the same command"


def no_space_error(path: str | os.PathLike, hint: str = NO_SPACE_HINT) -> NoSpace:
  return NoSpace(f"{os.fspath(path)}: no space left on device; {hint}")


@contextlib.contextmanager
def writing(path: str | os.PathLike, hint: str = NO_SPACE_HINT) -> Iterator[None]:
  """A full disk while the block writes `path` becomes NoSpace naming `path` (one line)."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - only a full disk is converted; the rest re-raised
    if is_no_space(e):
      raise no_space_error(path, hint) from None
    raise


# ----------------------------------------------------------------------------------------------
# Atomic writes and what a killed one leaves.

# mkstemp's names: prefix + 8 characters of [a-z0-9_] + suffix (ENVI's pair: .tmp.hdr, .tmp.img)
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(\.hdr|\.img)?$")
ORBAX_TEMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's folder being written, renamed when complete
_ORBAX_TEMP = re.compile(r"^(?P<name>[^.].*)\.orbax-checkpoint-tmp(-\d+)?$")


def temp_file(path: str | os.PathLike) -> str:
  """A new empty temporary file beside `path` (`.NAME.XXXXXXXX.tmp`, 0600), for an atomic write
  of `path`; `remove_stale_temps` knows its name."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  return tmp


def remove_stale_temps(folder: str | os.PathLike, names=None) -> list[str]:
  """Removes what killed writes of ours left in `folder`: `.NAME.XXXXXXXX.tmp` files and orbax's
  `NAME.orbax-checkpoint-tmp*` folders (with `names`, only those of these file names). Call it
  only while holding the lock of whatever writes there (locks.py). Returns the removed paths."""
  removed = []
  try:
    entries = list(os.scandir(folder))
  except OSError:
    return removed
  for entry in entries:
    m = _TEMP_FILE.match(entry.name) or _ORBAX_TEMP.match(entry.name)
    if m is None or (names is not None and m["name"] not in names):
      continue
    try:
      if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
      else:
        os.unlink(entry.path)
      removed.append(entry.path)
    except OSError:
      pass  # not ours to remove after all (permissions): left as it is
  return removed


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
  """Writes `data` to `path` atomically (parent folders are created); permissions `mode`, or
  those of an ordinary new file. A full disk: NoSpace naming `path`, nothing left behind."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = None
  try:
    with writing(path):
      tmp = temp_file(path)
      with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      if mode is None:
        give_ordinary_permissions(tmp)
      else:
        os.chmod(tmp, mode)
      os.replace(tmp, path)
  except BaseException:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  """UTF-8 text, atomically."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Indented JSON with a final newline, atomically."""
  write_text(path, json.dumps(obj, indent=1) + "\n")


def sha256_file(path: str) -> str:
  """Hex sha256 of a file's bytes (cached per path, size and modification time)."""
  st = os.stat(path)
  return _sha256_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # only part of the cache key
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def read_torch_state_dict(path: str, *, skip_non_tensors: bool = False) -> dict:
  """A PyTorch state dict (.pth/.pt) as {name: numpy array}, never executing code from the file.

  Uses `torch.load(..., weights_only=True)` (torch is an optional dependency); unwraps a
  {"model": ...} or {"state_dict": ...} checkpoint; floating tensors come back as float32.
  Raises UserError (one line) when torch is missing or the file is not a plain state dict.
  """
  try:
    import torch  # optional dependency, for .pth/.pt files only
  except ImportError:
    raise UserError(f"{path}: reading .pth/.pt needs torch (pip install torch), or export the "
                    "state dict to .npz once on a machine with torch (docs/parity.md)") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many kinds for unsafe / corrupt files
    first = str(e).splitlines()[0] if str(e) else ""
    raise UserError(f"{path}: torch.load(weights_only=True) failed ({type(e).__name__}: {first}); "
                    "TorchScript archives are not supported, export a state_dict") from None
  for key in ("model", "state_dict"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise UserError(f"{path}: expected a state dict, got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "detach"):
      if skip_non_tensors:
        continue
      raise UserError(f"{path}: key '{k}' is a {type(v).__name__}, expected a tensor")
    v = v.detach().cpu()
    out[str(k)] = (v.float() if v.is_floating_point() else v).numpy()
  return out
