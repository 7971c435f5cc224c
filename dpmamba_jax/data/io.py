"""Reading a scene: array readers (.mat v5 / v7.3, .npy, .npz), the dataset folder, validation.

Conventions (ARCHITECTURE.md): cubes are (H, W, C) channels-last float32, label maps (H, W) int32
with 0 = unlabelled and 1..C, pixel indices are flat raster indices r * W + c.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import struct
import tokenize
import zipfile
import zlib
from typing import Mapping, Optional, Sequence

import h5py
import numpy as np
import scipy.io
import scipy.io.matlab
import scipy.sparse

from dpmamba_jax.data import datasets
from dpmamba_jax.data import synthetic
from dpmamba_jax.errors import UserError


DATA_DIR_ENV = "DPMAMBA_DATA_DIR"
EXTENSIONS = (".mat", ".npy", ".npz")
LABEL_KEY = "labels"  # name of the label map in `keys` / `files` overrides
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (.npz), an empty one


# --------------------------------------------------------------------------------------------------
# Readers


# What each reader expects, for messages.
_EXPECTED = {".mat": "a MATLAB .mat file (v5, or v7.3 = HDF5)",
             ".npy": "a NumPy .npy file (np.save)",
             ".npz": "a NumPy .npz archive (np.savez)"}

# The exceptions the readers raise on a damaged or foreign file (found by damaging files): truncated
# or corrupt streams (EOFError, OSError - h5py's too -, zlib.error, zipfile.BadZipFile, struct.error),
# headers that do not parse (ValueError, SyntaxError, tokenize.TokenError), scipy's MatReadError and
# NotImplementedError (unsupported .mat variants). scipy's IndexError on a cut-off header is caught
# around loadmat only.
READ_ERRORS = (OSError, EOFError, ValueError, SyntaxError, tokenize.TokenError, zlib.error,
                zipfile.BadZipFile, struct.error, scipy.io.matlab.MatReadError, NotImplementedError)


def _unreadable(path, ext: str, e: BaseException) -> UserError:
  msg = " ".join(str(e).split())
  if len(msg) > 160:
    msg = msg[:157] + "..."
  name = type(e).__name__
  if name == "error":  # zlib.error, struct.error
    name = f"{type(e).__module__}.error"
  return UserError(f"{path}: cannot be read as {ext} ({name}{': ' + msg if msg else ''}); "
                   f"expected {_EXPECTED[ext]}")


def _head(path: pathlib.Path) -> bytes:
  with open(path, "rb") as f:
    return f.read(520)


def _is_hdf5(head: bytes) -> bool:
  """MATLAB v7.3 files are HDF5: signature at byte 0 or after the 512-byte MATLAB header."""
  return head[:8] == _HDF5_SIGNATURE or head[512:520] == _HDF5_SIGNATURE


def _dtype_problem(dtype: np.dtype) -> Optional[str]:
  """None for real numbers (bool, int, uint, float), else what the array holds and what was
  expected (completes "<file>: key 'k' ...")."""
  kind = dtype.kind
  if kind in "biuf":
    return None
  if kind == "c":
    return f"holds complex numbers ({dtype}); expected real numbers"
  if kind in "US":
    return f"holds text ({dtype}), not numbers; expected a numeric array"
  if kind == "O":
    return "holds objects (dtype object: a cell array or pickled data); expected a numeric array"
  if kind in "mM":
    return f"holds dates / times ({dtype}); expected a numeric array"
  return f"holds records ({dtype}, e.g. a MATLAB struct); expected a numeric array"


def _array_problem(shape, dtype: np.dtype) -> Optional[str]:
  problem = _dtype_problem(np.dtype(dtype))
  if problem is None and int(np.prod(shape)) == 0:
    problem = f"is empty (shape {tuple(shape)}); expected a non-empty numeric array"
  return problem


def _value_problem(value) -> Optional[str]:
  """_array_problem of a value scipy.io.loadmat returned (which may be no ndarray at all)."""
  if scipy.sparse.issparse(value):
    return "is a sparse matrix; expected a dense numeric array"
  if not isinstance(value, np.ndarray):
    return f"is a {type(value).__name__}; expected a numeric array"
  return _array_problem(value.shape, value.dtype)


def _numeric(a) -> bool:
  return _value_problem(a) is None


def _pick_key(path, names: Sequence[str], good: Sequence[str], key: Optional[str]) -> str:
  """Key to read: the override, else the one named like the file, else the only usable array.

  `names` are all keys of the file, `good` those holding a non-empty real numeric array; the
  caller reports what is wrong with a chosen key that is not in `good`.
  """
  if key is not None:
    if key not in names:
      raise UserError(f"{path}: no key {key!r}; keys present: {', '.join(names) or 'none'}")
    return key
  stem = pathlib.Path(path).stem.lower()
  named = [k for k in names if k.lower() == stem]
  if named:
    return named[0]
  if len(good) == 1:
    return good[0]
  if not good:
    if len(names) == 1:
      return names[0]
    raise UserError(f"{path}: holds no numeric array (keys: {', '.join(names) or 'none'}); "
                    f"expected a non-empty array of real numbers")
  raise UserError(f"{path}: holds several arrays ({', '.join(good)}) and none is named "
                  f"{pathlib.Path(path).stem!r}; choose one with a key override (--key NAME=KEY)")


def _npy_header(f) -> tuple[tuple, np.dtype]:
  """(shape, dtype) from the header of a .npy stream (positioned at its start)."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
  else:
    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
  return shape, dtype


def _read_npy(path: pathlib.Path, head: bytes, key: Optional[str]) -> tuple[np.ndarray, str]:
  if not head.startswith(_NPY_MAGIC):
    if head[:4] in _ZIP_MAGICS:
      raise UserError(f"{path}: is a .npz archive (zip), not a .npy file; rename it to .npz")
    raise UserError(f"{path}: not a .npy file (no NumPy header); expected {_EXPECTED['.npy']}")
  with open(path, "rb") as f:
    shape, dtype = _npy_header(f)
  problem = _array_problem(shape, dtype)
  if problem:
    raise UserError(f"{path}: {problem}")
  return np.asarray(np.load(path, allow_pickle=False)), key or path.stem


def _read_npz(path: pathlib.Path, head: bytes, key: Optional[str]) -> tuple[np.ndarray, str]:
  if head[:4] not in _ZIP_MAGICS:
    if head.startswith(_NPY_MAGIC):
      raise UserError(f"{path}: is a .npy file, not a .npz archive; rename it to .npy")
    raise UserError(f"{path}: not a .npz archive (not a zip file); expected {_EXPECTED['.npz']}")
  headers = {}
  with zipfile.ZipFile(path) as zf:
    for member in zf.namelist():
      with zf.open(member) as f:
        headers[member[:-4] if member.endswith(".npy") else member] = _npy_header(f)
  names = list(headers)
  good = [k for k in names if _array_problem(*headers[k]) is None]
  k = _pick_key(path, names, good, key)
  problem = _array_problem(*headers[k])
  if problem:
    raise UserError(f"{path}: key {k!r} {problem}")
  with np.load(path, allow_pickle=False) as z:
    return np.asarray(z[k]), k


def _h5_problem(obj) -> Optional[str]:
  if not isinstance(obj, h5py.Dataset):
    return "is a group (a MATLAB struct), not an array; expected a numeric array"
  cls = obj.attrs.get("MATLAB_class", b"")
  cls = cls.decode() if isinstance(cls, bytes) else str(cls)
  if cls == "char":  # MATLAB stores char arrays as uint16
    return "holds text (MATLAB char); expected a numeric array"
  if cls == "cell":
    return "holds a MATLAB cell array; expected a numeric array"
  if obj.attrs.get("MATLAB_empty", 0):
    return "is empty (MATLAB []); expected a non-empty numeric array"
  if obj.dtype.names and set(obj.dtype.names) == {"real", "imag"}:
    return "holds complex numbers; expected real numbers"
  return _array_problem(obj.shape, obj.dtype)


def _read_hdf5(path: pathlib.Path, key: Optional[str]) -> tuple[np.ndarray, str]:
  try:
    return _read_hdf5_file(path, key)
  except (KeyError, RuntimeError, TypeError) as e:  # h5py on damaged headers, links, B-trees, types
    raise _unreadable(path, ".mat", e) from e


def _read_hdf5_file(path: pathlib.Path, key: Optional[str]) -> tuple[np.ndarray, str]:
  with h5py.File(path, "r") as f:
    # (h5py gives undecodable names as bytes: not MATLAB variable names)
    names = [k for k in f.keys() if isinstance(k, str) and not k.startswith("#")]
    good = [k for k in names if _h5_problem(f[k]) is None]
    k = _pick_key(path, names, good, key)
    problem = _h5_problem(f[k])
    if problem:
      raise UserError(f"{path}: key {k!r} {problem} (MATLAB v7.3)")
    # HDF5 stores MATLAB's column-major arrays with the axes reversed.
    return np.ascontiguousarray(np.asarray(f[k][()]).T), k


def _read_mat5(path: pathlib.Path, key: Optional[str]) -> tuple[np.ndarray, str]:
  try:
    d = scipy.io.loadmat(path)
  except (IndexError, TypeError) as e:  # scipy on cut-off headers, damaged element tags
    raise _unreadable(path, ".mat", e) from e
  names = [k for k in d if not k.startswith("__")]
  good = [k for k in names if _numeric(d[k])]
  k = _pick_key(path, names, good, key)
  problem = _value_problem(d[k])
  if problem:
    raise UserError(f"{path}: key {k!r} {problem}")
  return np.asarray(d[k]), k


def read_array(path, key: Optional[str] = None) -> tuple[np.ndarray, str]:
  """Reads one array from a .mat (MATLAB v5 or v7.3), .npy or .npz file.

  Args:
    path: the file.
    key: the variable / array name; None = the one named like the file, or the only array.

  Returns:
    (array, key used). MATLAB v7.3 arrays (stored transposed by HDF5) are transposed back, so a
    MATLAB H x W x C variable comes back as (H, W, C). The array holds real numbers (bool, int,
    uint or float) and is not empty: anything else (complex, text, objects, a damaged or foreign
    file) is a one-line UserError naming the file and key.
  """
  arr, k, _ = _read(path, key)
  return arr, k


def _read(path, key: Optional[str]) -> tuple[np.ndarray, str, bool]:
  """read_array, plus whether the array came from HDF5 (so its axis order is a guess)."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise UserError(f"{path}: is a folder; expected a .mat, .npy or .npz file")
  if not path.is_file():
    raise UserError(f"{path}: file not found")
  ext = path.suffix.lower()
  if ext not in EXTENSIONS:
    raise UserError(f"{path}: unsupported file type {ext!r}; expected .mat, .npy or .npz")
  try:
    head = _head(path)
    if not head:
      raise UserError(f"{path}: is empty (0 bytes); expected {_EXPECTED[ext]}")
    if ext == ".npy":
      return (*_read_npy(path, head, key), False)
    if ext == ".npz":
      return (*_read_npz(path, head, key), False)
    if _is_hdf5(head):
      return (*_read_hdf5(path, key), True)
    return (*_read_mat5(path, key), False)
  except READ_ERRORS as e:
    raise _unreadable(path, ext, e) from e


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
    if cube.dtype.kind not in "iuf":
      raise UserError(f"{names[i]}: {mod} array has dtype {cube.dtype}; expected real numbers "
                      f"(int, uint or float)")
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
  if lab.dtype.kind not in "biuf":
    raise UserError(f"{names[-1]}: label map has dtype {lab.dtype}; expected integer class "
                    f"indices 0..{spec.num_classes}")
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
