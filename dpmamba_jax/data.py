"""Data layer: readers, validation, preprocessing, splits, patch gather, class-balanced sampler.

Inspect a dataset with
  python -m dpmamba_jax.data --dataset trento --data-dir DIR [--json]

Conventions (ARCHITECTURE.md): cubes are (H, W, C) channels-last float32, label maps (H, W) int32
with 0 = unlabelled and 1..C, pixel indices are flat raster indices r * W + c.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import sys
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpmamba_jax import datasets
from dpmamba_jax import errors
from dpmamba_jax import fileio
from dpmamba_jax import synthetic

UserError = errors.UserError

DATA_DIR_ENV = "DPMAMBA_DATA_DIR"
EXTENSIONS = (".mat", ".npy", ".npz")
LABEL_KEY = "labels"  # name of the label map in `keys` / `files` overrides
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Readers


def _is_hdf5(path: pathlib.Path) -> bool:
  """MATLAB v7.3 files are HDF5: signature at byte 0 or after the 512-byte MATLAB header."""
  with open(path, "rb") as f:
    head = f.read(520)
  return head[:8] == _HDF5_SIGNATURE or head[512:520] == _HDF5_SIGNATURE


def _pick_key(path, available: Sequence[str], key: Optional[str]) -> str:
  """Key to read: the override, else the one named like the file, else the only array."""
  if key is not None:
    if key not in available:
      raise UserError(f"{path}: no key {key!r}; keys present: {', '.join(available) or 'none'}")
    return key
  stem = pathlib.Path(path).stem.lower()
  named = [k for k in available if k.lower() == stem]
  if named:
    return named[0]
  if len(available) == 1:
    return available[0]
  if not available:
    raise UserError(f"{path}: holds no numeric array")
  raise UserError(f"{path}: holds several arrays ({', '.join(available)}) and none is named "
                  f"{pathlib.Path(path).stem!r}; choose one with a key override (--key NAME=KEY)")


def _numeric(a) -> bool:
  return isinstance(a, np.ndarray) and a.dtype.kind in "biuf" and a.size > 0


def read_array(path, key: Optional[str] = None) -> tuple[np.ndarray, str]:
  """Reads one array from a .mat (MATLAB v5 or v7.3), .npy or .npz file.

  Args:
    path: the file.
    key: the variable / array name; None = the one named like the file, or the only array.

  Returns:
    (array, key used). MATLAB v7.3 arrays (stored transposed by HDF5) are transposed back, so a
    MATLAB H x W x C variable comes back as (H, W, C).
  """
  arr, k, _ = _read(path, key)
  return arr, k


def _read(path, key: Optional[str]) -> tuple[np.ndarray, str, bool]:
  """read_array, plus whether the array came from HDF5 (so its axis order is a guess)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"{path}: file not found")
  ext = path.suffix.lower()
  try:
    if ext == ".npy":
      arr = np.load(path, allow_pickle=False)
      return np.asarray(arr), key or path.stem, False
    if ext == ".npz":
      with np.load(path, allow_pickle=False) as z:
        avail = [k for k in z.files if _numeric(z[k])]
        k = _pick_key(path, avail if key is None else list(z.files), key)
        return np.asarray(z[k]), k, False
    if ext != ".mat":
      raise UserError(f"{path}: unsupported file type {ext!r}; expected .mat, .npy or .npz")
    if _is_hdf5(path):
      import h5py  # pylint: disable=g-import-not-at-top
      with h5py.File(path, "r") as f:
        names = [k for k in f.keys() if not k.startswith("#")]
        def numeric(k):  # MATLAB stores char arrays as uint16 with MATLAB_class 'char'
          obj = f[k]
          cls = obj.attrs.get("MATLAB_class", b"") if isinstance(obj, h5py.Dataset) else b"-"
          cls = cls.decode() if isinstance(cls, bytes) else str(cls)
          return isinstance(obj, h5py.Dataset) and obj.dtype.kind in "biuf" and cls != "char"
        avail = [k for k in names if numeric(k)]
        k = _pick_key(path, avail if key is None else names, key)
        if not numeric(k):
          raise UserError(f"{path}: key {k!r} is not a numeric array (MATLAB v7.3)")
        # HDF5 stores MATLAB's column-major arrays with the axes reversed.
        return np.ascontiguousarray(np.asarray(f[k][()]).T), k, True
    import scipy.io  # pylint: disable=g-import-not-at-top
    d = scipy.io.loadmat(path)
    names = [k for k in d if not k.startswith("__")]
    avail = [k for k in names if _numeric(d[k])]
    k = _pick_key(path, avail if key is None else names, key)
    if not _numeric(d[k]):
      raise UserError(f"{path}: key {k!r} is not a numeric array (type {type(d[k]).__name__})")
    return np.asarray(d[k]), k, False
  except UserError:
    raise
  except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
    msg = " ".join(str(e).split())
    raise UserError(f"{path}: cannot be read as {ext} ({type(e).__name__}: {msg})") from e


def _find_file(folder: pathlib.Path, stems: Sequence[str]) -> Optional[pathlib.Path]:
  """First existing <stem><ext> in folder (stems in order, then extensions; case-insensitive)."""
  listing = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
  for stem in stems:
    for ext in EXTENSIONS:
      p = listing.get((stem + ext).lower())
      if p is not None:
        return p
  return None


def resolve_data_dir(spec: datasets.DatasetSpec, data_dir=None) -> pathlib.Path:
  """The dataset folder: `data_dir`, else $DPMAMBA_DATA_DIR/<name>, else ./data/<name>.

  <name> is tried as each of `spec.folder_names` (e.g. 'trento', then 'Trento').
  UserError when the folder does not exist, listing the expected files and the public source.
  """
  if data_dir is not None:
    candidates = [pathlib.Path(data_dir)]
  else:
    root = pathlib.Path(os.environ.get(DATA_DIR_ENV, "data"))
    candidates = [root / n for n in (spec.folder_names or (spec.name,))]
  for c in candidates:
    if c.is_dir():
      return c
  if candidates[0].exists():
    raise UserError(f"{candidates[0]}: is a file; expected the dataset folder holding "
                    f"{', '.join(spec.expected_files())}")
  where = candidates[0] if data_dir is not None else (
      f"{candidates[0]} (default: ${DATA_DIR_ENV}/<dataset>, else ./data/<dataset>; "
      f"or pass --data-dir DIR)")
  raise UserError(f"dataset folder {where} does not exist; expected there: "
                  f"{', '.join(spec.expected_files())} (.mat v5/v7.3, .npy or .npz); "
                  f"get the {spec.name} data from: {spec.source}")


# --------------------------------------------------------------------------------------------------
# Scene loading and validation


@dataclasses.dataclass
class Scene:
  """A loaded, validated scene."""
  spec: datasets.DatasetSpec
  cubes: list[np.ndarray]            # per modality (H, W, C_m) float32
  labels: np.ndarray                 # (H, W) int32, 0 = unlabelled, 1..C
  source: str                        # data dir or "synthetic"
  files: tuple[str, ...] = ()        # "path:key" per modality, then the label map

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.labels.shape)

  def class_counts(self) -> np.ndarray:
    """(C,) labelled pixels per class."""
    return np.bincount(self.labels.ravel(), minlength=self.spec.num_classes + 1)[1:]


def _check_finite(arr: np.ndarray, where: str) -> None:
  if arr.dtype.kind == "f":
    bad = ~np.isfinite(arr)
    if bad.any():
      first = tuple(int(i) for i in np.argwhere(bad)[0])
      raise UserError(f"{where}: {int(bad.sum())} NaN/Inf values (first at index {first}); "
                      f"expected finite values")


def validate_scene(spec: datasets.DatasetSpec, cubes: Sequence[np.ndarray], labels: np.ndarray,
                   names: Optional[Sequence[str]] = None) -> tuple[list[np.ndarray], np.ndarray]:
  """Checks and normalises raw arrays; returns (float32 (H, W, C) cubes, int32 (H, W) labels).

  `names` are the "file:key" descriptions used in messages (modalities, then the label map).
  Raises UserError for: wrong number of modalities, not 2-/3-D, band count unlike the spec, H x W
  unlike modality 0, NaN/Inf, label map of another shape, non-integer labels, labels outside 0..C.
  """
  m = spec.num_modalities
  names = list(names) if names is not None else [*spec.modalities, LABEL_KEY]
  if len(cubes) != m:
    raise UserError(f"dataset {spec.name}: got {len(cubes)} modalities, expected {m} "
                    f"({', '.join(spec.modalities)})")
  out = []
  for i, (cube, mod, want) in enumerate(zip(cubes, spec.modalities, spec.bands)):
    cube = np.asarray(cube)
    if cube.ndim == 2:
      cube = cube[..., None]
    if cube.ndim != 3:
      raise UserError(f"{names[i]}: {mod} array has shape {cube.shape}; expected H x W x bands "
                      f"(or H x W for one band)")
    if cube.shape[-1] != want:
      raise UserError(f"{names[i]}: {mod} has {cube.shape[-1]} bands but dataset {spec.name} "
                      f"expects {want} (array shape {cube.shape})")
    if out and cube.shape[:2] != out[0].shape[:2]:
      h, w = out[0].shape[:2]
      raise UserError(f"{names[i]}: {mod} is {cube.shape[0]}x{cube.shape[1]} but "
                      f"{spec.modalities[0]} is {h}x{w}; all modalities must have the same H x W")
    _check_finite(cube, names[i])
    out.append(np.asarray(cube, np.float32))
  h, w = out[0].shape[:2]
  lab = np.asarray(labels)
  if lab.ndim == 3 and lab.shape[-1] == 1:
    lab = lab[..., 0]
  if lab.shape != (h, w):
    raise UserError(f"{names[-1]}: label map has shape {lab.shape}; expected {h}x{w} like the "
                    f"modalities")
  _check_finite(lab, names[-1])
  if lab.dtype.kind == "f" and not np.array_equal(lab, np.round(lab)):
    bad = lab[lab != np.round(lab)][0]
    raise UserError(f"{names[-1]}: label value {bad} is not an integer; "
                    f"expected 0..{spec.num_classes}")
  if lab.dtype.kind == "b":
    lab = lab.astype(np.int32)
  lo, hi = lab.min(), lab.max()
  if lo < 0 or hi > spec.num_classes:
    bad = lo if lo < 0 else hi
    raise UserError(f"{names[-1]}: label value {bad:g} outside 0..{spec.num_classes} "
                    f"(0 = unlabelled, 1..{spec.num_classes} = the classes of {spec.name})")
  return out, lab.astype(np.int32)


def _fix_hdf5_axis_order(spec, arrays: list, hdf5: list) -> None:
  """HDF5 arrays are read in MATLAB order (axes reversed). A file written from Python with h5py
  may hold C-order H x W x C instead; keep that orientation when only it fits the spec."""
  def ok_bands(a, i):
    return a.ndim == 2 and spec.bands[i] == 1 or a.ndim == 3 and a.shape[-1] == spec.bands[i]
  for i in range(spec.num_modalities):
    if hdf5[i] and not ok_bands(arrays[i], i) and ok_bands(arrays[i].T, i):
      arrays[i] = np.ascontiguousarray(arrays[i].T)
  hw = arrays[0].shape[:2]
  for i in range(1, len(arrays)):
    a = arrays[i]
    if hdf5[i] and a.shape[:2] != hw and a.T.shape[:2] == hw:
      arrays[i] = np.ascontiguousarray(a.T)


def load_scene(spec: datasets.DatasetSpec | str, data_dir=None, *,
               keys: Optional[Mapping[str, str]] = None,
               files: Optional[Mapping[str, str]] = None) -> Scene:
  """Loads and validates a scene.

  Args:
    spec: a DatasetSpec or its name.
    data_dir: the dataset folder; None = $DPMAMBA_DATA_DIR/<name>, else ./data/<name>. For the
      synthetic spec, None generates the scene (no files needed).
    keys: key overrides, by modality name (e.g. "HSI") or "labels".
    files: file overrides (paths), by modality name or "labels".

  Returns:
    Scene with float32 (H, W, C_m) cubes and an int32 (H, W) label map.
  """
  if isinstance(spec, str):
    spec = datasets.get_spec(spec)
  keys, files = dict(keys or {}), dict(files or {})
  known = set(spec.modalities) | {LABEL_KEY}
  for name in list(keys) + list(files):
    if name not in known:
      raise UserError(f"override for {name!r}: dataset {spec.name} has {', '.join(sorted(known))}")
  if spec.synthetic is not None and data_dir is None and not files:
    cubes, labels = synthetic.generate(spec.synthetic)
    cubes, labels = validate_scene(spec, cubes, labels)
    return Scene(spec, cubes, labels, "synthetic", ("synthetic",))
  folder = None
  if len(files) < spec.num_modalities + 1:
    folder = resolve_data_dir(spec, data_dir)
  arrays, names, hdf5_flags = [], [], []
  stems = list(spec.file_stems) + [spec.label_stems]
  for name, st in zip([*spec.modalities, LABEL_KEY], stems):
    path = files.get(name)
    if path is None:
      path = _find_file(folder, st)
      if path is None:
        what = "label map" if name == LABEL_KEY else f"{name} file"
        raise UserError(f"{folder}: no {what}; expected {' or '.join(s + '.mat' for s in st[:2])} "
                        f"(.mat v5/v7.3, .npy or .npz)")
    arr, key, hdf5 = _read(path, keys.get(name))
    arrays.append(arr)
    hdf5_flags.append(hdf5)
    names.append(f"{path}:{key}")
  _fix_hdf5_axis_order(spec, arrays, hdf5_flags)
  cubes, labels = validate_scene(spec, arrays[:-1], arrays[-1], names)
  return Scene(spec, cubes, labels, str(folder) if folder else "files", tuple(names))


# --------------------------------------------------------------------------------------------------
# Splits


@dataclasses.dataclass
class Split:
  """Training / test pixels of a scene."""
  train_idx: np.ndarray              # (N_train,) flat raster indices, sorted by (class, raster)
  test_idx: np.ndarray               # (N_test,) flat raster indices, raster order
  seed: int                          # -1 for a split read from label maps


def labels_at(labels: np.ndarray, flat_idx: np.ndarray) -> np.ndarray:
  """0-based int32 class of each flat index (labels (H, W) 1..C)."""
  return (np.asarray(labels).ravel()[np.asarray(flat_idx)] - 1).astype(np.int32)


def make_split(labels: np.ndarray, per_class: int, seed: int, *,
               include_train_in_test: bool = False, num_classes: Optional[int] = None,
               class_names: Optional[Sequence[str]] = None) -> Split:
  """Draws `per_class` training pixels per class with np.random.default_rng(seed).

  Args:
    labels: (H, W) label map, 0 = unlabelled, 1..C.
    per_class: training pixels per class.
    seed: the random seed (same seed, same split).
    include_train_in_test: test = every labelled pixel, as the authors do (default: only the
      labelled pixels not used for training).
    num_classes: C; default labels.max().
    class_names: for error messages.

  Returns:
    Split; train_idx sorted by (class, raster), test_idx in raster order.
  """
  flat = np.asarray(labels).ravel()
  c_total = int(flat.max()) if num_classes is None else int(num_classes)
  rng = np.random.default_rng(seed)
  train = []
  for c in range(1, c_total + 1):
    pos = np.flatnonzero(flat == c)
    if len(pos) < per_class:
      name = f" ({class_names[c - 1]})" if class_names else ""
      raise UserError(f"label map: class {c}{name} has {len(pos)} labelled pixels, fewer than the "
                      f"{per_class} training pixels per class (train_per_class)")
    train.append(np.sort(rng.choice(pos, per_class, replace=False)))
  train_idx = np.concatenate(train).astype(np.int64) if train else np.zeros(0, np.int64)
  labelled = np.flatnonzero(flat > 0)
  test_idx = labelled if include_train_in_test else np.setdiff1d(labelled, train_idx)
  return Split(train_idx, test_idx.astype(np.int64), int(seed))


def save_split(path, split: Split) -> None:
  """Writes the split to an .npz (keys train_idx, test_idx, seed), atomically."""
  buf = io.BytesIO()
  np.savez(buf, train_idx=split.train_idx, test_idx=split.test_idx, seed=np.int64(split.seed))
  fileio.write_bytes(path, buf.getvalue())


def load_split(path, labels: Optional[np.ndarray] = None) -> Split:
  """Reads a split written by save_split; checks it against `labels` when given."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"{path}: split file not found")
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in ("train_idx", "test_idx") if k not in z.files]
      if missing:
        raise UserError(f"{path}: no key {missing[0]!r}; expected train_idx, test_idx, seed")
      split = Split(z["train_idx"].astype(np.int64), z["test_idx"].astype(np.int64),
                    int(z["seed"]) if "seed" in z.files else -1)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a split .npz ({' '.join(str(e).split())})") from e
  if labels is not None:
    check_split(split, labels, str(path))
  return split


def check_split(split: Split, labels: np.ndarray, where: str = "split") -> None:
  """UserError unless every train/test index is a labelled pixel of `labels`."""
  flat = np.asarray(labels).ravel()
  for name, idx in (("train_idx", split.train_idx), ("test_idx", split.test_idx)):
    if idx.size and (idx.min() < 0 or idx.max() >= flat.size):
      raise UserError(f"{where}: {name} holds index {int(idx.max())} outside the scene of "
                      f"{flat.size} pixels")
    if idx.size and (flat[idx] == 0).any():
      raise UserError(f"{where}: {name} holds unlabelled pixel {int(idx[flat[idx] == 0][0])}")


def split_from_maps(path, *, labels: Optional[np.ndarray] = None,
                    include_train_in_test: bool = False,
                    keys: tuple[str, str] = ("train", "test")) -> Split:
  """A fixed split from train / test label maps (e.g. trento-semireal/official_split.npz).

  Args:
    path: .npz or .mat holding two (H, W) maps (0 = not in that set, 1..C = class).
    labels: the scene's label map; when given, the maps must have its shape and agree with it.
    include_train_in_test: add the training pixels to the test set.
    keys: names of the train and test maps.
  """
  maps = []
  for k in keys:
    arr, _ = read_array(path, k)
    maps.append(np.asarray(arr))
  tr, te = maps
  if tr.shape != te.shape or tr.ndim != 2:
    raise UserError(f"{path}: train map {tr.shape} and test map {te.shape} must be equal H x W")
  if labels is not None:
    if tr.shape != labels.shape:
      raise UserError(f"{path}: maps are {tr.shape[0]}x{tr.shape[1]} but the scene is "
                      f"{labels.shape[0]}x{labels.shape[1]}")
    for k, mp in zip(keys, maps):
      bad = (mp != 0) & (mp != labels)
      if bad.any():
        r, c = np.argwhere(bad)[0]
        raise UserError(f"{path}:{k}: class {mp[r, c]} at row {r}, col {c} disagrees with the "
                        f"label map ({labels[r, c]})")
  trf, tef = tr.ravel().astype(np.int64), te.ravel().astype(np.int64)
  train_idx = np.flatnonzero(trf > 0)
  train_idx = train_idx[np.argsort(trf[train_idx], kind="stable")]  # (class, raster)
  test_mask = (tef > 0) | ((trf > 0) if include_train_in_test else False)
  test_idx = np.flatnonzero(test_mask)
  if not include_train_in_test and np.intersect1d(train_idx, test_idx).size:
    raise UserError(f"{path}: train and test maps overlap; expected disjoint sets")
  return Split(train_idx, test_idx, -1)


# --------------------------------------------------------------------------------------------------
# Preprocessing


def whitened_pca(x: np.ndarray, n_components: int, fit_rows: Optional[np.ndarray] = None
                 ) -> np.ndarray:
  """Exact whitened PCA (as sklearn PCA(whiten=True)) of the rows of x.

  Args:
    x: (N, D) data.
    n_components: K <= D.
    fit_rows: rows used to fit the mean and covariance; None = all rows.

  Returns:
    (N, K) float32; on the fit rows every component has mean 0 and variance 1 (ddof=1). Component
    signs are fixed so that each loading vector's largest-magnitude entry is positive.
  """
  fit = x if fit_rows is None else x[fit_rows]
  n, d = fit.shape
  if n_components > d:
    raise UserError(f"PCA: {n_components} components requested from {d} bands")
  if n <= n_components:
    raise UserError(f"PCA: {n} fitting pixels for {n_components} components; need more pixels "
                    f"(or fit PCA on all pixels)")
  mean = fit.mean(axis=0, dtype=np.float64)
  cov = np.zeros((d, d), np.float64)
  for s in range(0, n, 16384):  # chunked (no (N, D) copy): float32 products, float64 total
    blk = (fit[s:s + 16384].astype(np.float64) - mean).astype(np.float32)
    cov += (blk.T @ blk).astype(np.float64)
  cov /= n - 1
  evals, evecs = np.linalg.eigh(cov)
  order = np.argsort(evals)[::-1][:n_components]
  evals, evecs = evals[order], evecs[:, order]
  sign = np.sign(evecs[np.abs(evecs).argmax(axis=0), np.arange(n_components)])
  evecs = evecs * np.where(sign == 0, 1.0, sign)
  scale = 1.0 / np.sqrt(np.maximum(evals, evals[0] * 1e-12 + 1e-30))
  proj = (evecs * scale).astype(np.float32)  # (D, K)
  out = np.empty((x.shape[0], n_components), np.float32)
  for s in range(0, x.shape[0], 65536):
    out[s:s + 65536] = (x[s:s + 65536].astype(np.float64) - mean).astype(np.float32) @ proj
  return out


def standardize(x: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
  """(N, D) -> per-column z-scores with mean / std of x[fit_rows] (std 0 -> 1), float32."""
  fit = x[fit_rows].astype(np.float64)
  mean, std = fit.mean(axis=0), fit.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  return ((x - mean) / std).astype(np.float32)


def preprocess(scene: Scene, split: Split, *, normalize: str = "standard",
               pca_fit: str = "all") -> list[np.ndarray]:
  """Model inputs per modality: whitened PCA where the spec sets it, then per-band standardisation.

  Args:
    scene: the loaded scene.
    split: its split; standardisation (and PCA when pca_fit="train") is fitted on split.train_idx.
    normalize: "standard" = z-score every band with the training pixels' mean / std (default, a
      deviation from the authors); "none" = raw values as the authors use them.
    pca_fit: "all" = fit PCA on every pixel of the scene (the authors' transductive choice);
      "train" = fit on the training pixels only.

  Returns:
    list of (H, W, spec.model_bands[m]) float32 arrays.
  """
  if normalize not in ("standard", "none"):
    raise UserError(f"normalize={normalize!r}; expected 'standard' or 'none'")
  if pca_fit not in ("all", "train"):
    raise UserError(f"pca_fit={pca_fit!r}; expected 'all' or 'train'")
  h, w = scene.shape
  out = []
  for cube, n_pca in zip(scene.cubes, scene.spec.pca):
    x = cube.reshape(h * w, -1)  # (H*W, C)
    if n_pca is not None:
      x = whitened_pca(x, n_pca, None if pca_fit == "all" else split.train_idx)
    if normalize == "standard":
      x = standardize(x, split.train_idx)
    out.append(np.asarray(x, np.float32).reshape(h, w, -1))
  return out


# --------------------------------------------------------------------------------------------------
# Patches


def check_patch_size(patch_size: int, shape: Sequence[int], where: str = "patch_size") -> None:
  """UserError unless 1 <= patch_size <= min(H, W)."""
  h, w = int(shape[0]), int(shape[1])
  if patch_size < 1 or patch_size > min(h, w):
    raise UserError(f"{where}: patch size {patch_size} does not fit the {h}x{w} scene; expected "
                    f"1..{min(h, w)}")


def pad_cubes(cubes: Sequence[np.ndarray], patch_size: int) -> list[np.ndarray]:
  """Pads every (H, W, C) cube by patch_size // 2 on each side with numpy mode 'symmetric'.

  'symmetric' repeats the edge pixel: [a b c] -> [b a | a b c | c b] (spec §1.3).
  """
  check_patch_size(patch_size, cubes[0].shape)
  p = patch_size // 2
  return [np.pad(c, ((p, p), (p, p), (0, 0)), mode="symmetric") for c in cubes]


def gather_patches(padded, flat_idx, width: int, patch_size: int):
  """Patches centred on flat pixel indices, from a cube padded by pad_cubes.

  Works on numpy arrays (one fancy index with (N, P, P) row / column grids) and on jax arrays,
  also inside jax.jit with traced indices (one (P, P, C) dynamic slice per pixel, vmapped: XLA
  copies whole contiguous rows, ~4x faster on CPU than the element-wise gather a fancy index
  becomes). No Python loop per pixel.

  Args:
    padded: (H + 2*(P//2), W + 2*(P//2), C) padded cube (numpy or jax).
    flat_idx: (N,) flat raster indices r * width + c into the unpadded scene.
    width: W of the unpadded scene.
    patch_size: P.

  Returns:
    (N, P, P, C): out[n, i, j] = padded[r_n + i, c_n + j], so the pixel sits at (P//2, P//2).
  """
  if isinstance(padded, jax.Array) or isinstance(flat_idx, jax.Array):
    padded, idx = jnp.asarray(padded), jnp.asarray(flat_idx)
    block = (patch_size, patch_size, padded.shape[2])
    return jax.vmap(lambda k: jax.lax.dynamic_slice(padded, (k // width, k % width, 0), block))(idx)
  idx = np.asarray(flat_idx)
  r, c = idx // width, idx % width  # (N,)
  off = np.arange(patch_size)
  rows = r[:, None, None] + off[None, :, None]  # (N, P, 1)
  cols = c[:, None, None] + off[None, None, :]  # (N, 1, P)
  return np.asarray(padded)[rows, cols]  # (N, P, P, C)


def gather_patch_rings(padded_plus1: jax.Array, flat_idx: jax.Array, width: int,
                       patch_size: int):
  """The pixels just outside each `gather_patches` patch, inside jax.jit.

  Args:
    padded_plus1: a pad_cubes cube with one more zero pixel on each side,
      (H + 2*(P//2) + 2, W + 2*(P//2) + 2, C).
    flat_idx: (N,) flat raster indices into the unpadded scene (as `gather_patches`).
    width, patch_size: W of the unpadded scene, P.

  Returns:
    (top, bottom, left, right): the rows above and below the patch, (N, P + 2, C) (columns
    -1 .. P of the patch), and the columns left and right of it, (N, P, C) (rows 0 .. P-1).
  """
  cube, idx, p = jnp.asarray(padded_plus1), jnp.asarray(flat_idx), patch_size
  c = cube.shape[2]

  def ring(k):
    r, col = k // width, k % width  # the patch's top-left in padded_plus1 is (r + 1, col + 1)
    top = jax.lax.dynamic_slice(cube, (r, col, 0), (1, p + 2, c))[0]
    bottom = jax.lax.dynamic_slice(cube, (r + p + 1, col, 0), (1, p + 2, c))[0]
    left = jax.lax.dynamic_slice(cube, (r + 1, col, 0), (p, 1, c))[:, 0]
    right = jax.lax.dynamic_slice(cube, (r + 1, col + p + 1, 0), (p, 1, c))[:, 0]
    return top, bottom, left, right

  return jax.vmap(ring)(idx)


# --------------------------------------------------------------------------------------------------
# Class-balanced sampler


class BalancedSampler:
  """Class-balanced, class-sorted training batches (spec §1.6).

  Every batch holds exactly k = batch_size // C samples of each class, class 0 first. Each class
  walks through an endless stream of seeded permutations of its samples (permutation j of class c
  comes from np.random.default_rng([seed, c, j])); epoch e takes the next steps * k entries. With
  equal class sizes n and n % k == 0 (40 and k = 20 in the paper), every training sample appears
  exactly once per epoch, reshuffled within its class each epoch. The batches of an epoch depend
  only on (seed, epoch), so training can resume at any epoch.
  """

  def __init__(self, train_labels, num_classes: int, batch_size: int, seed: int):
    """train_labels: (N,) 0-based classes of the training set."""
    labels = np.asarray(train_labels).astype(np.int64)
    self.num_classes = int(num_classes)
    self.k = int(batch_size) // self.num_classes
    if self.k < 1:
      raise UserError(f"batch size {batch_size} is smaller than the {num_classes} classes; "
                      f"expected a multiple of the class count")
    if seed < 0:
      raise UserError(f"sampler seed {seed}; expected a non-negative integer")
    self.seed = int(seed)
    self.members = [np.flatnonzero(labels == c) for c in range(self.num_classes)]
    empty = [c for c, m in enumerate(self.members) if len(m) == 0]
    if empty:
      raise UserError(f"training set has no sample of class {empty[0]}")
    self.steps = max(1, min(len(m) for m in self.members) // self.k)

  @property
  def batch_size(self) -> int:
    return self.k * self.num_classes

  def _stream(self, c: int, start: int, count: int) -> np.ndarray:
    n = len(self.members[c])
    j0, j1 = start // n, (start + count - 1) // n
    perms = [np.random.default_rng([self.seed, c, j]).permutation(n) for j in range(j0, j1 + 1)]
    s = start - j0 * n
    return np.concatenate(perms)[s:s + count]

  def epoch(self, epoch: int) -> np.ndarray:
    """(steps, k * C) indices into the training set, class-sorted within each batch."""
    per = self.steps * self.k
    cols = [self.members[c][self._stream(c, epoch * per, per)].reshape(self.steps, self.k)
            for c in range(self.num_classes)]
    return np.concatenate(cols, axis=1)  # (steps, C * k)


# --------------------------------------------------------------------------------------------------
# Inspect CLI


def _parse_overrides(items: Sequence[str], what: str) -> dict[str, str]:
  out = {}
  for it in items or ():
    if "=" not in it:
      raise UserError(f"--{what} {it!r}; expected NAME=VALUE, e.g. HSI=HSI_data")
    k, v = it.split("=", 1)
    out[k] = v
  return out


def inspect_scene(scene: Scene, split: Split, split_desc: dict) -> dict:
  """JSON-able summary: shapes, value ranges, class counts, split sizes."""
  spec = scene.spec
  h, w = scene.shape
  mods = []
  for i, (name, cube) in enumerate(zip(spec.modalities, scene.cubes)):
    mods.append({
        "name": name, "source": scene.files[i] if i < len(scene.files) else scene.source,
        "shape": list(cube.shape), "bands": int(cube.shape[-1]),
        "model_bands": spec.model_bands[i], "pca": spec.pca[i],
        "min": float(cube.min()), "max": float(cube.max()), "mean": float(cube.mean()),
        "std": float(cube.std())})
  counts = scene.class_counts()
  train_lab = np.bincount(labels_at(scene.labels, split.train_idx), minlength=spec.num_classes)
  return {
      "dataset": spec.name, "source": scene.source, "height": h, "width": w,
      "modalities": mods,
      "classes": [{"index": c + 1, "name": n, "count": int(counts[c]), "train": int(train_lab[c])}
                  for c, n in enumerate(spec.class_names)],
      "counts": [int(x) for x in counts],
      "labelled": int(counts.sum()), "unlabelled": int(h * w - counts.sum()),
      "split": {**split_desc, "train": int(split.train_idx.size),
                "test": int(split.test_idx.size)},
      "patch_size": spec.patch_size, "batch_size": spec.batch_size,
  }


def _format_text(info: dict) -> str:
  lines = [f"dataset {info['dataset']}  ({info['source']})",
           f"scene {info['height']}x{info['width']}, "
           f"{' + '.join(str(m['bands']) for m in info['modalities'])} bands, "
           f"patch {info['patch_size']}, batch {info['batch_size']}"]
  for m in info["modalities"]:
    pca = f" -> PCA {m['pca']}" if m["pca"] else ""
    lines.append(f"  {m['name']:<6} {'x'.join(map(str, m['shape']))}{pca}  "
                 f"min {m['min']:.4g}  max {m['max']:.4g}  mean {m['mean']:.4g}  "
                 f"std {m['std']:.4g}  [{m['source']}]")
  lines.append(f"classes ({len(info['classes'])}; {info['labelled']} labelled, "
               f"{info['unlabelled']} unlabelled):")
  for c in info["classes"]:
    lines.append(f"  {c['index']:>2} {c['name']:<24} {c['count']:>8}  train {c['train']}")
  s = info["split"]
  lines.append(f"split ({s['kind']}): train {s['train']}, test {s['test']}"
               f"{' (includes train)' if s['include_train_in_test'] else ''}")
  return "\n".join(lines)


@errors.cli_entry
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m dpmamba_jax.data",
                               description="Load, validate and summarise a dataset.")
  ap.add_argument("--dataset", default="synthetic", help=f"one of {', '.join(datasets.DATASETS)}")
  ap.add_argument("--data-dir", default=None,
                  help=f"dataset folder (default ${DATA_DIR_ENV}/<name>, else ./data/<name>)")
  ap.add_argument("--key", action="append", default=[], metavar="NAME=KEY",
                  help="array key override, NAME = a modality (HSI, LiDAR, SAR) or 'labels'")
  ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH",
                  help="file override, NAME = a modality or 'labels'")
  ap.add_argument("--seed", type=int, default=None, help="split seed (default: the spec's)")
  ap.add_argument("--per-class", type=int, default=None,
                  help="training pixels per class (default: the spec's)")
  ap.add_argument("--split-maps", default=None,
                  help="fixed split from train/test label maps (.npz/.mat with keys train, test)")
  ap.add_argument("--include-train-in-test", action="store_true",
                  help="test on every labelled pixel, as the authors do")
  ap.add_argument("--json", action="store_true", help="print JSON")
  args = ap.parse_args(argv)
  spec = datasets.get_spec(args.dataset)
  scene = load_scene(spec, args.data_dir, keys=_parse_overrides(args.key, "key"),
                     files=_parse_overrides(args.file, "file"))
  check_patch_size(spec.patch_size, scene.shape, f"dataset {spec.name}")
  if args.split_maps:
    split = split_from_maps(args.split_maps, labels=scene.labels,
                            include_train_in_test=args.include_train_in_test)
    desc = {"kind": f"maps {args.split_maps}"}
  else:
    seed = spec.seed if args.seed is None else args.seed
    per = spec.train_per_class if args.per_class is None else args.per_class
    split = make_split(scene.labels, per, seed, num_classes=spec.num_classes,
                       include_train_in_test=args.include_train_in_test,
                       class_names=spec.class_names)
    desc = {"kind": f"random {per}/class", "seed": seed, "per_class": per}
  desc["include_train_in_test"] = bool(args.include_train_in_test)
  info = inspect_scene(scene, split, desc)
  if args.json:
    print(json.dumps(info, indent=1))
  else:
    print(_format_text(info))
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
