"""The one inference path: eval-mode class predictions of a model over a scene's pixels.

Evaluation (evaluate.py), the maps (maps.py) and the tools all go through `Predictor`::

  predictor = Predictor(model, width=W, patch_size=P, batch=512)
  scene = predictor.prepare_scene(cubes)          # once per model and scene
  pred = predictor.predict_pixels(scene, z, flat_idx, mask_row)   # (N,) 0-based class ids

The padded per-modality scene cubes live on the device and every batch gathers its patches from
(batch,) flat pixel indices inside the jitted program, so memory is bounded by one batch of
patches whatever the scene size. The batch has a fixed shape (the last one is padded) and the
scenario mask is an input, not a static: one compile per model graph, scene width, patch size
and batch shape, for every scenario.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dpmamba_jax import losses
from dpmamba_jax import sharding
from dpmamba_jax.data.patches import gather_patch_rings, gather_patches

# Backends where a wide modality's embedding conv runs once over the whole scene
# (`Predictor.prepare_scene`) and each batch gathers its patches of that conv, corrected on the
# patch border (`Conv3x3.patch_conv_from_scene`): on CPU that conv is a large share of an
# inference pass, and the whole scene's conv costs about one batch's. On a GPU it is one matmul.
SCENE_CONV_BACKENDS = ("cpu",)
# ... for modalities with at least this many bands (a 1-band LiDAR patch conv costs less than
# gathering its (P, P, hidden) output).
SCENE_CONV_MIN_BANDS = 8
# Rows of the scene per conv call (bounds the conv's temporary memory on large scenes).
SCENE_CONV_TILE_ROWS = 32
# On a CPU (one device, no mesh) a predict batch runs as up to this many concurrent calls of
# equal sub-batches of at least CPU_PREDICT_MIN_SUB_BATCH patches. XLA:CPU runs the selective
# scan's loop on one core and one program's ops one after another; several calls in flight keep
# every core busy (docs/performance.md).
CPU_PREDICT_CALLS = 16
CPU_PREDICT_MIN_SUB_BATCH = 32


def _scene_conv_applies(bands: int) -> bool:
  return jax.default_backend() in SCENE_CONV_BACKENDS and bands >= SCENE_CONV_MIN_BANDS


def predict_calls(batch: int, max_calls: int, min_sub_batch: int | None = None) -> int:
  """How many equal sub-batches a predict batch runs as: the largest divisor of `batch` that is
  at most `max_calls` and leaves at least `min_sub_batch` (None: CPU_PREDICT_MIN_SUB_BATCH)
  patches per call (1 = one call)."""
  min_sub_batch = CPU_PREDICT_MIN_SUB_BATCH if min_sub_batch is None else min_sub_batch
  most = min(max_calls, batch // max(min_sub_batch, 1))
  return max([d for d in range(1, most + 1) if batch % d == 0], default=1)


@functools.lru_cache(maxsize=None)
def _programs(graphdef, width: int, patch_size: int, mesh: jax.sharding.Mesh | None):
  """(scene_conv, predict) jitted for one model graph, scene width and patch size; cached so
  that every Predictor of the same model (evaluation, then the maps) reuses one compile.

  scene_conv(params, rest, cube (H', W', C), m) -> {"conv": (H', W', hidden), "ring": the cube
  with one zero pixel around it}; predict(params, rest, scene, z, idx (b,), mask (b, M)) -> (b,)
  int32. With `mesh`, idx and mask are sharded over its "data" axis, everything else replicated.
  """

  def scene_conv(params, rest, cube, m):
    conv = nnx.merge(graphdef, params, rest).embed[m].conv
    # one zero pixel around the cube: the conv's padding, and the outer pixel of the rings
    padded = jnp.pad(cube, ((1, 1), (1, 1), (0, 0)))
    rows, tile = cube.shape[0], min(SCENE_CONV_TILE_ROWS, cube.shape[0])

    def conv_tile(t, out):  # row tiles into the output in place: no scene-sized temporaries
      start = jnp.minimum(t * tile, rows - tile)  # the last tile overlaps the one before
      x = jax.lax.dynamic_slice_in_dim(padded, start, tile + 2, axis=0)
      return jax.lax.dynamic_update_slice_in_dim(out, conv.conv_valid(x[None])[0], start, 0)

    out = jnp.zeros(cube.shape[:2] + (conv.kernel.shape[-1],), cube.dtype)  # (H', W', hidden)
    return {"conv": jax.lax.fori_loop(0, -(-rows // tile), conv_tile, out), "ring": padded}

  def predict(params, rest, scene, z, idx, mask):
    model = nnx.merge(graphdef, params, rest)
    xs, convs = [], []
    for m, entry in enumerate(scene):
      if isinstance(entry, dict):  # prepared: this modality's embedding conv over the scene
        ring = gather_patch_rings(entry["ring"], idx, width, patch_size)
        conv_patches = gather_patches(entry["conv"], idx, width, patch_size)
        xs.append(None)
        convs.append(model.embed[m].conv.patch_conv_from_scene(conv_patches, ring))
      else:
        x = gather_patches(entry, idx, width, patch_size)
        # a missing modality's raw input is zeroed (no effect in eval mode: the model puts the
        # prompt, or zeros for the teacher, in its feature slot)
        xs.append(x * mask[:, m, None, None, None].astype(x.dtype))
        convs.append(None)
    v = model(xs, mask, train=False, embed_conv=convs)
    return losses.predict(v, z)

  if mesh is None:
    return jax.jit(scene_conv, static_argnums=3), jax.jit(predict)
  rep, dat = sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)
  return (jax.jit(scene_conv, static_argnums=3, in_shardings=(rep, rep, rep), out_shardings=rep),
          jax.jit(predict, in_shardings=(rep, rep, rep, rep, dat, dat), out_shardings=rep))


def _multi_device(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  return jax.process_count() == 1 and any(len(x.sharding.device_set) > 1 for x in leaves)


class Predictor:
  """Eval-mode predictions of one model on one scene geometry, in fixed-size batches.

  Args:
    model: a DPMamba (teacher or student).
    width: W of the unpadded scene (flat pixel index = r * W + c).
    patch_size: P.
    batch: pixels per call; every call has this shape (the last batch is padded).
    mesh: a `sharding.data_parallel_mesh`: each batch is split over its devices (batch a
      multiple of their count), the model and the scene are replicated on it. None: one device.
    max_calls: without a mesh, a batch runs as `predict_calls(batch, max_calls)` concurrent
      calls on equal sub-batches (host threads; each sub-batch shape compiles once); None =
      CPU_PREDICT_CALLS on a CPU, 1 elsewhere. Every sample's computation is its own in eval
      mode, so the split changes no prediction beyond float rounding.

  Attributes:
    program: the jitted predict step (for `.lower`, `._cache_size()`).
  """

  def __init__(self, model, *, width: int, patch_size: int, batch: int = 512,
               mesh: jax.sharding.Mesh | None = None, max_calls: int | None = None):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    self.width, self.patch_size, self.batch, self.mesh = int(width), int(patch_size), int(batch), mesh
    self.num_modalities = len(model.embed)
    self._scene_conv, self.program = _programs(graphdef, self.width, self.patch_size, mesh)
    if mesh is not None:
      params, rest = sharding.replicate((params, rest), mesh)
      max_calls = 1  # one sharded call per batch
    elif _multi_device(params):  # trained data-parallel, inferred on one device
      params, rest = jax.device_put((params, rest), jax.devices()[0])
    if max_calls is None:
      max_calls = CPU_PREDICT_CALLS if jax.default_backend() == "cpu" else 1
    self.params, self.rest, self.max_calls = params, rest, int(max_calls)
    self._pool = (ThreadPoolExecutor(max_workers=self.max_calls, thread_name_prefix="predict")
                  if self.max_calls > 1 else None)

  @classmethod
  def for_run(cls, model, rd, batch: int) -> "Predictor":
    """A Predictor on a run's scene (run.RunData), sharded when the run's data parallelism
    applies to `batch` (`RunData.inference_mesh`)."""
    return cls(model, width=rd.width, patch_size=rd.patch_size, batch=batch,
               mesh=rd.inference_mesh(batch))

  def prepare_scene(self, cubes: Sequence) -> list:
    """The scene input of `predict_*` from the padded per-modality cubes: placed on the mesh's
    devices, with each wide modality's embedding conv run once over its cube
    (SCENE_CONV_BACKENDS, SCENE_CONV_MIN_BANDS). Call once per model and scene; entries
    prepared already pass through."""
    cubes = list(cubes)
    if self.mesh is not None:
      cubes = [c if isinstance(c, dict) else sharding.replicate(c, self.mesh) for c in cubes]
    return [self._scene_conv(self.params, self.rest, c, m)
            if not isinstance(c, dict) and _scene_conv_applies(c.shape[-1]) else c
            for m, c in enumerate(cubes)]

  def predict_batch(self, scene, z, idx, mask) -> jax.Array:
    """(b,) int32 class ids of flat pixel indices idx (b,) under mask (b, M) float32."""
    if self.mesh is not None:
      return self.program(self.params, self.rest, scene, z, sharding.shard_batch(idx, self.mesh),
                          sharding.shard_batch(mask, self.mesh))
    n = predict_calls(idx.shape[0], self.max_calls) if self._pool is not None else 1
    if n == 1:
      return self.program(self.params, self.rest, scene, z, idx, mask)
    size = idx.shape[0] // n
    idx, mask = np.asarray(idx), np.asarray(mask)  # host slices: no device op per slice
    parts = [(idx[i * size:(i + 1) * size], mask[i * size:(i + 1) * size]) for i in range(n)]

    def run(part):  # blocks in its own thread, so that the calls overlap
      return jax.block_until_ready(self.program(self.params, self.rest, scene, z, *part))

    # a new sub-batch shape compiles once: jit's cache makes the other threads wait for it
    return jnp.concatenate(list(self._pool.map(run, parts)))

  def predict_pixels(self, scene, z, flat_idx: np.ndarray, mask_row: np.ndarray | None = None,
                     *, desc: str | None = None) -> np.ndarray:
    """0-based predictions (N,) for flat pixel indices (N,).

    scene: `prepare_scene` of the cubes (plain cubes are prepared here, once per call); z: (C, D)
    text features; mask_row: (M,) 1 = present, or None (complete); desc: a progress bar label
    (None: no bar). Only the (batch,) indices go to the device per batch and only the (batch,)
    predictions come back; the next batch runs while the previous one is fetched.
    """
    flat_idx = np.asarray(flat_idx, np.int32)
    n, batch, m_count = flat_idx.shape[0], self.batch, self.num_modalities
    if n == 0:
      return np.zeros((0,), np.int32)
    row = (np.ones((m_count,), np.float32) if mask_row is None
           else np.asarray(mask_row, np.float32))
    scene = self.prepare_scene(scene)
    mask = np.broadcast_to(row, (batch, m_count))
    if self.mesh is None:
      mask, to_device = jnp.asarray(mask), jnp.asarray
    else:  # the sharded call puts each device's slice of idx straight from the host
      z, mask = sharding.replicate(z, self.mesh), sharding.shard_batch(mask, self.mesh)
      to_device = np.asarray
    n_batches = -(-n // batch)
    out = np.empty((n_batches * batch,), np.int32)
    padded = np.full((n_batches * batch,), flat_idx[0], np.int32)
    padded[:n] = flat_idx
    pending = None
    bar = tqdm(total=n_batches, desc=desc, unit="batch", leave=False, disable=desc is None,
               mininterval=1.0)
    for i in range(n_batches):
      pred = self.predict_batch(scene, z, to_device(padded[i * batch:(i + 1) * batch]), mask)
      if pending is not None:  # fetch the previous batch while this one runs
        j, p = pending
        out[j * batch:(j + 1) * batch] = np.asarray(jax.device_get(p))
        bar.update(1)
      pending = (i, pred)
    j, p = pending
    out[j * batch:(j + 1) * batch] = np.asarray(jax.device_get(p))
    bar.update(1)
    bar.close()
    return out[:n]

  def predict_scene(self, scene, z, height: int, mask_row: np.ndarray | None = None, *,
                    desc: str | None = None) -> np.ndarray:
    """(H, W) 0-based predictions for every pixel of the scene, streamed in batches."""
    idx = np.arange(height * self.width, dtype=np.int32)
    return self.predict_pixels(scene, z, idx, mask_row, desc=desc).reshape(height, self.width)
