"""Reading a scene: array readers (.mat v5 / v7.3, .npy, .npz; GeoTIFF and ENVI through
rasters.py), the dataset folder, nodata, georeference checks, validation, row-streamed reading.

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

from dpmamba_jax import fileio
from dpmamba_jax.data import datasets
from dpmamba_jax.data import rasters
from dpmamba_jax.data import synthetic
from dpmamba_jax.errors import UserError


DATA_DIR_ENV = "DPMAMBA_DATA_DIR"
ARRAY_EXTENSIONS = (".mat", ".npy", ".npz")
# GeoTIFF, ENVI (.hdr beside its binary, found by either name)
EXTENSIONS = ARRAY_EXTENSIONS + rasters.RASTER_EXTENSIONS
_FORMATS = ".mat v5/v7.3, .npy, .npz, GeoTIFF .tif or ENVI .hdr"
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
  """Reads one array from a .mat (MATLAB v5 or v7.3), .npy, .npz, GeoTIFF or ENVI file.

  Args:
    path: the file.
    key: the variable / array name; None = the one named like the file, or the only array
      (GeoTIFF and ENVI files hold one array: no key).

  Returns:
    (array, key used). MATLAB v7.3 arrays (stored transposed by HDF5) are transposed back, so a
    MATLAB H x W x C variable comes back as (H, W, C); a raster comes back as (H, W, bands). The
    array holds real numbers (bool, int, uint or float) and is not empty: anything else (complex,
    text, objects, a damaged or foreign file) is a one-line UserError naming the file and key.
  """
  got = _read(path, key)
  return got.array, got.key


@dataclasses.dataclass
class _FileData:
  array: np.ndarray
  key: str
  hdf5: bool = False                  # from HDF5 (MATLAB v7.3): the axis order is a guess
  georef: Optional[rasters.GeoRef] = None
  nodata: Optional[float] = None      # the file's declared nodata value (rasters)
  path: str = ""

  @property
  def name(self) -> str:
    return f"{self.path}:{self.key}" if self.key else str(self.path)


def _check_path(path: pathlib.Path) -> str:
  if not path.is_file():
    what = fileio.what_is(path)
    raise UserError(f"{path}: " + ("file not found" if what == "not found" else
                                   f"is {what}; expected a file ({_FORMATS})"))
  ext = path.suffix.lower()
  if ext not in EXTENSIONS:
    raise UserError(f"{path}: unsupported file type {ext!r}; expected {_FORMATS}")
  return ext


def _open_raster(path: pathlib.Path, key: Optional[str]) -> rasters.RasterFile:
  if key is not None:
    raise UserError(f"{path}: a raster file holds one array; expected no key (got {key!r})")
  return rasters.open_raster(path)


def _read(path, key: Optional[str]) -> _FileData:
  path = pathlib.Path(path)
  ext = _check_path(path)
  if ext in rasters.RASTER_EXTENSIONS:
    r = _open_raster(path, key)
    return _FileData(np.asarray(r.read()), "", georef=r.georef, nodata=r.nodata, path=str(path))
  try:
    head = _head(path)
    if not head:
      raise UserError(f"{path}: is empty (0 bytes); expected {_EXPECTED[ext]}")
    if ext == ".npy":
      return _FileData(*_read_npy(path, head, key), path=str(path))
    if ext == ".npz":
      return _FileData(*_read_npz(path, head, key), path=str(path))
    if _is_hdf5(head):
      return _FileData(*_read_hdf5(path, key), hdf5=True, path=str(path))
    return _FileData(*_read_mat5(path, key), path=str(path))
  except READ_ERRORS as e:
    raise _unreadable(path, ext, e) from e


def probe_bands(files: Sequence[str], key: Optional[str] = None) -> int:
  """Total bands of the files of one modality (stacked), from their headers where the format
  has one (GeoTIFF, ENVI, .npy); a .mat / .npz is read whole. 2-D arrays count as one band."""
  total = 0
  for f in files:
    p = pathlib.Path(f)
    ext = _check_path(p)
    if ext in rasters.RASTER_EXTENSIONS:
      shape = _open_raster(p, key).shape
    elif ext == ".npy" and key is None:
      try:
        with open(p, "rb") as fh:
          shape = _npy_header(fh)[0]
      except READ_ERRORS as e:
        raise _unreadable(p, ext, e) from e
    else:
      shape = _read(p, key).array.shape
    total += 1 if len(shape) == 2 else int(shape[-1])
  return total


def find_file(folder: pathlib.Path, stems: Sequence[str]) -> Optional[pathlib.Path]:
  """First existing <stem><ext> in folder (stems in order, then EXTENSIONS; case-insensitive).
  An ENVI binary (.img) counts only with its .hdr beside it."""
  listing = {p.name.lower(): p for p in pathlib.Path(folder).iterdir() if p.is_file()}
  for stem in stems:
    for ext in EXTENSIONS:
      p = listing.get((stem + ext).lower())
      if p is not None and (ext != ".img" or (stem + ".hdr").lower() in listing):
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
  nodata: Optional[list] = None      # per modality (H, W) bool (True = no data) or None
  georef: Optional[rasters.GeoRef] = None  # shared by every georeferenced file of the scene

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.labels.shape)

  @property
  def label_source(self) -> str:
    """The label map's file, for messages ("label map" when there is none, e.g. synthetic)."""
    return self.files[len(self.cubes)] if len(self.files) > len(self.cubes) else "label map"

  def class_counts(self) -> np.ndarray:
    """(C,) labelled pixels per class."""
    return np.bincount(self.labels.ravel(), minlength=self.spec.num_classes + 1)[1:]

  def nodata_masks(self) -> list:
    """Per modality the (H, W) bool nodata mask, or None where the modality has none."""
    return list(self.nodata) if self.nodata is not None else [None] * len(self.cubes)

  def invalid(self) -> Optional[np.ndarray]:
    """(H, W) bool: pixels where some modality has no data (never trained on, scored or in a
    fitted statistic); None when every pixel has all its data."""
    masks = [m for m in self.nodata_masks() if m is not None and m.any()]
    return np.logical_or.reduce(masks) if masks else None


def _check_finite(arr: np.ndarray, where: str, skip: Optional[np.ndarray] = None) -> None:
  """NaN / Inf are an error, except at the pixels of `skip` ((H, W) bool, the nodata mask)."""
  if arr.dtype.kind == "f":
    bad = ~np.isfinite(arr)
    if skip is not None:
      bad &= ~(skip[..., None] if bad.ndim == 3 else skip)
    if bad.any():
      first = tuple(int(i) for i in np.argwhere(bad)[0])
      raise UserError(f"{where}: {int(bad.sum())} NaN/Inf values (first at index {first}); "
                      f"expected finite values (or declare them nodata; a wrong byte order or "
                      f"data type in a header also gives these)")


# Sensor values (reflectance, radiance, heights, backscatter, their integer scalings) stay far
# below this; a float raster read with the wrong byte order or data type reaches it.
ABSURD_MAGNITUDE = 1e12


def _check_magnitude(arr: np.ndarray, where: str, skip: Optional[np.ndarray] = None) -> None:
  """Finite float values beyond ABSURD_MAGNITUDE (outside the nodata pixels `skip`) are an error
  naming the likely cause."""
  if arr.dtype.kind != "f":
    return
  valid = arr if skip is None else arr[~skip]
  top = float(np.abs(valid).max(initial=0.0))
  if top > ABSURD_MAGNITUDE:
    raise UserError(f"{where}: values reach {top:.3g}, absurd for sensor data: the header's byte "
                    f"order or data type is likely wrong (ENVI 'byte order' / 'data type'), or "
                    f"these pixels are a nodata value to declare")


def validate_scene(spec: datasets.DatasetSpec, cubes: Sequence[np.ndarray], labels: np.ndarray,
                   names: Optional[Sequence[str]] = None,
                   nodata: Optional[Sequence[Optional[np.ndarray]]] = None
                   ) -> tuple[list[np.ndarray], np.ndarray]:
  """Checks and normalises raw arrays; returns (float32 (H, W, C) cubes, int32 (H, W) labels).

  `names` are the "file:key" descriptions used in messages (modalities, then the label map);
  `nodata` the per-modality (H, W) masks of pixels without data (NaN allowed there).
  Raises UserError for: wrong number of modalities, not 2-/3-D, band count unlike the spec, H x W
  unlike modality 0, NaN/Inf, label map of another shape, non-integer labels, labels outside 0..C.
  """
  m = spec.num_modalities
  names = list(names) if names is not None else [*spec.modalities, LABEL_KEY]
  nodata = list(nodata) if nodata is not None else [None] * m
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
    _check_finite(cube, names[i], nodata[i])
    _check_magnitude(cube, names[i], nodata[i])
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


def _fix_hdf5_axis_order(arr: np.ndarray, bands: Optional[int],
                         hw: Optional[tuple[int, int]]) -> np.ndarray:
  """HDF5 arrays are read in MATLAB order (axes reversed). A file written from Python with h5py
  may hold C-order H x W x C instead; keep that orientation when only it fits the expected band
  count (or, failing that, the H x W of the scene's first modality)."""
  def ok_bands(a):
    return a.ndim == 2 and bands == 1 or a.ndim == 3 and a.shape[-1] == bands
  if bands is not None and not ok_bands(arr) and ok_bands(arr.T):
    return np.ascontiguousarray(arr.T)
  if hw is not None and arr.shape[:2] != hw and arr.T.shape[:2] == hw:
    return np.ascontiguousarray(arr.T)
  return arr


def nodata_mask(block: np.ndarray, value: Optional[float]) -> Optional[np.ndarray]:
  """(rows, W) bool: pixels where any band equals `value` (NaN matches NaN) or is not finite;
  None when no value is declared."""
  if value is None:
    return None
  block = block if block.ndim == 3 else block[..., None]
  bad = np.isnan(block) if np.isnan(value) else (block == value)
  if block.dtype.kind == "f":
    bad = bad | ~np.isfinite(block)
  return bad.any(axis=-1)


class ModalityReader:
  """One modality of a scene: its files (several stack along the bands), read by rows.

  A GeoTIFF / ENVI file is read only where asked (`read_rows`), so a scene of any size streams
  in bounded memory; a .mat / .npz is read whole, a .npy memory-mapped. Every file must have
  the same H x W and, where georeferenced, the same CRS and transform (rasters.check_same_georef).

  Args:
    name: the modality (for messages).
    files: its files.
    key: array key for .mat / .npz files.
    nodata: overrides every file's own nodata value.
    bands, hw: the expected band count and H x W (used to orient MATLAB v7.3 arrays only).
  """

  def __init__(self, name: str, files: Sequence, key: Optional[str] = None,
               nodata: Optional[float] = None, *, bands: Optional[int] = None,
               hw: Optional[tuple[int, int]] = None):
    self.name = name
    self._parts = []   # (reader or array, nodata value, description)
    for f in files:
      p = pathlib.Path(f)
      ext = _check_path(p)
      if ext in rasters.RASTER_EXTENSIONS:
        r = _open_raster(p, key)
        self._parts.append((r, r.nodata, str(p), r.georef, r.shape[:2]))
        continue
      if ext == ".npy" and key is None:
        got = _read(p, None)  # the checks; then a memory map instead of the copy
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        del got
      else:
        got = _read(p, key)
        arr = got.array
        if got.hdf5:
          arr = _fix_hdf5_axis_order(arr, bands if len(files) == 1 else None, hw)
        key_used = got.key
        p = f"{p}:{key_used}"
      if arr.ndim not in (2, 3):
        raise UserError(f"{p}: {name} array has shape {arr.shape}; expected H x W x bands (or "
                        "H x W for one band)")
      self._parts.append((arr, None, str(p), None, tuple(arr.shape[:2])))
    if nodata is not None:
      self._parts = [(r, nodata, d, g, s) for r, _, d, g, s in self._parts]
    first = self._parts[0]
    for part in self._parts[1:]:
      if part[4] != first[4]:
        raise UserError(f"{part[2]}: {name} file is {part[4][0]}x{part[4][1]} but {first[2]} is "
                        f"{first[4][0]}x{first[4][1]}; the files of a modality must have the "
                        "same H x W")
    ref = next(((g, d) for _, _, d, g, _ in self._parts if g is not None), (None, None))
    for _, _, d, g, _ in self._parts:
      rasters.check_same_georef(ref[0], ref[1], g, d)
    self.georef, self.georef_file = ref
    self.files = tuple(d for _, _, d, _, _ in self._parts)

  @property
  def shape(self) -> tuple[int, int, int]:
    h, w = self._parts[0][4]
    return (h, w, sum(_bands_of(r) for r, *_ in self._parts))

  def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(block (stop - start, W, C) in the files' dtype, nodata (stop - start, W) bool or None)."""
    blocks, mask = [], None
    for r, value, *_ in self._parts:
      if isinstance(r, rasters.RasterFile):
        b, file_mask = r.read_rows_and_mask(start, stop)
      else:
        b, file_mask = np.asarray(r[start:stop]), None
      b = b if b.ndim == 3 else b[..., None]  # (rows, W) -> (rows, W, 1)
      for m in (nodata_mask(b, value), file_mask):
        if m is not None:
          mask = m if mask is None else mask | m
      blocks.append(b)
    block = blocks[0] if len(blocks) == 1 else np.concatenate(
        [b.astype(np.result_type(*blocks)) for b in blocks], axis=-1)
    return block, mask

  def read(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
    return self.read_rows(0, self.shape[0])


def _bands_of(r) -> int:
  shape = r.shape
  return 1 if len(shape) == 2 else int(shape[-1])


def _scene_files(spec: datasets.DatasetSpec, folder: Optional[pathlib.Path],
                 files: Mapping[str, str], keys: Mapping[str, str],
                 need_labels: bool = True) -> list[tuple[str, list, Optional[str]]]:
  """(name, files, key) per modality and then the label map ("labels"; None files when absent
  and not needed)."""
  out = []
  stems = list(spec.file_stems) + [spec.label_stems]
  listed = list(spec.modality_files) + [(spec.label_file,) if spec.label_file else ()]
  keys_in_spec = list(spec.modality_keys or [None] * spec.num_modalities) + [spec.label_key]
  for i, name in enumerate([*spec.modalities, LABEL_KEY]):
    key = keys.get(name, keys_in_spec[i] if i < len(keys_in_spec) else None)
    if name in files:
      out.append((name, [files[name]], key))
      continue
    if spec.modality_files and (i < spec.num_modalities or spec.label_file):
      out.append((name, list(listed[i]), key))
      continue
    path = find_file(folder, stems[i]) if folder is not None and i < len(stems) else None
    if path is None:
      if name == LABEL_KEY and not need_labels:
        out.append((name, None, key))
        continue
      what = "label map" if name == LABEL_KEY else f"{name} file"
      if folder is None:
        raise UserError(f"dataset {spec.name}: no {what} given")
      st = stems[i]
      raise UserError(f"{folder}: no {what}; expected {' or '.join(s + '.mat' for s in st[:2])} "
                      f"({_FORMATS})")
    out.append((name, [path], key))
  return out


def load_scene(spec: datasets.DatasetSpec | str, data_dir=None, *,
               keys: Optional[Mapping[str, str]] = None,
               files: Optional[Mapping[str, str]] = None) -> Scene:
  """Loads and validates a scene.

  Args:
    spec: a DatasetSpec or its name. A spec from a dataset file names its files itself.
    data_dir: the dataset folder; None = $DPMAMBA_DATA_DIR/<name>, else ./data/<name>. For the
      synthetic spec, None generates the scene (no files needed).
    keys: key overrides, by modality name (e.g. "HSI") or "labels".
    files: file overrides (paths), by modality name or "labels".

  Returns:
    Scene with float32 (H, W, C_m) cubes and an int32 (H, W) label map. Pixels without data in
    some modality (its nodata value; GeoTIFF / ENVI declare one, a dataset file may set it) are
    unlabelled in `labels` and flagged in `Scene.nodata`. Georeferenced files must all share CRS,
    transform and shape (a one-line error naming two files that differ).
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
  if len(files) < spec.num_modalities + 1 and not spec.modality_files:
    folder = resolve_data_dir(spec, data_dir)
  arrays, names, masks, georefs = [], [], [], []
  hw = None
  nodata_in_spec = list(spec.modality_nodata or [None] * spec.num_modalities) + [None]
  for i, (name, paths, key) in enumerate(_scene_files(spec, folder, files, keys)):
    bands = spec.bands[i] if i < spec.num_modalities else 1
    reader = ModalityReader(name, paths, key, nodata_in_spec[i], bands=bands, hw=hw)
    arr, mask = reader.read()
    if i == 0:
      hw = tuple(arr.shape[:2])
    if i < spec.num_modalities:
      masks.append(mask)
    else:  # the label map: its nodata value is "unlabelled"
      arr = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
      if mask is not None:
        arr = np.where(mask, 0, arr)
    arrays.append(arr)
    names.append(" + ".join(reader.files))
    georefs.append((reader.georef, reader.georef_file))
  ref = next((g for g in georefs if g[0] is not None), (None, None))
  for g, where in georefs:
    rasters.check_same_georef(ref[0], ref[1], g, where)
  cubes, labels = validate_scene(spec, arrays[:-1], arrays[-1], names, masks)
  scene = Scene(spec, cubes, labels, str(folder) if folder else "files", tuple(names),
                nodata=masks if any(m is not None for m in masks) else None, georef=ref[0])
  invalid = scene.invalid()
  if invalid is not None:  # never trained on nor scored
    scene.labels = np.where(invalid, 0, scene.labels).astype(np.int32)
  return scene
