"""File helpers: atomic writes, content hashes, PyTorch state dicts.

Writes go to a temp file in the destination folder, fsync, then os.replace: a reader (or a run
killed mid-write) sees either the old file or the whole new one, never a half-written file.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

from dpmamba_jax.errors import UserError


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


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
  """Writes `data` to `path` atomically (parent folders are created); permissions `mode`, or
  those of an ordinary new file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    if mode is None:
      give_ordinary_permissions(tmp)
    else:
      os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
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
