"""Orbax checkpoints: finished models (state + ModelConfig) and periodic training state.

Layout of a model checkpoint directory (`save_model`):
  state/   the model's whole nnx state (params, BatchNorm statistics), orbax StandardSave
  config/  ModelConfig as JSON, without its run-time fields (network.RUNTIME_FIELDS: scan_impl)
  meta/    free-form JSON (stage, epochs, wall time, text encoder, ...)
  inputs/  JSON: how to read and transform a new scene (dataset definition, the input transform
           fitted at training time, the class-text features; run.saved_inputs), for `predict`
Orbax writes to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint that looks finished; a full disk while saving is one line (errors.NoSpace
naming the checkpoint) and its temporary directory is removed.

Damaged files (truncated, garbage, partly deleted) are reported, not tracebacks: `load_model` raises
`DamagedCheckpoint` (a UserError naming the folder, the part and the reason, plus the caller's
recovery hint); `TrainCheckpoints.restore_latest` falls back to the newest readable periodic
checkpoint, deleting the damaged ones with a warning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dpmamba_jax import errors
from dpmamba_jax import fileio
from dpmamba_jax.model import network


def _abs(path) -> str:
  return os.path.abspath(os.fspath(path))


class DamagedCheckpoint(errors.UserError):
  """A checkpoint folder that exists but cannot be read (one line: folder, part, reason, hint)."""


# What orbax, tensorstore and json raise for a missing, truncated or garbage file:
# FileNotFoundError, ValueError (json.JSONDecodeError, tensorstore's DATA_LOSS / NOT_FOUND /
# OUT_OF_RANGE, ...) and KeyError ('Item "state" was not found in the checkpoint').
_READ_ERRORS = (OSError, ValueError, KeyError)


def read_error(e: BaseException) -> BaseException | None:
  """The damaged-file error behind `e`, or None when `e` is something else (to be re-raised).

  Orbax wraps tensorstore's error reading array data in a bare `Exception(...) from e`
  ("Encountered error while reading array index"); only that exact type with such a cause counts.
  """
  if isinstance(e, _READ_ERRORS):
    return e
  if type(e) is Exception and isinstance(e.__cause__, _READ_ERRORS):
    return e.__cause__
  return None


def describe_read_error(e: BaseException) -> str:
  """`TypeName: message` on one short line (tensorstore's spec dump cut off)."""
  msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  msg = " ".join(msg.split(" [tensorstore_spec=")[0].split())
  if len(msg) > 240:  # tensorstore: "CODE: what: ...: the root cause": keep both ends
    msg = msg[:100] + " ... " + msg[-135:]
  return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _quiet_abandoned_io() -> None:
  """Hides the noise of a failed orbax read or write (installed once, before the first one).

  When one read or write fails, orbax closes its event loop while tensorstore still completes
  the others: their callbacks into the closed loop (RuntimeError('Event loop is closed') from
  asyncio's _check_closed, printed through sys.excepthook or as unraisable) and the read
  coroutines left unfinished (failing later, or closed when collected) are reported as
  tracebacks, one per array, around our one-line message. Exactly those are dropped; anything
  else goes to the previous hooks.
  """
  prev = sys.unraisablehook
  if getattr(prev, "_drops_abandoned_io", False):
    return

  def unraisable(u):
    if not _abandoned_read(u):
      prev(u)

  prev_except = sys.excepthook

  def excepthook(tp, e, tb):
    if not _closed_loop_callback(e, tb):
      prev_except(tp, e, tb)

  unraisable._drops_abandoned_io = True
  sys.unraisablehook, sys.excepthook = unraisable, excepthook


def _closed_loop_callback(e, tb) -> bool:
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (type(e) is RuntimeError and str(e) == "Event loop is closed" and tb is not None
          and tb.tb_frame.f_code.co_name == "_check_closed")


def _abandoned_read(u) -> bool:
  e = u.exc_value
  if _closed_loop_callback(e, u.exc_traceback):
    return True
  # an orbax read coroutine left unfinished: it failed after the loop closed, or it is closed
  # when collected (orbax turns the GeneratorExit into a bare Exception)
  code = getattr(u.object, "cr_code", None)
  return (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename and e is not None
          and (read_error(e) is not None
               or (type(e) is Exception and isinstance(e.__cause__, GeneratorExit))))


class _DropNoSpaceLogs(logging.Filter):
  """Orbax logs each failed write thread's error (tensorstore's spec dump included) before the
  save raises, and asyncio each unfinished write task's when it is collected; a full disk is
  reported once, by `_saving`."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not errors.mentions_no_space(record.getMessage())


for _logger in ("absl", "asyncio"):
  logging.getLogger(_logger).addFilter(_DropNoSpaceLogs())


@contextlib.contextmanager
def _saving(path: str) -> Iterator[None]:
  """A full disk while orbax writes the checkpoint `path`: its temporary folder removed, then
  NoSpace naming `path` (one line); the checkpoint before it, if any, is untouched."""
  _quiet_abandoned_io()
  try:
    yield
  except Exception as e:  # noqa: BLE001 - only a full disk is converted; the rest re-raised
    if not errors.is_no_space(e):
      raise
    fileio.remove_stale_temps(os.path.dirname(path), names={os.path.basename(path)})
    raise fileio.no_space_error(path) from None


def _damaged(path: str, part: str, reason: str, hint: str | None) -> DamagedCheckpoint:
  return DamagedCheckpoint(f"{path}: damaged checkpoint ({part}: {reason})"
                           + (f"; {hint}" if hint else ""))


def config_to_json(cfg) -> dict:
  """A frozen dataclass (or a dict) -> JSON-able dict (tuples become lists)."""
  return json_ready(cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg))


def json_ready(x):
  if isinstance(x, dict):
    return {str(k): json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_ready(v) for v in x]
  return x


def config_from_json(cls, d: dict):
  """Inverse of `config_to_json` for a frozen dataclass whose sequence fields are tuples."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise errors.UserError(f"checkpoint config has unknown {cls.__name__} keys {unknown}")
  kw = {k: (_to_tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
  return cls(**kw)


def _to_tuple(v):
  return tuple(_to_tuple(x) if isinstance(x, list) else x for x in v)


def is_model_checkpoint(path) -> bool:
  p = _abs(path)
  return os.path.isdir(os.path.join(p, "state")) and os.path.isdir(os.path.join(p, "config"))


def has_model(path, *, hint: str | None = None) -> bool:
  """False if nothing is at `path`, True for a model checkpoint; DamagedCheckpoint for anything
  else there (a folder without state/ or config/: orbax renames only complete checkpoints into
  place, so that is damage, not a run in progress)."""
  p = _abs(path)
  if not os.path.lexists(p):
    return False
  if is_model_checkpoint(p):
    return True
  if not os.path.isdir(p):
    raise _damaged(p, "not a folder", "expected a model checkpoint folder", hint)
  missing = [d + "/" for d in ("state", "config") if not os.path.isdir(os.path.join(p, d))]
  raise _damaged(p, " and ".join(missing), "missing", hint)


def save_model(path, model: nnx.Module, cfg, meta: dict | None = None,
               inputs: dict | None = None) -> None:
  """Writes the model's whole state, its ModelConfig, `meta` and `inputs` (run.saved_inputs) to
  directory `path` (atomic)."""
  path = _abs(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  state = nnx.state(model)
  config = {k: v for k, v in config_to_json(cfg).items() if k not in network.RUNTIME_FIELDS}
  items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
               meta=ocp.args.JsonSave(json_ready(dict(meta or {}))))
  if inputs is not None:
    items["inputs"] = ocp.args.JsonSave(json_ready(inputs))
  with _saving(path), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, args=ocp.args.Composite(**items), force=True)


def has_inputs(path) -> bool:
  return os.path.isdir(os.path.join(_abs(path), "inputs"))


def inputs_intact(path) -> bool:
  """Whether the model checkpoint at `path` has its `inputs` and they read back."""
  if not has_inputs(path):
    return False
  try:
    load_inputs(path)
  except DamagedCheckpoint:
    return False
  return True


def load_inputs(path, *, hint: str | None = None) -> dict:
  """The `inputs` JSON of a model checkpoint. A checkpoint written before models kept their
  input transform has none: a UserError saying how to add it (`hint`)."""
  path = _abs(path)
  if not is_model_checkpoint(path):
    raise errors.UserError(f"{path}: not a model checkpoint (expected state/ and config/ "
                           "written by dpmamba_jax.checkpoint.save_model)")
  if not has_inputs(path):
    raise errors.UserError(f"{path}: this checkpoint does not record its input transform (it "
                           f"was saved by an older version){'; ' + hint if hint else ''}")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    try:
      got = ckptr.restore(path, args=ocp.args.Composite(inputs=ocp.args.JsonRestore()))["inputs"]
    except Exception as e:  # noqa: BLE001 - only damaged-file errors (read_error) are caught
      cause = read_error(e)
      if cause is None:
        raise
      raise _damaged(path, "inputs/metadata", describe_read_error(cause), hint) from None
  if not isinstance(got, dict) or "transform" not in got or "dataset" not in got:
    raise _damaged(path, "inputs/metadata", "expected the JSON object of run.saved_inputs", hint)
  return got


def add_inputs(path, inputs: dict, *,
               rebuild: Callable[[dict], nnx.Module] | None = None) -> None:
  """Rewrites the model checkpoint at `path` with `inputs` (for checkpoints saved before models
  kept them, or whose inputs are damaged): the new copy is complete before the old one is
  removed. rebuild: as load_model's (a comparison method's model)."""
  path = _abs(path)
  model, cfg, meta = load_model(path, rebuild=rebuild)
  tmp, old = path + ".with-inputs", path + ".without-inputs"
  for p in (tmp, old):
    if os.path.exists(p):
      shutil.rmtree(p)
  try:
    save_model(tmp, model, cfg, meta, inputs)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  os.replace(path, old)
  os.replace(tmp, path)
  shutil.rmtree(old)


def _restore_part(ckptr, path: str, part: str, args, hint: str | None):
  """One part of a model checkpoint; a damaged file is a DamagedCheckpoint naming the part."""
  try:
    return ckptr.restore(path, args=ocp.args.Composite(**{part: args}))[part]
  except Exception as e:  # noqa: BLE001 - only damaged-file errors (read_error) are caught
    cause = read_error(e)
    if cause is None:
      raise
    where = f"{part}/" if part == "state" else f"{part}/metadata"  # JsonSave's one file
    raise _damaged(path, where, describe_read_error(cause), hint) from None


def _restore_json(ckptr, path: str, part: str, hint: str | None) -> dict:
  """The JSON object of part "config" or "meta" (an absent meta reads as {})."""
  got = _restore_part(ckptr, path, part, ocp.args.JsonRestore(), hint)
  if got is None and part == "meta":
    return {}
  if not isinstance(got, dict):
    raise _damaged(path, f"{part}/metadata", f"expected a JSON object, got {type(got).__name__}",
                   hint)
  return got


def _read_json_part(path, part: str, hint: str | None) -> dict:
  path = _abs(path)
  if not is_model_checkpoint(path):
    raise errors.UserError(f"{path}: not a model checkpoint (expected state/ and config/ "
                           "written by dpmamba_jax.checkpoint.save_model)")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    return _restore_json(ckptr, path, part, hint)


def load_meta(path, *, hint: str | None = None) -> dict:
  """The `meta` JSON of a model checkpoint (stage, epochs, method, ...)."""
  return _read_json_part(path, "meta", hint)


def load_config(path, *, hint: str | None = None) -> dict:
  """The `config` JSON of a model checkpoint (a DPMamba ModelConfig, or a comparison method's
  {"shapes": ...})."""
  return _read_json_part(path, "config", hint)


def load_model(path, *, scan_impl: str = "auto", hint: str | None = None,
               rebuild: Callable[[dict], nnx.Module] | None = None
               ) -> tuple[nnx.Module, Any, dict]:
  """Restores (DPMamba, ModelConfig, meta) saved by `save_model`; with `rebuild` (a comparison
  method's model: saved config dict -> a new model of that structure), (model, config dict,
  meta).

  scan_impl: the run-time scan choice of the restored model (a checkpoint written before these
  fields were left out may still name one; it is ignored). A damaged checkpoint raises
  DamagedCheckpoint naming the part (config/, meta/, state/) and the reason, then `hint` (how to
  recover, which only the caller knows).
  """
  path = _abs(path)
  if not is_model_checkpoint(path):
    raise errors.UserError(f"{path}: not a model checkpoint (expected state/ and config/ "
                           "written by dpmamba_jax.checkpoint.save_model)")
  _quiet_abandoned_io()
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    saved = _restore_json(ckptr, path, "config", hint)
    meta = _restore_json(ckptr, path, "meta", hint)
    saved = {k: v for k, v in saved.items() if k not in network.RUNTIME_FIELDS}
    try:
      if rebuild is None:
        cfg = config_from_json(network.ModelConfig, dict(saved, scan_impl=scan_impl))
        abstract = nnx.eval_shape(lambda: network.DPMamba(cfg, rngs=nnx.Rngs(0)))
      else:
        cfg = saved
        abstract = nnx.eval_shape(lambda: rebuild(cfg))
    except (TypeError, ValueError, KeyError, errors.UserError) as e:  # keys / values refused
      raise _damaged(path, "config/metadata", " ".join(str(e).split()), hint) from None
    graphdef, abstract_state = nnx.split(abstract)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    state = _restore_part(ckptr, path, "state", ocp.args.StandardRestore(target), hint)
  model = nnx.merge(graphdef, state)
  return model, cfg, meta


class TrainCheckpoints:
  """Periodic training checkpoints of one stage (orbax CheckpointManager, atomic, sync).

  The checkpoint step is the number of finished epochs. Each holds the whole train state
  (params, batch stats, optimiser, step, rng) as one pytree plus JSON meta (epoch, wall time,
  the sampler position = the next epoch, the log history needed to finish identically).
  """

  def __init__(self, directory, max_to_keep: int = 2):
    self.directory = _abs(directory)
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False,
                                             cleanup_tmp_directories=True))

  def latest_epoch(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, epoch: int, state: Any, meta: dict) -> None:
    """Saves epoch `epoch`; a full disk is NoSpace naming its folder, nothing left of it."""
    with _saving(os.path.join(self.directory, str(int(epoch)))):
      self._mgr.save(int(epoch), args=ocp.args.Composite(
          state=ocp.args.StandardSave(_as_dict(state)),
          meta=ocp.args.JsonSave(json_ready(dict(meta)))), force=True)
      self._mgr.wait_until_finished()

  def restore(self, like_state: Any, epoch: int | None = None) -> tuple[Any, dict]:
    """Restores into the structure of `like_state` (a TrainState); returns (state, meta)."""
    epoch = self.latest_epoch() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f"no training checkpoint in {self.directory}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_dict(like_state))
    _quiet_abandoned_io()
    r = self._mgr.restore(int(epoch), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    meta = r["meta"]
    if not isinstance(meta, dict):
      raise ValueError(f"meta/ holds a {type(meta).__name__}, expected a JSON object")
    state = like_state.replace(**r["state"])
    return state, dict(meta)

  def restore_latest(self, like_state: Any,
                     warn: Callable[[str], None]) -> tuple[Any, dict] | None:
    """The newest readable checkpoint as (state, meta), or None when there is none.

    A damaged one (truncated / garbage / partly deleted files) is deleted, with a one-line
    `warn(...)` naming it, and the one before it is tried (max_to_keep of them are kept); it has to
    go, as the run saves that epoch again.
    """
    for epoch in sorted(self._mgr.all_steps(), reverse=True):
      try:
        state, meta = self.restore(like_state, epoch)
        if meta.get("epoch") != epoch:
          raise ValueError(f"meta/ says epoch {meta.get('epoch')!r:.40}, expected {epoch}")
        return state, meta
      except Exception as e:  # noqa: BLE001 - only damaged-file errors (read_error) are caught
        cause = read_error(e)
        if cause is None:
          raise
        self._mgr.delete(epoch)
        warn(f"warning: {os.path.join(self.directory, str(epoch))}: damaged training checkpoint "
             f"({describe_read_error(cause)}); deleted it")
    return None

  def close(self) -> None:
    self._mgr.close()


def _as_dict(state) -> dict:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
