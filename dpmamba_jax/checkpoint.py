"""Orbax checkpoints: finished models (state + ModelConfig) and periodic training state.

Layout of a model checkpoint directory (`save_model`):
  state/   the model's whole nnx state (params, BatchNorm statistics), orbax StandardSave
  config/  ModelConfig as JSON, without its run-time fields (network.RUNTIME_FIELDS: scan_impl)
  meta/    free-form JSON (stage, epochs, wall time, text encoder, ...)
Orbax writes to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint that looks finished.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dpmamba_jax import errors
from dpmamba_jax.model import network


def _abs(path) -> str:
  return os.path.abspath(os.fspath(path))


def config_to_json(cfg) -> dict:
  """A frozen dataclass -> JSON-able dict (tuples become lists)."""
  return json_ready(dataclasses.asdict(cfg))


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


def save_model(path, model: nnx.Module, cfg, meta: dict | None = None) -> None:
  """Writes the model's whole state, its ModelConfig and `meta` to directory `path` (atomic)."""
  path = _abs(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  state = nnx.state(model)
  config = {k: v for k, v in config_to_json(cfg).items() if k not in network.RUNTIME_FIELDS}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config),
        meta=ocp.args.JsonSave(json_ready(dict(meta or {})))), force=True)


def load_model(path, *, scan_impl: str = "auto") -> tuple[nnx.Module, Any, dict]:
  """Restores (DPMamba, ModelConfig, meta) saved by `save_model`.

  scan_impl: the run-time scan choice of the restored model (a checkpoint written before these
  fields were left out may still name one; it is ignored).
  """
  path = _abs(path)
  if not is_model_checkpoint(path):
    raise errors.UserError(f"{path}: not a model checkpoint (expected state/ and config/ "
                           "written by dpmamba_jax.checkpoint.save_model)")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    head = ckptr.restore(path, args=ocp.args.Composite(
        config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    saved = {k: v for k, v in dict(head["config"]).items() if k not in network.RUNTIME_FIELDS}
    cfg = config_from_json(network.ModelConfig, dict(saved, scan_impl=scan_impl))
    abstract = nnx.eval_shape(lambda: network.DPMamba(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = ckptr.restore(path, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  model = nnx.merge(graphdef, restored["state"])
  return model, cfg, dict(head["meta"] or {})


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
                                             enable_async_checkpointing=False))

  def latest_epoch(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, epoch: int, state: Any, meta: dict) -> None:
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
    r = self._mgr.restore(int(epoch), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    state = like_state.replace(**r["state"])
    return state, dict(r["meta"])

  def close(self) -> None:
    self._mgr.close()


def _as_dict(state) -> dict:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
