"""Atomic file writes: a temp file in the destination folder, fsync, then os.replace.

A reader (or a run killed mid-write) sees either the old file or the whole new one, never a
half-written file.
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
  """Writes `data` to `path` atomically (parent folders are created)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    if mode is not None:
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
