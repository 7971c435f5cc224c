"""The data of one run: scene, split, the model inputs on the device and the text features.

`load_run_data(cfg, spec, workdir)` is what training, evaluation and the maps start from; the
split is drawn once and kept in <workdir>/split.npz, so a resume or a re-evaluation scores the
same pixels.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpmamba_jax import data as data_lib
from dpmamba_jax import errors
from dpmamba_jax import sharding
from dpmamba_jax import text
from dpmamba_jax.data import datasets
from dpmamba_jax.data import subsets



@dataclasses.dataclass
class RunData:
  """What the steps, the evaluation and the maps need, with the scene cubes on the device."""
  cfg: Any                    # RunConfig
  spec: Any                   # DatasetSpec
  labels: np.ndarray          # (H, W) int32, 0 = unlabelled
  split: Any                  # data_lib.Split
  cubes: list                 # per modality (H + 2r, W + 2r, C_m) jax arrays (padded)
  z: Any                      # (C, D) jax array, text features
  text_encoder: str
  text_sha256: str | None
  train_labels: np.ndarray    # (N_train,) int32 0-based, aligned with split.train_idx
  transform: Any = None       # data_lib.InputTransform fitted on this scene (saved with models)
  georef: Any = None          # rasters.GeoRef of the scene's files, or None
  invalid: Any = None         # (H, W) bool: pixels without data in some modality, or None
  # data-parallel meshes for inference batches, by batch size (`inference_mesh`)
  _meshes: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def height(self) -> int:
    return int(self.labels.shape[0])

  @property
  def width(self) -> int:
    return int(self.labels.shape[1])

  @property
  def patch_size(self) -> int:
    return int(self.cfg.patch_size)

  def inference_mesh(self, batch: int) -> jax.sharding.Mesh | None:
    """The data mesh for inference batches of `batch` (None = one device), decided and logged
    once per run and batch size (`cfg.data_parallel` switches it off)."""
    if jax.device_count() == 1:
      return None
    if batch not in self._meshes:
      log = print if jax.process_index() == 0 else None  # one line per run, not per host
      self._meshes[batch] = sharding.data_parallel_mesh(
          batch, enabled=bool(self.cfg.data_parallel), what="inference batch", log=log)
    return self._meshes[batch]


# Model inputs beyond this magnitude after the input transform can overflow a training step
# (z-scored sensor data stay within tens; raw values under normalize=none within ~1e5).
SUSPECT_INPUT_MAGNITUDE = 1e6


def input_problem(rd: RunData) -> str | None:
  """Why the run's model inputs could make a loss non-finite, naming the modality, its files and
  the likely fix, or None when they look sane (finite, within SUSPECT_INPUT_MAGNITUDE)."""
  synthetic = rd.spec.synthetic is not None and rd.cfg.data_dir is None
  files = [] if synthetic else rd.spec.expected_files()
  for m, (name, cube) in enumerate(zip(rd.spec.modalities, rd.cubes)):
    finite = bool(jax.device_get(jnp.isfinite(cube).all()))
    top = float(jax.device_get(jnp.abs(jnp.where(jnp.isfinite(cube), cube, 0.0)).max()))
    where = f"{name} ({files[m]})" if m < len(files) else name
    if not finite:
      return (f"the {where} inputs hold NaN/Inf after the input transform "
              f"(normalize={rd.cfg.normalize}): check the file")
    if top > SUSPECT_INPUT_MAGNITUDE:
      fix = ("use --normalize standard, or check the file's data type and scale"
             if rd.cfg.normalize == "none" else
             "check the file for outliers, its data type and byte order, or nodata pixels to "
             "declare")
      return (f"the {where} inputs reach {top:.3g} after the input transform "
              f"(normalize={rd.cfg.normalize}): {fix}")
  return None


def _load_scene(cfg, spec):
  if cfg.modalities:  # a subset of the modalities (data/subsets.py): load them all, keep those
    subset, spec = spec, subsets.full_spec(spec)
    return subsets.restrict_scene(_load_scene(dataclasses.replace(cfg, modalities=None), spec),
                                  subset)
  if spec.synthetic is not None and cfg.data_dir is None and (cfg.synthetic_height or
                                                              cfg.synthetic_width):
    syn = dataclasses.replace(spec.synthetic, height=cfg.synthetic_height or spec.synthetic.height,
                              width=cfg.synthetic_width or spec.synthetic.width)
    spec = dataclasses.replace(spec, synthetic=syn)
  return data_lib.load_scene(spec, cfg.data_dir)


def _split(cfg, spec, labels, workdir: str, log, label_source: str):
  """The run's split and whether it is new: <workdir>/split.npz if present (resume, evaluate),
  else drawn / read from cfg.split_file (saved by the caller once the run may write)."""
  path = os.path.join(workdir, "split.npz")
  if os.path.isfile(path):
    try:
      return data_lib.load_split(path, labels, allow_overlap=cfg.include_train_in_test), False
    except errors.UserError as e:  # a damaged / foreign file: say how to get one back
      raise errors.UserError(f"{e}; {_split_recovery(cfg, workdir)}") from None
  if cfg.split_file:
    keys = ()
    try:
      with np.load(cfg.split_file, allow_pickle=False) as f:
        keys = tuple(f.files)
    except Exception:  # noqa: BLE001 - .mat maps are read by split_from_maps
      pass
    if "train_idx" in keys:
      split = data_lib.load_split(cfg.split_file, labels, allow_overlap=cfg.include_train_in_test)
    else:
      split = data_lib.split_from_maps(cfg.split_file, labels=labels,
                                       include_train_in_test=cfg.include_train_in_test)
    log(f"split: from {cfg.split_file}")
  else:
    split = data_lib.make_split(labels, cfg.train_per_class, cfg.seed,
                                include_train_in_test=cfg.include_train_in_test,
                                num_classes=spec.num_classes, class_names=spec.class_names,
                                label_source=label_source)
  return split, True


def _split_recovery(cfg, workdir: str) -> str:
  """How to get a usable <workdir>/split.npz back."""
  trained = [d + "/" for d in ("teacher", "student", "ckpt")
             if os.path.exists(os.path.join(workdir, d))]
  if not trained:
    return "delete it to draw the split again"
  source = cfg.split_file if cfg.split_file else f"seed {cfg.seed}"
  return (f"the models in {' '.join(trained)} were trained on it: restore the file, or delete it "
          f"to draw the same split again from {source} (same data and settings), or use a new "
          "--workdir")


def load_run_data(cfg, spec, workdir: str, log: Callable[[str], None] = print, *,
                  before_write: Callable[[], None] | None = None) -> RunData:
  """Loads the scene, the split, the preprocessed padded cubes (on device) and the text features.

  The scene, the patch size and a new split are checked before anything is written:
  `before_write()` (the run's own first write, e.g. config.json) is called after those checks,
  then a newly drawn split is saved as <workdir>/split.npz.
  """
  scene = _load_scene(cfg, spec)
  labels = np.asarray(scene.labels, np.int32)
  data_lib.check_patch_size(cfg.patch_size, labels.shape,
                            f"config patch_size={cfg.patch_size} ({cfg.method})")
  split, new = _split(cfg, spec, labels, workdir, log, scene.label_source)
  if before_write is not None:
    before_write()
  if new:
    data_lib.save_split(os.path.join(workdir, "split.npz"), split)
  transform = data_lib.fit_transform(scene, split, normalize=cfg.normalize, pca_fit=cfg.pca_fit)
  cubes = transform.apply(scene.cubes, scene.nodata_masks())
  padded = data_lib.pad_cubes(cubes, cfg.patch_size)
  dev_cubes = [jax.device_put(jnp.asarray(c, jnp.float32)) for c in padded]
  feats = text.encode_texts(text.class_texts(spec), cfg.text_encoder,
                            clip_weights=cfg.clip_weights)
  z = jax.device_put(jnp.asarray(feats.features, jnp.float32))
  train_labels = data_lib.labels_at(labels, split.train_idx)
  h, w = labels.shape
  mods = ", ".join(f"{m}:{c.shape[-1]}" for m, c in zip(spec.modalities, cubes))
  log(f"data: {spec.name} {h}x{w}, modalities {mods}, "
      f"{split.train_idx.size} train / {split.test_idx.size} test pixels, text {feats.encoder} "
      f"(D={z.shape[1]})")
  invalid = scene.invalid()
  if invalid is not None:
    log(f"data: {int(invalid.sum())} pixels without data in some modality (nodata): never "
        "trained on, scored or fitted")
  return RunData(cfg=cfg, spec=spec, labels=labels, split=split, cubes=dev_cubes, z=z,
                 text_encoder=feats.encoder, text_sha256=feats.weights_sha256,
                 train_labels=train_labels, transform=transform, georef=scene.georef,
                 invalid=invalid)


INPUTS_VERSION = 1


def saved_inputs(rd: RunData) -> dict:
  """What a saved model needs to classify a new scene like this one (checkpoint `inputs/`):
  the dataset definition, the fitted input transform and the class-text features."""
  return {"version": INPUTS_VERSION,
          "dataset": datasets.spec_to_json(rd.spec),
          "transform": rd.transform.to_json(),
          "settings": {"normalize": rd.cfg.normalize, "pca_fit": rd.cfg.pca_fit,
                       "patch_size": int(rd.cfg.patch_size)},
          "text": {"encoder": rd.text_encoder, "sha256": rd.text_sha256,
                   "features": np.asarray(jax.device_get(rd.z), np.float64).tolist()}}
