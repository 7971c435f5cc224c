"""Data parallelism over a 1-D `("data",)` mesh: the batch is split over every device (all hosts'),
everything else (parameters, optimiser state, scene cubes, text features) is replicated.

It stays one jit per step and the same global computation: BatchNorm statistics and the
class-grouped losses reduce over the whole global batch (XLA inserts the collectives), so a
sharded step equals the single-device step up to float summation order.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def data_parallel_mesh(batch_size: int, *, enabled: bool = True, what: str = "batch",
                       log: Callable[[str], None] | None = print) -> jax.sharding.Mesh | None:
  """The `("data",)` mesh over every device (all hosts') when data parallelism applies.

  None (one device) when there is a single device, when `enabled` is False, or when
  `batch_size` is not a multiple of jax.device_count() (then `log` says why).
  """
  n = jax.device_count()
  if n <= 1:
    return None
  if not enabled:
    if log:
      log(f"data parallel: off (data_parallel=false); using 1 of {n} devices for the {what}")
    return None
  if batch_size % n:
    if log:
      log(f"data parallel: {what} {batch_size} is not a multiple of the {n} devices; running "
          f"on one device (make it a multiple of {n}, or --set data_parallel=false)")
    return None
  if log:
    log(f"data parallel: {what} {batch_size} sharded over {n} devices "
        f"({batch_size // n} per device), parameters replicated")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the "data" axis, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def _put(x, sharding: NamedSharding):
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  # Several hosts: every process holds the same global value (same seed, same sampler), and
  # builds its addressable shards from it.
  a = np.asarray(x)
  return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])


def replicate(tree, mesh: jax.sharding.Mesh):
  """Every array leaf of `tree` replicated on every device of `mesh` (no copy if already)."""
  s = replicated_sharding(mesh)
  return jax.tree.map(lambda x: _put(x, s), tree)


def shard_batch(x, mesh: jax.sharding.Mesh) -> jax.Array:
  """(B, ...) array split along B over the mesh's "data" axis (B divisible by its size)."""
  return _put(x, batch_sharding(mesh))
