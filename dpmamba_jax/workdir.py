"""A run's working folder: its log, creating it, locking it and binding its settings
(config.json).

Rerunning `train` in the same workdir resumes; config.json records the settings the run was
started with, and a rerun with other settings that change the numbers is refused (one line
naming the key). One process writes a workdir at a time (`lock_workdir`). Unusable folders are
one-line errors naming the path and why.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Callable, Iterator

from tqdm import tqdm

from dpmamba_jax import config as config_lib
from dpmamba_jax import errors
from dpmamba_jax import fileio
from dpmamba_jax import locks
from dpmamba_jax import runtime

# Keys that do not change the numbers; a rerun may change them without a new workdir.
_FREE_KEYS = ("stage", "log_every", "ckpt_every", "eval_batch", "maps", "compile_cache",
              "data_parallel", "scan_impl",
              "workdir", "data_dir", "teacher_ckpt", "dataset_file")



class RunLog:
  """Console lines (through tqdm.write) plus <workdir>/log.jsonl."""

  def __init__(self, workdir: str, quiet: bool = False):
    self.path = os.path.join(workdir, "log.jsonl")
    self.primary = runtime.primary_process()
    self.quiet = quiet or not self.primary

  def __call__(self, msg: str) -> None:
    if not self.quiet:
      tqdm.write(msg, file=sys.stdout)
      sys.stdout.flush()

  def warn(self, msg: str) -> None:
    """A `warning: ...` line on stderr, also with --quiet (on the primary process)."""
    if self.primary:
      tqdm.write(msg if msg.startswith("warning:") else f"warning: {msg}", file=sys.stderr)
      sys.stderr.flush()

  def record(self, entry: dict) -> None:
    if not self.primary:
      return
    with fileio.writing(self.path), open(self.path, "a") as f:
      f.write(json.dumps(entry) + "\n")

  def truncate(self, stage: str, after_epoch: int) -> None:
    """Drops entries of `stage` past `after_epoch` (written before a crash, redone on resume)."""
    if not self.primary or not os.path.isfile(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          e = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        if e.get("stage") == stage and e.get("epoch", 0) > after_epoch:
          continue
        keep.append(json.dumps(e) + "\n")
    fileio.write_text(self.path, "".join(keep))


def make_workdir(workdir: str) -> None:
  """Creates the workdir (and its parents); an OSError is one line naming the path and why."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f"--workdir {workdir}: {_why_no_folder(workdir, e)}") from None


@contextlib.contextmanager
def lock_workdir(workdir: str, warn: Callable[[str], None]) -> Iterator[None]:
  """Holds the workdir's lock (locks.py) for the block, on process 0 of a run (the others write
  what it writes, in step with it). Once held, the temporary files and folders that killed runs
  left there are removed (fileio.remove_stale_temps): no live process is writing them. Not in a
  multi-process run, whose other processes may be writing their copies of the same files."""
  primary = runtime.primary_process()
  with locks.hold(os.path.join(workdir, locks.LOCK_NAME), f"--workdir {workdir}", warn=warn,
                  enabled=primary):
    if primary and runtime.single_process():
      ckpt = os.path.join(workdir, "ckpt")
      folders = [workdir, os.path.join(workdir, "maps")]
      if os.path.isdir(ckpt):
        folders += [e.path for e in os.scandir(ckpt) if e.is_dir(follow_symlinks=False)]
      removed = [p for f in folders for p in fileio.remove_stale_temps(f)]
      if removed:
        warn(f"warning: {workdir}: removed {len(removed)} temporary file(s) left by an "
             f"interrupted run (e.g. {os.path.relpath(removed[0], workdir)})")
    yield


def _why_no_folder(path: str, e: OSError) -> str:
  if isinstance(e, FileExistsError) and not os.path.isdir(path):
    return f"is {fileio.what_is(path)}, expected a folder"
  if isinstance(e, NotADirectoryError):
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent) and not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
      return f"{parent} is a file, expected a folder"
  where = f" {e.filename}" if e.filename and os.fspath(e.filename) != path else ""
  return f"cannot create{where or ' it'} ({e.strerror or e})"


# What a rerun resumes from: once one of these exists, config.json binds the workdir's settings.
_RUN_OUTPUTS = ("split.npz", "teacher", "student", "ckpt", "metrics.json")


def check_workdir_config(cfg, workdir: str) -> None:
  """Writes config.json, or checks that a rerun uses the same settings (resume). A workdir
  whose run stopped before drawing its split (a bad setting, say) holds nothing to resume:
  its config.json is replaced."""
  path = os.path.join(workdir, "config.json")
  new = cfg.to_dict()
  started = any(os.path.exists(os.path.join(workdir, n)) for n in _RUN_OUTPUTS)
  if started and os.path.isfile(path):
    old = config_lib.read_saved_config(
        path, "this workdir's settings cannot be checked: use a new --workdir or restore the file")
    defaults = config_lib.RunConfig().to_dict()  # keys added later read as their defaults
    diff = sorted((k for k in set(old) | set(new)
                   if k not in _FREE_KEYS and old.get(k, defaults.get(k)) != new.get(k)),
                  key=lambda k: (k != "method", k))  # another method: said first
    if diff:
      k = diff[0]
      raise errors.UserError(
          f"{path}: this workdir was run with {k}={old.get(k)!r}, now {k}={new.get(k)!r}; "
          "rerun with the same settings to resume, or use a new --workdir")
  try:
    fileio.write_json(path, new)
  except OSError as e:  # an unwritable workdir (or config.json a folder, ...)
    raise errors.UserError(f"--workdir {workdir}: cannot write {os.path.basename(path)} "
                           f"({e.strerror or e})") from None
