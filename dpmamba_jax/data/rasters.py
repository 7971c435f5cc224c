"""Georeferenced rasters: GeoTIFF (rasterio / GDAL) and ENVI .hdr + binary (spectral).

Cubes are (H, W, C) channels-last in the file's dtype. A GeoRef is the grid a raster lies on (CRS,
affine transform, H x W): modalities of one scene must share it, and nothing is ever resampled.
GDAL messages go to Python logging (not stderr) and the warnings rasterio / spectral give for
ordinary files are dropped; damaged or foreign files are one-line UserErrors naming the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import pathlib
import re
import sys
import tempfile
import warnings
import xml.sax.saxutils
from typing import Optional, Sequence

import affine
import numpy as np
import rasterio
import rasterio.crs
import rasterio.enums
import rasterio.errors
import rasterio.windows
import spectral
import spectral.io.envi as envi

from dpmamba_jax import fileio
from dpmamba_jax.errors import UserError, is_no_space, mentions_no_space


RASTER_EXTENSIONS = (".tif", ".tiff", ".hdr", ".img")
# Binaries an ENVI header may sit beside (same stem), in the order tried; "" = no extension.
ENVI_BINARY_EXTENSIONS = (".img", ".dat", ".raw", ".bsq", ".bil", ".bip", "")
_EXPECTED = {"GeoTIFF": "a GeoTIFF (.tif / .tiff)",
             "ENVI": "an ENVI header (text starting with 'ENVI') with its binary beside it"}
# Raised on damaged or foreign files (found by damaging files): rasterio's RasterioIOError (an
# OSError) at open and at read (GDAL opens a cut-off GeoTIFF, fails on the first missing block),
# CRSError (a ValueError); spectral's SpyException family, ValueError / KeyError from header fields
# that do not parse, EOFError from a short binary.
READ_ERRORS = (rasterio.errors.RasterioError, spectral.SpyException, OSError, EOFError, ValueError,
               KeyError)
_ENVI_DTYPES = {k: np.dtype(v) for k, v in envi.envi_to_dtype.items()}
_UTM_DATUMS = {"wgs84": (32600, 32700, 60), "northamerica1983": (26900, None, 23),
               "northamerica1927": (26700, None, 22)}  # north base, south base, zones
_ENVI_DATUM_NAMES = {"wgs84": "WGS-84", "northamerica1983": "North America 1983",
                     "northamerica1927": "North America 1927"}


@contextlib.contextmanager
def _quiet():
  """GDAL messages to logging instead of stderr; no NotGeoreferencedWarning or spectral warnings."""
  with rasterio.Env(), warnings.catch_warnings():
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    warnings.filterwarnings("ignore", message="Parameters with non-lowercase names")
    yield


@contextlib.contextmanager
def _c_stderr(messages: list):
  """What C code prints straight to file descriptor 2 during the block (libtiff's write errors,
  e.g. "_tiffWriteProc: No space left on device.") is appended to `messages` instead; the caller
  reports it as its one line."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      sink.seek(0)
      text = sink.read().decode("utf-8", "replace").strip()
      if text:
        messages.append(text)


def _unreadable(path, kind: str, e: BaseException) -> UserError:
  if "See previous exception" in str(e) and e.__cause__ is not None:
    e = e.__cause__  # rasterio's read error only points at GDAL's
  msg = " ".join(str(e).split())
  if len(msg) > 160:
    msg = msg[:157] + "..."
  return UserError(f"{path}: cannot be read as {kind} ({type(e).__name__}"
                   f"{': ' + msg if msg else ''}); expected {_EXPECTED[kind]}")


# --------------------------------------------------------------------------------------------------
# Grids


@dataclasses.dataclass(frozen=True)
class GeoRef:
  """The grid of a raster: CRS (WKT as rasterio's CRS.to_wkt() writes it, None: unknown), the affine
  transform (a, b, c, d, e, f): x = a*col + b*row + c, y = d*col + e*row + f, and (H, W)."""
  crs_wkt: Optional[str]
  transform: tuple[float, float, float, float, float, float]
  shape: tuple[int, int]

  def describe(self) -> str:
    """e.g. "EPSG:32632, 1.0 m pixels, origin (664000.0, 5104000.0), 166x600"."""
    a, b, c, d, e, f = self.transform
    crs = _crs(self.crs_wkt)
    unit = "-unit" if crs is None else " " + _unit_name(crs)
    if b == 0 and d == 0:
      size = _num(abs(a)) if abs(a) == abs(e) else f"{_num(abs(a))} x {_num(abs(e))}"
    else:
      size = f"rotated {_num(math.hypot(a, d))} x {_num(math.hypot(b, e))}"
    return (f"{_crs_label(crs)}, {size}{unit} pixels, origin ({_num(c)}, {_num(f)}), "
            f"{self.shape[0]}x{self.shape[1]}")


def _num(x: float) -> str:
  return repr(round(float(x), 9))


def _crs(wkt: Optional[str]) -> Optional[rasterio.crs.CRS]:
  if wkt is None:
    return None
  with _quiet():
    return rasterio.crs.CRS.from_wkt(wkt)


def _crs_label(crs: Optional[rasterio.crs.CRS]) -> str:
  if crs is None:
    return "no CRS"
  with _quiet():
    code = crs.to_epsg()
  if code is not None:
    return f"EPSG:{code}"
  m = re.match(r'\s*\w+\["([^"]*)"', crs.to_wkt())
  return f"CRS {m.group(1)!r}" if m else "a custom CRS"


def _unit_name(crs: rasterio.crs.CRS) -> str:
  name = crs.units_factor[0] if crs.is_geographic else crs.linear_units
  return {"metre": "m", "meter": "m", "m": "m"}.get(name.lower(), name)


def _make_georef(crs: Optional[rasterio.crs.CRS], transform, shape) -> Optional[GeoRef]:
  """None without a CRS and with the identity (or row-flipped) transform, as rasterio sees it."""
  t = tuple(float(v) for v in tuple(transform)[:6])
  if crs is None and t in ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)):
    return None
  with _quiet():
    wkt = None if crs is None else crs.to_wkt()
  return GeoRef(wkt, t, (int(shape[0]), int(shape[1])))


def check_same_georef(first: Optional[GeoRef], first_name: str, other: Optional[GeoRef],
                      other_name: str) -> None:
  """UserError naming both files when `other` lies on another grid than `first`.

  Compared: the CRS (as rasterio.crs.CRS, only when both files declare one), the transform (pixel
  size / rotation within 1e-9 of the pixel size, origin within 1e-6 of a pixel) and the shape.
  A None GeoRef (file without georeference) is not compared. Nothing is resampled.
  """
  if first is None or other is None:
    return
  fix = "the rasters of a scene must lie on one grid (nothing is resampled; e.g. gdalwarp one)"
  crs0, crs1 = _crs(first.crs_wkt), _crs(other.crs_wkt)
  if crs0 is not None and crs1 is not None and crs0 != crs1:
    raise UserError(f"{other_name}: CRS {_crs_label(crs1)} differs from {_crs_label(crs0)} of "
                    f"{first_name}; {fix}")
  a0, a1 = affine.Affine(*first.transform), affine.Affine(*other.transform)
  pixel = max(abs(a0.a), abs(a0.b), abs(a0.d), abs(a0.e)) or 1.0
  if any(abs(u - v) > 1e-9 * pixel for u, v in zip((a0.a, a0.b, a0.d, a0.e),
                                                    (a1.a, a1.b, a1.d, a1.e))):
    raise UserError(f"{other_name}: pixel size / rotation (a, b, d, e) = "
                    f"({a1.a:g}, {a1.b:g}, {a1.d:g}, {a1.e:g}) differs from "
                    f"({a0.a:g}, {a0.b:g}, {a0.d:g}, {a0.e:g}) of {first_name}; {fix}")
  if abs(a1.c - a0.c) > 1e-6 * pixel or abs(a1.f - a0.f) > 1e-6 * pixel:
    col, row = ~a0 @ (a1.c, a1.f)
    raise UserError(f"{other_name}: origin ({_num(a1.c)}, {_num(a1.f)}) is shifted by "
                    f"{col:+.6g} columns, {row:+.6g} rows from ({_num(a0.c)}, {_num(a0.f)}) of "
                    f"{first_name}; {fix}")
  if first.shape != other.shape:
    raise UserError(f"{other_name}: is {other.shape[0]}x{other.shape[1]} pixels but {first_name} "
                    f"is {first.shape[0]}x{first.shape[1]}; {fix}")


# --------------------------------------------------------------------------------------------------
# Reading


class RasterFile:
  """An opened raster: metadata now, pixels on demand (make one with open_raster).

  path; shape (H, W, C); dtype (native byte order); georef (None: no georeference); nodata
  (GeoTIFF nodata / ENVI 'data ignore value', may be nan; None: none declared); has_mask (a
  GeoTIFF alpha band or GDAL mask marks the pixels without data: read_rows_and_mask).
  """
  has_mask = False

  def __init__(self, path, shape, dtype, georef, nodata, kind: str):
    self.path = pathlib.Path(path)
    self.shape: tuple[int, int, int] = tuple(int(s) for s in shape)
    self.dtype = np.dtype(dtype)
    self.georef: Optional[GeoRef] = georef
    self.nodata: Optional[float] = nodata
    self._kind = kind

  def __repr__(self) -> str:
    where = self.georef.describe() if self.georef else "no georeference"
    return f"RasterFile({str(self.path)!r}, {self._kind}, {self.shape}, {self.dtype}, {where})"

  def read(self) -> np.ndarray:
    """The whole raster, (H, W, C) in self.dtype."""
    return self.read_rows(0, self.shape[0])

  def read_rows(self, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 as (stop - start, W, C) in self.dtype; only those rows are read."""
    return self._read(start, stop, with_mask=False)[0]

  def read_rows_and_mask(self, start: int, stop: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """read_rows, and (stop - start, W) bool, True where the file's alpha band / mask says no
    data (None when it has neither; a nodata value is for the caller to compare), in one read."""
    return self._read(start, stop, with_mask=self.has_mask)

  def _read(self, start, stop, with_mask: bool):
    if not 0 <= start <= stop <= self.shape[0]:
      raise ValueError(f"rows {start}:{stop} outside 0:{self.shape[0]}")
    try:
      with _quiet():
        block, mask = self._rows(start, stop, with_mask)
    except READ_ERRORS as e:
      raise _unreadable(self.path, self._kind, e) from e
    return np.ascontiguousarray(block, dtype=self.dtype), mask

  def _rows(self, start: int, stop: int, with_mask: bool):
    """(block (rows, W, C), mask (rows, W) bool or None)."""
    raise NotImplementedError


class _GeoTiff(RasterFile):
  """bands: the 1-based data bands (alpha bands left out); alpha: the alpha band or None;
  gdal_mask: a per-dataset GDAL mask (.msk or internal) marks the pixels without data."""

  def __init__(self, *args, bands: tuple[int, ...], alpha: Optional[int], gdal_mask: bool):
    super().__init__(*args)
    self._bands, self._alpha = bands, alpha
    self.has_mask = alpha is not None or gdal_mask

  def _rows(self, start, stop, with_mask):
    window = rasterio.windows.Window(0, start, self.shape[1], stop - start)
    mask = None
    with rasterio.open(self.path, driver="GTiff") as src:
      block = src.read(list(self._bands), window=window)
      if with_mask and self._alpha is not None:
        mask = src.read(self._alpha, window=window) == 0
      elif with_mask:
        mask = src.read_masks(self._bands[0], window=window) == 0
    return np.moveaxis(block, 0, -1), mask


class _Envi(RasterFile):

  def __init__(self, header: pathlib.Path, binary: pathlib.Path, *args):
    super().__init__(*args)
    self.header, self.binary = header, binary

  def _rows(self, start, stop, with_mask):
    img = envi.open(str(self.header), str(self.binary))
    try:
      img.scale_factor = 1  # raw stored values: spectral would divide by 'reflectance scale factor'
      return img.read_subregion((start, stop), (0, self.shape[1])), None
    finally:
      img.fid.close()


def open_raster(path) -> RasterFile:
  """Opens a GeoTIFF (.tif / .tiff) or an ENVI raster (.hdr, or its binary .img with <stem>.hdr or
  <name>.hdr beside it; binaries named .dat, .raw, .bsq, .bil, .bip are accepted the same way).

  Reads the metadata only; RasterFile.read / read_rows read pixels. A damaged, truncated or foreign
  file, a missing ENVI binary or header, complex data: one-line UserError naming the file.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    raise UserError(f"{path}: is a folder; expected a raster file ({', '.join(RASTER_EXTENSIONS)})")
  if not path.is_file():
    raise UserError(f"{path}: file not found")
  ext = path.suffix.lower()
  if ext in (".tif", ".tiff"):
    return _open_geotiff(path)
  if ext == ".hdr":
    return _open_envi(path, _envi_binary(path), path)
  if ext in ENVI_BINARY_EXTENSIONS:
    return _open_envi(_envi_header(path), path, path)
  raise UserError(f"{path}: unsupported raster type {ext!r}; expected "
                  f"{', '.join(RASTER_EXTENSIONS)} (GeoTIFF, or ENVI header / binary)")


def _beside(path: pathlib.Path, names: Sequence[str]) -> list[pathlib.Path]:
  """Files in path's folder named like one of `names` (case-insensitive), in that order."""
  listing = {p.name.lower(): p for p in path.parent.iterdir() if p.is_file() and p != path}
  return [listing[n.lower()] for n in dict.fromkeys(names) if n.lower() in listing]


def _envi_binary(hdr: pathlib.Path) -> pathlib.Path:
  found = _beside(hdr, [hdr.stem + ext for ext in ENVI_BINARY_EXTENSIONS])
  if not found:
    raise UserError(f"{hdr}: no ENVI binary beside this header; expected {hdr.stem}.img (or "
                    f"{', '.join(hdr.stem + e for e in ENVI_BINARY_EXTENSIONS[1:-1])}, {hdr.stem})")
  if len(found) > 1:
    raise UserError(f"{hdr}: several files could be its ENVI binary "
                    f"({', '.join(p.name for p in found)}); keep one, or open the binary by name")
  return found[0]


def _envi_header(binary: pathlib.Path) -> pathlib.Path:
  found = _beside(binary, [binary.name + ".hdr", binary.stem + ".hdr"])
  if not found:
    names = " or ".join(dict.fromkeys([binary.stem + ".hdr", binary.name + ".hdr"]))
    raise UserError(f"{binary}: no ENVI header beside it; expected {names}")
  return found[0]


def _same(u: Optional[float], v: Optional[float]) -> bool:
  return u == v or (u is not None and v is not None and math.isnan(u) and math.isnan(v))


def _open_geotiff(path: pathlib.Path) -> RasterFile:
  try:
    with _quiet(), rasterio.open(path, driver="GTiff") as src:
      dtypes = set(src.dtypes)
      if len(dtypes) != 1 or np.dtype(src.dtypes[0]).kind not in "biuf":
        raise UserError(f"{path}: holds {'/'.join(sorted(dtypes))} data; expected real numbers")
      nodatas = src.nodatavals
      if any(not _same(v, nodatas[0]) for v in nodatas):
        raise UserError(f"{path}: bands declare different nodata values {nodatas}; expected one")
      _check_complete(src, path)
      georef = _make_georef(src.crs, src.transform, src.shape)
      alpha = rasterio.enums.ColorInterp.alpha
      alphas = [i + 1 for i, c in enumerate(src.colorinterp) if c == alpha]
      if len(alphas) > 1 or len(alphas) == src.count:
        raise UserError(f"{path}: bands {alphas} of {src.count} are alpha bands; expected data "
                        "bands and at most one alpha band")
      bands = tuple(i for i in range(1, src.count + 1) if i not in alphas)
      flags = src.mask_flag_enums[0]
      gdal_mask = (not alphas and rasterio.enums.MaskFlags.per_dataset in flags
                   and rasterio.enums.MaskFlags.nodata not in flags)
      shape = (src.height, src.width, len(bands))
      dtype = src.dtypes[0]
      nodata = None if nodatas[0] is None else float(nodatas[0])
  except READ_ERRORS as e:
    raise _unreadable(path, "GeoTIFF", e) from e
  return _GeoTiff(path, shape, dtype, georef, nodata, "GeoTIFF", bands=bands,
                  alpha=alphas[0] if alphas else None, gdal_mask=gdal_mask)


def _check_complete(src, path: pathlib.Path) -> None:
  """GDAL opens a cut-off GeoTIFF and fails only when a missing block is read: compare the blocks'
  byte ranges (GDAL's TIFF metadata) with the file size at open instead."""
  size = os.path.getsize(path)
  bh, bw = src.block_shapes[0]
  nx, ny = -(-src.width // bw), -(-src.height // bh)
  blocks = [(i, j) for j in range(ny) for i in range(nx)]
  blocks = blocks if len(blocks) <= 100_000 else blocks[-1000:]  # data is mostly in block order
  separate = src.interleaving == rasterio.enums.Interleaving.band
  for band in sorted({1, src.count}) if separate else (1,):
    for i, j in blocks:
      offset = src.get_tag_item(f"BLOCK_OFFSET_{i}_{j}", "TIFF", bidx=band)
      nbytes = src.get_tag_item(f"BLOCK_SIZE_{i}_{j}", "TIFF", bidx=band)
      if offset and nbytes and int(offset) + int(nbytes) > size:
        raise UserError(f"{path}: is cut off ({size} bytes, but band {band} block {i},{j} ends at "
                        f"byte {int(offset) + int(nbytes)}); expected a complete GeoTIFF")


def _open_envi(hdr: pathlib.Path, binary: pathlib.Path, opened: pathlib.Path) -> RasterFile:
  """RasterFile of an ENVI header and its binary; its path is the one the caller `opened`."""
  try:
    with _quiet():
      h = envi.read_envi_header(str(hdr))
      for field in ("lines", "samples", "bands", "data type", "interleave", "byte order"):
        if field not in h:
          raise UserError(f"{hdr}: ENVI header has no '{field}' field; expected lines, samples, "
                          f"bands, data type, interleave and byte order")
      dtype = _ENVI_DTYPES.get(str(h["data type"]).strip())
      if dtype is None or dtype.kind == "c":
        what = f"holds complex numbers ({dtype})" if dtype else "has an unknown 'data type'"
        raise UserError(f"{hdr}: {what} (data type = {h['data type']}); expected real numbers "
                        f"(ENVI data type 1-5 or 12-15)")
      if str(h["interleave"]).strip().lower() not in ("bsq", "bil", "bip"):
        raise UserError(f"{hdr}: interleave {h['interleave']!r}; expected bsq, bil or bip")
      if h.get("file type", "").strip().lower() == "envi spectral library":
        raise UserError(f"{hdr}: is an ENVI spectral library; expected an image")
      shape = tuple(_int_field(hdr, h, k, 1) for k in ("lines", "samples", "bands"))
      _int_field(hdr, h, "byte order", 0, 1)
      offset = _int_field(hdr, h, "header offset", 0) if "header offset" in h else 0
      need = offset + int(np.prod(shape)) * dtype.itemsize
      have = binary.stat().st_size
      if have < need:
        raise UserError(f"{binary}: is {have} bytes but {hdr.name} describes "
                        f"{shape[0]}x{shape[1]}x{shape[2]} {dtype} ({need} bytes with the header "
                        f"offset); the binary is cut off or the header is wrong")
      img = envi.open(str(hdr), str(binary))  # checks the header further
      img.fid.close()
      nodata = h.get("data ignore value")
      try:
        nodata = None if nodata is None else float(str(nodata).strip())
      except ValueError:
        raise UserError(f"{hdr}: 'data ignore value' = {nodata!r}; expected a number") from None
      georef = _envi_georef(hdr, h, shape[:2])
  except READ_ERRORS as e:
    raise _unreadable(hdr, "ENVI", e) from e
  return _Envi(hdr, binary, opened, shape, dtype.newbyteorder("="), georef, nodata, "ENVI")


def _int_field(hdr: pathlib.Path, h: dict, name: str, lo: int, hi: Optional[int] = None) -> int:
  try:
    value = int(str(h[name]).strip())
  except ValueError:
    value = None
  if value is None or value < lo or (hi is not None and value > hi):
    want = f"an integer >= {lo}" if hi is None else f"{lo} or {hi}"
    raise UserError(f"{hdr}: '{name}' = {h[name]!r}; expected {want}")
  return value


def _envi_georef(hdr: pathlib.Path, h: dict, shape) -> Optional[GeoRef]:
  """From 'map info' {name, ref x, ref y (1-based, 1.0 = the first pixel's outer corner), easting,
  northing, x size, y size, [zone, North|South,] datum, units=..., rotation=degrees ccw} and the
  'coordinate system string' (WKT), else for UTM / Geographic Lat/Lon the zone and datum."""
  info = h.get("map info")
  if not info or isinstance(info, str):
    return None
  fields = [str(v).strip() for v in info]
  try:
    if len(fields) < 7:
      raise ValueError(f"{len(fields)} fields")
    xref, yref, east, north, xs, ys = (float(v) for v in fields[1:7])
    if xs <= 0 or ys <= 0:
      raise ValueError("pixel size <= 0")
    keyed = dict(v.split("=", 1) for v in fields[7:] if "=" in v)
    keyed = {k.strip().lower(): v.strip() for k, v in keyed.items()}
    theta = math.radians(float(keyed.get("rotation", 0.0)))
  except ValueError as e:
    raise UserError(f"{hdr}: 'map info' {{{', '.join(fields)}}} does not parse ({e}); expected "
                    f"{{projection, ref x, ref y, easting, northing, x size, y size, ...}}"
                    ) from None
  # The grid is rotated about the reference point, counterclockwise; with square pixels and the
  # reference at pixel (1, 1) (the usual case) this is GDAL's reading too.
  cos, sin = math.cos(theta), math.sin(theta)
  a, b, d, e = cos * xs, sin * ys, sin * xs, -cos * ys
  c = east - a * (xref - 1) - b * (yref - 1)
  f = north - d * (xref - 1) - e * (yref - 1)
  text = hdr.read_text(errors="replace")
  m = re.search(r"^\s*coordinate system string\s*=\s*\{(.*?)\}", text, re.I | re.M | re.S)
  if m and m.group(1).strip():
    try:
      crs = rasterio.crs.CRS.from_wkt(" ".join(m.group(1).split()))  # spectral splits at commas
    except rasterio.errors.CRSError:
      raise UserError(f"{hdr}: 'coordinate system string' is no WKT that PROJ understands; "
                      f"expected the CRS as WKT, or no such field") from None
  else:
    crs = _crs_from_map_info(fields[0], [v for v in fields[7:] if "=" not in v])
  return _make_georef(crs, (a, b, c, d, e, f), shape)


def _datum_key(name: str) -> str:
  return re.sub(r"[^a-z0-9]", "", name.lower())


def _crs_from_map_info(projection: str, rest: list[str]) -> Optional[rasterio.crs.CRS]:
  """EPSG CRS for UTM (WGS-84, North America 1983 / 1927) and WGS-84 lat/lon map info; else None."""
  name = projection.lower()
  if name == "utm" and len(rest) >= 3 and rest[0].isdigit():
    zone, south = int(rest[0]), rest[1].lower().startswith("s")
    north_base, south_base, zones = _UTM_DATUMS.get(_datum_key(rest[2]), (None, None, 0))
    base = south_base if south else north_base
    if base is not None and 1 <= zone <= zones:
      return rasterio.crs.CRS.from_epsg(base + zone)
  if name.startswith("geographic") and rest and _datum_key(rest[0]) == "wgs84":
    return rasterio.crs.CRS.from_epsg(4326)
  return None


# --------------------------------------------------------------------------------------------------
# Writing


def _storage_dtype(dtype) -> np.dtype:
  """float16 -> float32 (GDAL 3.10 bundled with rasterio 1.4.4 has no Float16), bool -> uint8."""
  dtype = np.dtype(dtype)
  if dtype == np.float16:
    return np.dtype(np.float32)
  if dtype.kind == "b":
    return np.dtype(np.uint8)
  if dtype.kind not in "iuf":
    raise ValueError(f"cannot store {dtype} in a raster; expected real numbers")
  return dtype


def _cast(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
  if block.dtype == dtype:
    return block
  if dtype.kind in "iu":
    if block.dtype.kind not in "biu":
      raise ValueError(f"cannot write {block.dtype} values into a {dtype} raster")
    info = np.iinfo(dtype)
    if block.size and (block.min() < info.min or block.max() > info.max):
      raise ValueError(f"values {block.min()}..{block.max()} do not fit a {dtype} raster")
  return block.astype(dtype)


class GeoTiffWriter:
  """Writes a GeoTIFF (deflate) by blocks of rows, for outputs larger than memory.

  Used as a context manager: the file is written to a temporary file beside `path` and replaces
  `path` only when the block exits without an exception; otherwise the temporary file is deleted
  and nothing appears at `path`. dtype float16 is stored as float32, bool as uint8. colormap
  ({value: (r, g, b, a)}) is set on band 1 (uint8 only); georef None: no CRS, no transform.
  category_names (name of value 0, 1, ...; band 1) go to GDAL's sidecar `<path>.aux.xml` (PAM,
  where GDAL keeps a GeoTIFF's category names), written once the GeoTIFF is in place, so that
  gdalinfo and QGIS show class names.
  """

  def __init__(self, path, *, height: int, width: int, count: int, dtype,
               georef: Optional[GeoRef], nodata=None, colormap=None, band_descriptions=None,
               category_names: Optional[Sequence[str]] = None):
    self.path = pathlib.Path(path)
    self.shape = (int(count), int(height), int(width))
    self.dtype = _storage_dtype(dtype)
    if georef is not None and tuple(georef.shape) != self.shape[1:]:
      raise ValueError(f"georef is for {georef.shape}, the raster is {self.shape[1:]}")
    if colormap is not None and self.dtype != np.uint8:
      raise ValueError(f"a colour table needs uint8 data, not {self.dtype}")
    if band_descriptions is not None and len(band_descriptions) != count:
      raise ValueError(f"{len(band_descriptions)} band descriptions for {count} bands")
    self._georef, self._nodata = georef, nodata
    self._colormap, self._descriptions = colormap, band_descriptions
    self._categories = None if category_names is None else [str(c) for c in category_names]
    self._ds, self._tmp = None, None
    self._messages: list[str] = []  # what GDAL / libtiff printed during a write (_c_stderr)

  def __enter__(self) -> GeoTiffWriter:
    count, height, width = self.shape
    profile = dict(driver="GTiff", height=height, width=width, count=count, dtype=self.dtype.name,
                   nodata=self._nodata, compress="deflate", BIGTIFF="IF_SAFER")
    if self._georef is not None:
      profile.update(transform=affine.Affine(*self._georef.transform),
                     crs=_crs(self._georef.crs_wkt))
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                       suffix=".tmp")
      os.close(fd)
      with _quiet():
        self._ds = rasterio.open(self._tmp, "w", **profile)
        if self._colormap is not None:
          self._ds.write_colormap(1, self._colormap)
        for i, text in enumerate(self._descriptions or (), start=1):
          self._ds.set_band_description(i, text)
    except BaseException as e:
      self._discard()
      raise self._write_error(e) from None
    return self

  def write_rows(self, start: int, block: np.ndarray) -> None:
    """block: (rows, W) when count == 1, or (count, rows, W); written at rows start..start+rows."""
    if self._ds is None:
      raise RuntimeError("GeoTiffWriter.write_rows outside its `with` block")
    block = np.asarray(block)
    if block.ndim == 2 and self.shape[0] == 1:
      block = block[None]
    count, height, width = self.shape
    if block.ndim != 3 or block.shape[0] != count or block.shape[2] != width:
      raise ValueError(f"block of shape {block.shape}; expected ({count}, rows, {width})"
                       + (f" or (rows, {width})" if count == 1 else ""))
    if not 0 <= start <= start + block.shape[1] <= height:
      raise ValueError(f"rows {start}:{start + block.shape[1]} outside 0:{height}")
    try:
      with _quiet(), _c_stderr(self._messages):
        self._ds.write(_cast(block, self.dtype),
                       window=rasterio.windows.Window(0, start, width, block.shape[1]))
      self._check_messages()
    except (rasterio.errors.RasterioError, OSError) as e:
      raise self._write_error(e) from None

  def _check_messages(self) -> None:
    """What GDAL / libtiff printed during a call that raised nothing: a full disk is an error all
    the same (GDAL's close does not always raise, and the file would be cut short); anything
    else is shown as it was."""
    said = " ".join(self._messages)
    if mentions_no_space(said):
      raise OSError(errno.ENOSPC, said)
    if self._messages:
      print("\n".join(self._messages), file=sys.stderr)
      self._messages.clear()

  def _write_error(self, e: BaseException) -> BaseException:
    """One line naming the file for a full disk or a failed GDAL write; anything else as is."""
    said = " ".join(self._messages)
    self._messages.clear()
    if isinstance(e, UserError):  # e.g. the sidecar's own full disk
      return e
    if is_no_space(e) or mentions_no_space(said):
      return fileio.no_space_error(self.path)
    if isinstance(e, (rasterio.errors.RasterioError, OSError)):
      msg = " ".join(f"{said} {e}".split())
      return UserError(f"{self.path}: cannot be written ({type(e).__name__}: {msg})")
    return e

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self._discard()
      return
    try:
      with _quiet(), _c_stderr(self._messages):
        self._ds.close()
      self._check_messages()
      fileio.give_ordinary_permissions(self._tmp)
      if self._categories is not None:  # first: a full disk then leaves no GeoTIFF without it
        fileio.write_text(f"{self.path}.aux.xml", pam_category_names(self._categories))
      os.replace(self._tmp, self.path)
    except BaseException as e:
      self._discard()
      raise self._write_error(e) from None
    self._ds = self._tmp = None

  def _discard(self) -> None:
    if self._ds is not None:
      with contextlib.suppress(Exception), _quiet(), _c_stderr([]):  # the error is said already
        ds, self._ds = self._ds, None
        ds.close()
        del ds  # a dataset whose close failed flushes again when freed
    if self._tmp is not None and os.path.exists(self._tmp):
      os.unlink(self._tmp)
    self._ds = self._tmp = None


def pam_category_names(names: Sequence[str]) -> str:
  """GDAL's PAM sidecar XML giving band 1 the category names `names` (value i: names[i])."""
  cats = "".join(f"      <Category>{xml.sax.saxutils.escape(n)}</Category>\n" for n in names)
  return ("<PAMDataset>\n  <PAMRasterBand band=\"1\">\n    <CategoryNames>\n" + cats +
          "    </CategoryNames>\n  </PAMRasterBand>\n</PAMDataset>\n")


def write_geotiff(path, array: np.ndarray, georef: Optional[GeoRef], *, nodata=None,
                  colormap: Optional[dict[int, tuple[int, int, int, int]]] = None,
                  band_descriptions: Optional[Sequence[str]] = None) -> None:
  """Writes array (H, W) as one band or (C, H, W) as C bands to a GeoTIFF, atomically.

  dtype is kept, except float16 -> float32 (no Float16 in the GDAL 3.10 of rasterio 1.4.4) and
  bool -> uint8. Deflate compression; colormap on band 1 (uint8 only); georef None: no CRS and no
  transform. On any error nothing appears at `path` (see GeoTiffWriter).
  """
  array = np.asarray(array)
  if array.ndim not in (2, 3):
    raise ValueError(f"array of shape {array.shape}; expected (H, W) or (C, H, W)")
  bands = array[None] if array.ndim == 2 else array
  with GeoTiffWriter(path, height=bands.shape[1], width=bands.shape[2], count=bands.shape[0],
                     dtype=array.dtype, georef=georef, nodata=nodata, colormap=colormap,
                     band_descriptions=band_descriptions) as w:
    w.write_rows(0, bands)


def _map_info(georef: GeoRef) -> str:
  """ENVI 'map info' for georef: reference pixel (1, 1) = the transform's origin."""
  a, b, c, d, e, f = georef.transform
  xs, ys, theta = math.hypot(a, d), math.hypot(b, e), math.atan2(d, a)
  if abs(b - math.sin(theta) * ys) > 1e-9 * xs or abs(e + math.cos(theta) * ys) > 1e-9 * xs:
    raise ValueError(f"transform {georef.transform} is sheared or flipped; ENVI 'map info' holds "
                     f"a pixel size and a rotation only")
  crs = _crs(georef.crs_wkt)
  with _quiet():
    code = None if crs is None else crs.to_epsg()
  projection, extra = "Arbitrary", []
  for datum, (north, south, zones) in _UTM_DATUMS.items():
    for base, hemisphere in ((north, "North"), (south, "South")):
      if code is not None and base is not None and base < code <= base + zones:
        projection, extra = "UTM", [str(code - base), hemisphere, _ENVI_DATUM_NAMES[datum]]
  if code == 4326:
    projection, extra = "Geographic Lat/Lon", ["WGS-84"]
  elif projection == "Arbitrary" and crs is not None:  # the CRS itself is in the WKT field
    m = re.match(r'\s*\w+\["([^"]*)"', georef.crs_wkt)
    projection = m.group(1).replace(",", " ") if m else "Custom"
  if crs is not None:
    unit = _unit_name(crs)
    extra.append("units=" + {"m": "Meters", "degree": "Degrees"}.get(unit, unit))
  if theta:
    extra.append(f"rotation={math.degrees(theta)!r}")
  fields = [projection, "1", "1", repr(c), repr(f), repr(xs), repr(ys), *extra]
  return "{" + ", ".join(fields) + "}"


def write_envi(path_hdr, array: np.ndarray, georef: Optional[GeoRef] = None, *,
               nodata=None) -> None:
  """Writes array (H, W, C) (or (H, W)) as an ENVI header `path_hdr` + binary <stem>.img (BSQ).

  With georef: 'map info' (reference pixel (1, 1), pixel size, rotation) and 'coordinate system
  string' (the WKT), so open_raster reads back an equal GeoRef; nodata as 'data ignore value'.
  float16 is stored as float32, bool as uint8. Both files are replaced atomically (binary first).
  """
  path_hdr = pathlib.Path(path_hdr)
  if path_hdr.suffix.lower() != ".hdr":
    raise ValueError(f"{path_hdr}: an ENVI header name must end in .hdr")
  array = np.asarray(array)
  array = array[..., None] if array.ndim == 2 else array
  if array.ndim != 3:
    raise ValueError(f"array of shape {array.shape}; expected (H, W, C) or (H, W)")
  array = _cast(array, _storage_dtype(array.dtype))
  meta = {}
  if georef is not None:
    if tuple(georef.shape) != array.shape[:2]:
      raise ValueError(f"georef is for {georef.shape}, the array is {array.shape[:2]}")
    meta["map info"] = _map_info(georef)
    if georef.crs_wkt is not None:
      meta["coordinate system string"] = "{" + georef.crs_wkt + "}"
  if nodata is not None:
    meta["data ignore value"] = repr(float(nodata))
  binary = path_hdr.with_suffix(".img")
  path_hdr.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_hdr = tempfile.mkstemp(dir=path_hdr.parent, prefix=f".{path_hdr.name}.",
                                 suffix=".tmp.hdr")  # fileio.remove_stale_temps knows the name
  os.close(fd)
  tmp_img = tmp_hdr[:-4] + ".img"
  try:
    envi.save_image(tmp_hdr, array, interleave="bsq", ext=".img", force=True, metadata=meta)
    for p in (tmp_hdr, tmp_img):
      fileio.give_ordinary_permissions(p)
    os.replace(tmp_img, binary)
    os.replace(tmp_hdr, path_hdr)
  except BaseException as e:
    for p in (tmp_hdr, tmp_img):
      if os.path.exists(p):
        os.unlink(p)
    if is_no_space(e):
      raise fileio.no_space_error(path_hdr) from None
    if isinstance(e, OSError):
      raise UserError(f"{path_hdr}: cannot be written ({type(e).__name__}: {e})") from e
    raise
