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

import contextlib
import dataclasses
import functools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dpmamba_jax import checkpoint
from dpmamba_jax import errors
from dpmamba_jax import figures
from dpmamba_jax import losses
from dpmamba_jax import method as method_lib
from dpmamba_jax import methods
from dpmamba_jax import sharding
from dpmamba_jax.data import dataset_file
from dpmamba_jax.data import datasets
from dpmamba_jax.data import io as data_io
from dpmamba_jax.data import rasters
from dpmamba_jax.data.patches import check_patch_size
from dpmamba_jax.data.patches import gather_patch_rings, gather_patches
from dpmamba_jax.data.preprocessing import InputTransform
from dpmamba_jax.model import network

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
def _programs(graphdef, width: int, patch_size: int, mesh: jax.sharding.Mesh | None,
              scores: bool = False):
  """(scene_conv, predict) jitted for one model graph, scene width and patch size; cached so
  that every Predictor of the same model (evaluation, then the maps) reuses one compile.

  scene_conv(params, rest, cube (H', W', C), m) -> {"conv": (H', W', hidden), "ring": the cube
  with one zero pixel around it}; predict(params, rest, scene, z, idx (b,), mask (b, M)) -> (b,)
  int32 class ids, or with `scores` the pair (ids (b,), softmax of the cosine logits (b, C)).
  With `mesh`, idx and mask are sharded over its "data" axis, everything else replicated.
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
    if isinstance(model, method_lib.Classifier):  # another method: its class logits
      logits = model([gather_patches(c, idx, width, patch_size) for c in scene], mask)
      ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      return (ids, jax.nn.softmax(logits, axis=-1)) if scores else ids
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
    if scores:
      return losses.predict(v, z), jax.nn.softmax(losses.cosine_logits(v, z), axis=-1)
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
    model: a DPMamba (teacher or student; classes from the cosine logits against the text
      features z), or another method's method.Classifier (its logits; z is not used).
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
               mesh: jax.sharding.Mesh | None = None, max_calls: int | None = None,
               scores: bool = False):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    self.width, self.patch_size, self.batch, self.mesh = int(width), int(patch_size), int(batch), mesh
    self.is_dpmamba = isinstance(model, network.DPMamba)
    self.num_modalities = len(model.cfg.bands) if self.is_dpmamba else model.num_modalities
    self.scores = bool(scores)
    self._scene_conv, self.program = _programs(graphdef, self.width, self.patch_size, mesh,
                                               self.scores)
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
            if self.is_dpmamba and not isinstance(c, dict) and _scene_conv_applies(c.shape[-1])
            else c for m, c in enumerate(cubes)]

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
    outs = list(self._pool.map(run, parts))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)

  def predict_pixels(self, scene, z, flat_idx: np.ndarray, mask_row: np.ndarray | None = None,
                     *, desc: str | None = None, progress=None) -> np.ndarray:
    """0-based predictions (N,) for flat pixel indices (N,); with `scores`, the pair
    (predictions (N,), class probabilities (N, C) float32).

    scene: `prepare_scene` of the cubes (plain cubes are prepared here, once per call); z: (C, D)
    text features; mask_row: (M,) 1 = present, or None (complete); desc: a progress bar label
    (None: no bar); progress: a bar of the caller's (tqdm-like, `.update(n)`) advanced by the
    pixels of each batch as it comes back, instead of a bar of this call's own. Only the (batch,)
    indices go to the device per batch and only the (batch,) predictions come back; the next
    batch runs while the previous one is fetched.
    """
    flat_idx = np.asarray(flat_idx, np.int32)
    n, batch, m_count = flat_idx.shape[0], self.batch, self.num_modalities
    if n == 0:
      empty = np.zeros((0,), np.int32)
      return (empty, np.zeros((0, z.shape[0]), np.float32)) if self.scores else empty
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
    out = [np.empty((n_batches * batch,), np.int32)]
    if self.scores:
      out.append(np.empty((n_batches * batch, z.shape[0]), np.float32))
    padded = np.full((n_batches * batch,), flat_idx[0], np.int32)
    padded[:n] = flat_idx

    def fetch(j, pred):
      for o, p in zip(out, pred if self.scores else (pred,)):
        o[j * batch:(j + 1) * batch] = np.asarray(jax.device_get(p))
      bar.update(1)
      if progress is not None:
        progress.update(min(batch, n - j * batch))

    pending = None
    bar = tqdm(total=n_batches, desc=desc, unit="batch", leave=False,
               disable=desc is None or progress is not None, mininterval=1.0)
    for i in range(n_batches):
      pred = self.predict_batch(scene, z, to_device(padded[i * batch:(i + 1) * batch]), mask)
      if pending is not None:  # fetch the previous batch while this one runs
        fetch(*pending)
      pending = (i, pred)
    fetch(*pending)
    bar.close()
    return (out[0][:n], out[1][:n]) if self.scores else out[0][:n]

  def predict_scene(self, scene, z, height: int, mask_row: np.ndarray | None = None, *,
                    desc: str | None = None, progress=None, known=None,
                    skip: np.ndarray | None = None) -> np.ndarray:
    """(H, W) 0-based predictions for every pixel of the scene, streamed in batches (with
    `scores`, also the (H, W, C) class probabilities).

    known: (flat_idx (N,), predictions (N,)) of pixels this model classified already under the
    same mask_row (evaluation's test pixels, `pixels_to_classify`): copied, not classified
    again. skip: (H, W) bool, pixels not to classify (no data): -1 in the result. Neither with
    `scores`. desc, progress: as `predict_pixels`.
    """
    shape = (height, self.width)
    if known is None and skip is None:
      out = self.predict_pixels(scene, z, np.arange(height * self.width, dtype=np.int32),
                                mask_row, desc=desc, progress=progress)
      if self.scores:
        return out[0].reshape(shape), out[1].reshape(shape + (-1,))
      return out.reshape(shape)
    if self.scores:
      raise ValueError("predict_scene: known / skip without class probabilities only")
    pred = np.full(height * self.width, -1, np.int32)
    todo = pixels_to_classify(shape, None if known is None else known[0], skip)
    if known is not None:
      idx, known_pred = np.asarray(known[0]), np.asarray(known[1])
      if idx.shape != known_pred.shape or idx.ndim != 1:
        raise ValueError(f"known: indices {idx.shape} and predictions {known_pred.shape}; "
                         "expected two (N,) arrays")
      pred[idx] = known_pred
    pred[todo] = self.predict_pixels(scene, z, todo, mask_row, desc=desc, progress=progress)
    return pred.reshape(shape)


def compile_side_by_side(models: Sequence, rd, batch: int) -> None:
  """Compiles the predict programs of `Predictor.for_run(model, rd, batch)` for several models
  at once, by running one batch of each in its own thread (the results are dropped): XLA
  compiles a program on one core, so one after another the other core would wait. Not across
  several processes (their sharded calls must start in the same order on every host)."""
  if len(models) < 2 or jax.process_count() > 1:
    return
  idx = np.arange(min(batch, rd.height * rd.width), dtype=np.int32)

  def one(model):
    predictor = Predictor.for_run(model, rd, batch)
    predictor.predict_pixels(predictor.prepare_scene(rd.cubes), rd.z, idx)

  with ThreadPoolExecutor(len(models), thread_name_prefix="compile") as pool:
    list(pool.map(one, models))


def pixels_to_classify(shape: tuple[int, int], known_idx: np.ndarray | None = None,
                       skip: np.ndarray | None = None) -> np.ndarray:
  """The flat indices (n,) int32, raster order, that `Predictor.predict_scene` classifies on a
  scene of `shape` (H, W): every pixel but the known ones (flat indices (N,), or None) and the
  skipped ones ((H, W) bool, or None)."""
  todo = np.ones(shape[0] * shape[1], bool)
  if known_idx is not None:
    todo[np.asarray(known_idx)] = False
  if skip is not None:
    todo &= ~np.asarray(skip, bool).ravel()
  return np.flatnonzero(todo).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# A new scene: `python -m dpmamba_jax.predict`.

DEFAULT_TILE_ROWS = 64
EXPORT_HINT = ("add it with python -m dpmamba_jax.evaluate --workdir RUN --export-inputs (RUN: the "
               "training workdir, with its data in place), or train again")


def _reflect(r: int, n: int) -> int:
  """Row r of a scene of n rows padded with numpy mode 'symmetric' (pad_cubes)."""
  while r < 0 or r >= n:
    r = -r - 1 if r < 0 else 2 * n - r - 1
  return r


@dataclasses.dataclass
class SceneInput:
  """A new scene to classify: one ModalityReader per model modality (None = missing)."""
  readers: list                        # [io.ModalityReader | None] in the model's order
  height: int
  width: int
  georef: Optional[rasters.GeoRef]


def classify_scene(predictor: Predictor, scene: SceneInput, transform: InputTransform, z, *,
                   tile_rows: int = DEFAULT_TILE_ROWS, progress: bool = True):
  """Classifies every valid pixel of `scene`, one tile of rows at a time (bounded memory).

  Each tile reads its rows plus the patch halo (P // 2 rows above and below: padded as the whole
  scene would be at the scene's edges, `pad_cubes`), applies the model's saved input transform
  (pixels at a modality's nodata value or not finite are no data: 0 in the map)
  and predicts its valid pixels with the scenario mask of the missing modalities (the student
  puts its prompts there, the teacher zeros). Every tile has the same shape, so one compile.

  Yields:
    (start row, ids (rows, W) uint8: 1..C, 0 = no data; probabilities (rows, W, C) float32 with
    NaN where no data, or None without `predictor.scores`).
  """
  h, w, half = scene.height, scene.width, predictor.patch_size // 2
  mask_row = np.asarray([r is not None for r in scene.readers], np.float32)
  total = scene.height * scene.width
  bar = tqdm(total=total, unit="px", unit_scale=True, desc="predict", disable=not progress,
             mininterval=1.0, file=sys.stderr)
  tile_rows = min(tile_rows, h)  # a tile taller than the scene is the scene
  for start in range(0, h, tile_rows):
    stop = min(h, start + tile_rows)
    rows = [_reflect(r, h) for r in range(start - half, stop + half)]  # padded rows of the tile
    lo, hi = min(rows), max(rows) + 1
    cubes, invalid = [], np.zeros((hi - lo, w), bool)
    for m, reader in enumerate(scene.readers):
      k = transform.parts[m].out_bands
      if reader is None:
        cubes.append(np.zeros((tile_rows + 2 * half, w + 2 * half, k), np.float32))
        continue
      block, nodata = reader.read_rows(lo, hi)
      block = np.array(block, np.float32)  # a copy: a .npy block is a read-only memory map
      # NaN / Inf without a declared nodata value: no data too (training refuses them instead)
      nodata = (~np.isfinite(block).all(axis=-1)) | (False if nodata is None else nodata)
      block[nodata] = 0.0
      x = transform.parts[m].apply(block.reshape((hi - lo) * w, -1)).reshape(hi - lo, w, k)
      x[nodata] = 0.0
      invalid |= nodata
      x = np.pad(x[np.asarray(rows) - lo], ((0, 0), (half, half), (0, 0)), mode="symmetric")
      # the last tile padded to the others' shape (rows no core pixel's patch reaches)
      cubes.append(np.pad(x, ((0, tile_rows + 2 * half - x.shape[0]), (0, 0), (0, 0))))
    core = invalid[start - lo:stop - lo]                    # (rows, W) no data
    idx = np.flatnonzero(~core.ravel()).astype(np.int32)    # tile-local r * W + c
    ids = np.zeros(core.shape, np.uint8)
    probs = None
    if idx.size:
      out = predictor.predict_pixels(predictor.prepare_scene(cubes), z, idx, mask_row)
      pred = out[0] if predictor.scores else out
      ids.ravel()[idx] = pred + 1
      if predictor.scores:
        probs = np.full(core.shape + (out[1].shape[1],), np.nan, np.float32)
        probs.reshape(-1, out[1].shape[1])[idx] = out[1]
    elif predictor.scores:
      probs = np.full(core.shape + (z.shape[0],), np.nan, np.float32)
    bar.update(core.size)
    yield start, ids, probs
  bar.close()


def _modality_index(spec: datasets.DatasetSpec, name: str, where: str) -> int:
  by_lower = {m.lower(): i for i, m in enumerate(spec.modalities)}
  if name.lower() not in by_lower:
    raise errors.UserError(f"{where} {name!r}: the model's modalities are "
                           f"{', '.join(spec.modalities)}")
  return by_lower[name.lower()]


def _files_in_folder(spec: datasets.DatasetSpec, m: int, folder: str) -> Optional[list]:
  """The files of modality m in `folder`, found like the training data (the same file names of
  a dataset file, else the built-in stems); None when absent."""
  if spec.modality_files:
    names = [os.path.basename(f) for f in spec.modality_files[m]]
    found = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    if found and len(found) < len(names):
      missing = sorted(set(names) - {os.path.basename(f) for f in found})
      raise errors.UserError(f"{folder}: has {os.path.basename(found[0])} but not {missing[0]} "
                             f"of modality {spec.modalities[m]} (files {' + '.join(names)})")
    return found or None
  path = data_io.find_file(folder, spec.file_stems[m]) if spec.file_stems else None
  return [str(path)] if path is not None else None


def open_scene_input(spec: datasets.DatasetSpec, transform: InputTransform, source: str,
                     missing: Sequence[str] = (), log=print) -> SceneInput:
  """The readers of a new scene for a model trained on `spec`.

  source: a dataset YAML (its modalities matched to the model's by name; labels and classes
  ignored) or a folder laid out like the training data. A modality in `missing`, or whose files
  are absent, is missing (the model's prompt / zeros); every present one must have the bands the
  model was trained on, and all of them the same H x W and georeference.
  """
  skip = {_modality_index(spec, name, "--missing") for name in missing}
  files: list = [None] * spec.num_modalities
  keys: list = list(spec.modality_keys or [None] * spec.num_modalities)
  nodata: list = list(spec.modality_nodata or [None] * spec.num_modalities)
  if os.path.isdir(source):
    for m in range(spec.num_modalities):
      files[m] = _files_in_folder(spec, m, source)
  elif dataset_file.is_dataset_file(source):
    given = dataset_file.load_dataset_file(source, scene_only=True)
    keys, nodata = [None] * spec.num_modalities, [None] * spec.num_modalities
    for j, name in enumerate(given.modalities):
      m = _modality_index(spec, name, f"{source}: modality")
      present = all(os.path.exists(f) for f in given.modality_files[j])
      files[m] = list(given.modality_files[j]) if present else None
      keys[m], nodata[m] = given.modality_keys[j], given.modality_nodata[j]
  elif os.path.exists(source):
    raise errors.UserError(f"--input {source}: expected a dataset .yaml file or a folder of the "
                           "scene's files")
  else:
    raise errors.UserError(f"--input {source}: not found")
  readers = []
  for m, name in enumerate(spec.modalities):
    if m in skip or files[m] is None:
      if m not in skip:
        log(f"{name}: no file in {source}; classified without it")
      readers.append(None)
      continue
    reader = data_io.ModalityReader(name, files[m], keys[m], nodata[m])
    want = transform.parts[m].bands
    if reader.shape[-1] != want:
      raise errors.UserError(f"{' + '.join(reader.files)}: {name} has {reader.shape[-1]} bands; "
                             f"the model was trained on {want}")
    readers.append(reader)
  present = [r for r in readers if r is not None]
  if not present:
    raise errors.UserError(f"--input {source}: no modality left to classify with (the model has "
                           f"{', '.join(spec.modalities)})")
  first = present[0]
  ref = next((r for r in present if r.georef is not None), None)
  for r in present[1:]:
    if r.shape[:2] != first.shape[:2]:
      raise errors.UserError(f"{r.files[0]}: {r.name} is {r.shape[0]}x{r.shape[1]} but "
                             f"{first.files[0]} ({first.name}) is {first.shape[0]}x"
                             f"{first.shape[1]}; expected the same H x W")
    if ref is not None:
      rasters.check_same_georef(ref.georef, ref.georef_file, r.georef, r.georef_file)
  return SceneInput(readers, first.shape[0], first.shape[1], ref.georef if ref else None)


def _colormap(palette) -> dict:
  cmap = {0: (0, 0, 0, 0)}
  cmap.update({i + 1: (*map(int, c), 255) for i, c in enumerate(palette)})
  return cmap


def _identity(path: str) -> tuple | None:
  """(inode, mtime) of a file, None when absent: whether a write replaced it."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_ino, st.st_mtime_ns


def predict_to_files(model_dir: str, source: str, paths: dict, *, missing: Sequence[str] = (),
                     batch: int = 512, tile_rows: int = DEFAULT_TILE_ROWS,
                     probabilities: bool = False, quiet: bool = False, log=print) -> None:
  """Classifies every pixel of the scene at `source` (a dataset YAML or a folder) with the model
  saved in `model_dir` and writes paths["map"] (uint8 GeoTIFF, 0 = no data, the input's CRS and
  transform), paths["png"] (with a legend) and, with `probabilities`, paths["probabilities"]
  (one float32 band per class). The outputs appear together, complete, or not at all."""
  inputs = checkpoint.load_inputs(model_dir, hint=EXPORT_HINT)
  spec = datasets.spec_from_json(inputs["dataset"])
  transform = InputTransform.from_json(inputs["transform"])
  z_host = np.asarray(inputs["text"]["features"], np.float32)
  scene = open_scene_input(spec, transform, source, missing, log)
  patch_size = int(inputs["settings"]["patch_size"])  # the run's (a method may set its own)
  check_patch_size(patch_size, (scene.height, scene.width), f"--input {source}")
  model, _, how = methods.load_for_prediction(model_dir, hint=EXPORT_HINT)
  absent = [spec.modalities[m] for m, r in enumerate(scene.readers) if r is None]
  if absent:
    log(f"without {', '.join(absent)}: replaced by {how}")
  predictor = Predictor(model, width=scene.width, patch_size=patch_size, batch=batch,
                        scores=probabilities)
  z = jnp.asarray(z_host)
  t0 = time.time()
  class_map = np.zeros((scene.height, scene.width), np.uint8)
  palette = list(spec.palette) if spec.palette else figures.default_palette(spec.num_classes)
  names = [f"{c}" for c in spec.class_names]
  title = (f"{spec.name} model on {os.path.basename(os.path.normpath(source))}"
           + (f", without {', '.join(absent)}" if absent else ""))
  outputs = [*paths.values(), f"{paths['map']}.aux.xml"]
  before = {p: _identity(p) for p in outputs}
  try:
    with contextlib.ExitStack() as stack:  # an error: no GeoTIFF appears (writers' __exit__)
      writers = [stack.enter_context(rasters.GeoTiffWriter(
          paths["map"], height=scene.height, width=scene.width, count=1, dtype="uint8",
          georef=scene.georef, nodata=0, colormap=_colormap(palette),
          band_descriptions=["class"], category_names=["no data", *names]))]
      if probabilities:
        writers.append(stack.enter_context(rasters.GeoTiffWriter(
            paths["probabilities"], height=scene.height, width=scene.width,
            count=spec.num_classes, dtype="float32", georef=scene.georef, nodata=float("nan"),
            band_descriptions=names)))
      for start, ids, probs in classify_scene(predictor, scene, transform, z,
                                              tile_rows=tile_rows, progress=not quiet):
        class_map[start:start + ids.shape[0]] = ids
        writers[0].write_rows(start, ids)
        if probs is not None:
          writers[1].write_rows(start, np.moveaxis(probs, -1, 0))
      figures.save_png(paths["png"], class_map, names, palette, title)
  except BaseException:  # all outputs or none: those this call put in place are taken back
    for p in outputs:
      if _identity(p) != before[p]:
        with contextlib.suppress(OSError):
          os.unlink(p)
    raise
  valid = int((class_map > 0).sum())
  log(f"classified {valid:,} pixels of {scene.height}x{scene.width} "
      f"({scene.height * scene.width - valid:,} without data) in {time.time() - t0:.1f} s; "
      f"wrote {', '.join(paths.values())}")
