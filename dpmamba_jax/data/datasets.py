"""Dataset registry: one frozen `DatasetSpec` per supported dataset.

Training settings follow reference-spec §1.7 (the authors' YAML configs). Datasets the authors did
not configure (augsburg3, muufl, synthetic) take documented choices, see the comments on each spec.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from dpmamba_jax import errors
from dpmamba_jax.data.synthetic import SyntheticConfig

RGB = tuple[int, int, int]

# Accepted file stems per modality: the authors' code name, then their README name, then others.
# Extensions .mat (MATLAB v5 or v7.3), .npy and .npz are all accepted for every stem.
_STEMS = {
    "HSI": ("HSI_data", "HSI"),
    "LiDAR": ("LiDAR_data", "LiDAR", "DSM"),
    "SAR": ("SAR_data", "SAR"),
}
_LABEL_STEMS = ("All_Label", "All_label", "gt", "labels")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A dataset: modalities in model order, band counts, classes and the training recipe."""
  name: str                          # "trento"
  modalities: tuple[str, ...]        # ("HSI", "LiDAR"); modalities[0] is HSI
  bands: tuple[int, ...]             # band counts in the files, per modality
  pca: tuple[Optional[int], ...]     # whitened-PCA components per modality (None = keep bands)
  class_names: tuple[str, ...]
  patch_size: int
  batch_size: int
  train_per_class: int = 40
  pca_keeps_bands: bool = False      # a modality with PCA: its bands, then the components
  epochs: int = 500                  # both stages
  warmup_epochs: int = 30
  lr: float = 3e-4
  weight_decay: float = 0.05
  grad_clip: float = 1.0
  betas_pretrain: tuple[float, float] = (0.9, 0.999)
  betas_distill: tuple[float, float] = (0.9, 0.999)
  eps: float = 1e-8
  seed: int = 0
  text_key: str = ""                 # key into class_texts.json
  # Files: per modality the accepted stems (first is preferred), and the label map's stems.
  file_stems: tuple[tuple[str, ...], ...] = ()
  label_stems: tuple[str, ...] = _LABEL_STEMS
  folder_names: tuple[str, ...] = ()  # data-dir names tried under DPMAMBA_DATA_DIR and ./data
  source: str = ""                   # where the public data can be obtained (for error messages)
  scene_shape: Optional[tuple[int, int]] = None  # public H x W (informational)
  palette: tuple[RGB, ...] = ()      # one RGB colour per class, for maps
  synthetic: Optional[SyntheticConfig] = None  # set only for the built-in procedural scene
  # Datasets defined in a file (dataset_file.py) name their files instead of stems:
  modality_files: tuple[tuple[str, ...], ...] = ()  # per modality, absolute paths (stacked)
  modality_keys: tuple[Optional[str], ...] = ()     # per modality, the array key (.mat / .npz)
  modality_nodata: tuple[Optional[float], ...] = ()  # per modality, overrides the files' nodata
  label_file: Optional[str] = None
  label_key: Optional[str] = None
  class_texts: tuple[str, ...] = ()  # the class descriptions (else class_texts.json[text_key])
  definition: Optional[str] = None   # the dataset file this spec was read from

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_modalities(self) -> int:
    return len(self.modalities)

  @property
  def model_bands(self) -> tuple[int, ...]:
    """Channels per modality that the model sees (after PCA where set)."""
    return tuple(b if p is None else p + (b if self.pca_keeps_bands else 0)
                 for b, p in zip(self.bands, self.pca))

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.train_per_class // max(1, self.batch_size // self.num_classes))

  def expected_files(self) -> list[str]:
    """Human-readable list of the files looked for, e.g. ['HSI_data.mat (or HSI.mat)', ...]."""
    if self.modality_files:
      return [" + ".join(files) for files in self.modality_files] + (
          [self.label_file] if self.label_file else [])
    out = []
    for stems in tuple(self.file_stems) + (self.label_stems[:2],):
      names = [f"{s}.mat" for s in stems[:2]]
      out.append(names[0] + (f" (or {names[1]})" if len(names) > 1 else ""))
    return out


# What a model checkpoint records of its dataset (`spec_to_json`): enough for `predict` to find
# a new scene's files (stems or file names) and to draw its maps.
_SAVED_FIELDS = ("name", "modalities", "bands", "pca", "pca_keeps_bands", "class_names", "patch_size", "batch_size",
                 "train_per_class", "text_key", "file_stems", "label_stems", "folder_names",
                 "palette", "modality_files", "modality_keys", "modality_nodata", "label_file",
                 "label_key", "class_texts", "definition", "source")


def spec_to_json(spec: DatasetSpec) -> dict:
  """The fields of `spec` that a saved model keeps (JSON-able; tuples become lists)."""
  def plain(v):
    return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
  return {k: plain(getattr(spec, k)) for k in _SAVED_FIELDS}


def spec_from_json(d: dict) -> DatasetSpec:
  """Inverse of `spec_to_json` (the training recipe beyond it takes the defaults)."""
  def tup(v):
    return tuple(tup(x) for x in v) if isinstance(v, list) else v
  return DatasetSpec(**{k: tup(d[k]) for k in _SAVED_FIELDS if k in d})


def _check(spec: DatasetSpec) -> DatasetSpec:
  m = spec.num_modalities
  assert len(spec.bands) == m and len(spec.pca) == m, spec.name
  assert len(spec.file_stems) == m, spec.name
  assert len(spec.palette) == spec.num_classes, spec.name
  assert spec.batch_size % spec.num_classes == 0, spec.name
  return spec


def _stems(*modalities: str) -> tuple[tuple[str, ...], ...]:
  return tuple(_STEMS[m] for m in modalities)


# Palettes: fixed, distinct colours (common choices in the literature where one exists).
_TRENTO_PALETTE = ((0, 160, 0), (230, 70, 50), (170, 120, 60), (0, 90, 0), (150, 220, 60),
                   (120, 120, 120))
_HOUSTON_PALETTE = ((0, 205, 0), (127, 255, 0), (46, 139, 87), (0, 139, 0), (160, 82, 45),
                    (0, 255, 255), (255, 255, 255), (216, 191, 216), (255, 0, 0), (139, 0, 0),
                    (100, 100, 100), (255, 255, 0), (238, 154, 0), (85, 26, 139), (255, 127, 80))
_AUGSBURG_PALETTE = ((0, 100, 0), (230, 60, 60), (150, 150, 150), (150, 220, 80), (240, 200, 60),
                     (200, 0, 200), (30, 90, 230))
_MUUFL_PALETTE = ((0, 128, 0), (0, 255, 0), (0, 255, 255), (255, 204, 0), (255, 0, 204),
                  (0, 0, 255), (102, 0, 204), (255, 127, 80), (153, 51, 0), (255, 255, 0),
                  (255, 0, 0))
_SYNTHETIC_PALETTE = ((120, 200, 80), (0, 110, 0), (220, 60, 60), (130, 130, 130),
                      (190, 140, 80), (40, 90, 220))

_AUGSBURG_CLASSES = ("Forest", "Residential area", "Industrial area", "Low plants", "Allotment",
                     "Commercial area", "Water")
_AUGSBURG_SOURCE = ("Augsburg HSI/SAR/DSM (Hong et al. 2021, 'Multimodal remote sensing "
                    "benchmark datasets'): https://mediatum.ub.tum.de/1657312 ; the DPMamba "
                    "authors' .mat files are linked from https://github.com/Jiahuiqu/DPMamba")

DATASETS: dict[str, DatasetSpec] = {s.name: _check(s) for s in (
    DatasetSpec(
        name="trento", modalities=("HSI", "LiDAR"), bands=(63, 1), pca=(None, None),
        class_names=("Apple trees", "Buildings", "Ground", "Woods", "Vineyard", "Roads"),
        patch_size=15, batch_size=120, grad_clip=1.0, text_key="Trento",
        file_stems=_stems("HSI", "LiDAR"), folder_names=("trento", "Trento"),
        source=("Trento HSI+LiDAR (Rasti et al. 2017; distributed by the University of Trento on "
                "request); the DPMamba authors' .mat files are linked from "
                "https://github.com/Jiahuiqu/DPMamba"),
        scene_shape=(166, 600), palette=_TRENTO_PALETTE),
    DatasetSpec(
        name="houston", modalities=("HSI", "LiDAR"), bands=(144, 1), pca=(48, None),
        class_names=("Healthy grass", "Stressed grass", "Synthetic grass", "Trees", "Soil",
                     "Water", "Residential", "Commercial", "Road", "Highway", "Railway",
                     "Parking lot 1", "Parking lot 2", "Tennis court", "Running track"),
        patch_size=11, batch_size=150, grad_clip=2.0, betas_distill=(0.85, 0.999),
        text_key="Houston", file_stems=_stems("HSI", "LiDAR"),
        folder_names=("houston", "Houston"),
        source=("Houston 2013 (IEEE GRSS Data Fusion Contest 2013): "
                "https://hyperspectral.ee.uh.edu/?page_id=459 ; the DPMamba authors' .mat files "
                "(train and test maps merged) are linked from https://github.com/Jiahuiqu/DPMamba"),
        scene_shape=(349, 1905), palette=_HOUSTON_PALETTE),
    DatasetSpec(
        name="augsburg", modalities=("HSI", "SAR"), bands=(180, 4), pca=(48, None),
        class_names=_AUGSBURG_CLASSES, patch_size=9, batch_size=140, grad_clip=2.0,
        text_key="Augsburg", file_stems=_stems("HSI", "SAR"),
        folder_names=("augsburg", "Augsburg"), source=_AUGSBURG_SOURCE,
        scene_shape=(332, 485), palette=_AUGSBURG_PALETTE),
    # Not in the authors' code (spec §3.4): order HSI, SAR, LiDAR (Table 2), Augsburg settings.
    DatasetSpec(
        name="augsburg3", modalities=("HSI", "SAR", "LiDAR"), bands=(180, 4, 1),
        pca=(48, None, None), class_names=_AUGSBURG_CLASSES, patch_size=9, batch_size=140,
        grad_clip=2.0, text_key="Augsburg", file_stems=_stems("HSI", "SAR", "LiDAR"),
        folder_names=("augsburg3", "augsburg", "Augsburg"), source=_AUGSBURG_SOURCE,
        scene_shape=(332, 485), palette=_AUGSBURG_PALETTE),
    # Not configured by the authors: P = 11 and B = 110 (k = 10 per class, 4 steps/epoch) are our
    # choice, by analogy with Houston; the rest are the shared defaults.
    DatasetSpec(
        name="muufl", modalities=("HSI", "LiDAR"), bands=(64, 2), pca=(None, None),
        class_names=("Trees", "Mostly grass", "Mixed ground surface", "Dirt and sand", "Road",
                     "Water", "Building shadow", "Buildings", "Sidewalk", "Yellow curb",
                     "Cloth panels"),
        patch_size=11, batch_size=110, grad_clip=2.0, text_key="MUUFL",
        file_stems=_stems("HSI", "LiDAR"), folder_names=("muufl", "MUUFL"),
        source=("MUUFL Gulfport: https://github.com/GatorSense/MUUFLGulfport (export the HSI "
                "cube, the 2-band LiDAR and the label map to .mat/.npy files named as listed)"),
        scene_shape=(325, 220), palette=_MUUFL_PALETTE),
    # Built-in procedural scene (synthetic.py): the default dataset of the main job, sized so that a
    # full two-stage run takes minutes on 2 CPU cores.
    DatasetSpec(
        name="synthetic", modalities=("HSI", "LiDAR"), bands=(24, 1), pca=(None, None),
        class_names=("Grass", "Trees", "Buildings", "Roads", "Bare soil", "Water"),
        patch_size=9, batch_size=72, train_per_class=36, epochs=60, warmup_epochs=5,
        grad_clip=1.0, text_key="Synthetic", file_stems=_stems("HSI", "LiDAR"),
        folder_names=("synthetic",),
        source="built in (dpmamba_jax.data.synthetic), no files needed",
        scene_shape=(96, 96), palette=_SYNTHETIC_PALETTE,
        synthetic=SyntheticConfig(height=96, width=96, num_classes=6, bands=(24, 1), seed=0)),
)}


def get_spec(name: str) -> DatasetSpec:
  """Returns the registered spec `name` (case-insensitive); UserError for unknown names."""
  spec = DATASETS.get(str(name).lower())
  if spec is None:
    raise errors.UserError(
        f"unknown dataset {name!r}; expected one of {', '.join(sorted(DATASETS))}")
  return spec
