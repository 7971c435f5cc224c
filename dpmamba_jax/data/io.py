"""Reading a scene: array readers (.mat v5 / v7.3, .npy, .npz), the dataset folder, validation.

Conventions (ARCHITECTURE.md): cubes are (H, W, C) channels-last float32, label maps (H, W) int32
with 0 = unlabelled and 1..C, pixel indices are flat raster indices r * W + c.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Mapping, Optional, Sequence

import h5py
import numpy as np
import scipy.io

from dpmamba_jax.data import datasets
from dpmamba_jax.data import synthetic
from dpmamba_jax.errors import UserError


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
