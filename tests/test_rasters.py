"""Georeferenced rasters (dpmamba_jax.data.rasters): GeoTIFF and ENVI reading / writing, grids."""
from __future__ import annotations

import math
import os
import warnings
from xml.etree import ElementTree

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from dpmamba_jax.data import io, rasters
from dpmamba_jax.errors import UserError


UTM32 = CRS.from_epsg(32632)
TRANSFORM = Affine(1.0, 0.0, 664000.0, 0.0, -1.0, 5104000.0)
H, W = 5, 7


def _georef(crs=UTM32, transform=TRANSFORM, shape=(H, W)):
  return rasters.GeoRef(None if crs is None else crs.to_wkt(), tuple(transform)[:6], shape)


def _cube(dtype, c=3):
  return (np.arange(H * W * c).reshape(H, W, c) * 3 + 1).astype(dtype)


def _one_line_error(path, fn, *args):
  with pytest.raises(UserError) as e:
    fn(*args)
  msg = str(e.value)
  assert "\n" not in msg and str(path) in msg, msg
  return msg


def _write_envi_by_hand(tmp_path, cube, map_info, *, interleave="bsq", byteorder="<",
                        extra=""):
  order = {"bsq": (2, 0, 1), "bil": (0, 2, 1), "bip": (0, 1, 2)}[interleave]
  data = np.transpose(cube, order).astype(cube.dtype.newbyteorder(byteorder))
  data.tofile(tmp_path / "scene.img")
  dtype_code = {"float32": 4, "uint16": 12, "int16": 2}[cube.dtype.name]
  (tmp_path / "scene.hdr").write_text(
      f"ENVI\nsamples = {cube.shape[1]}\nlines = {cube.shape[0]}\nbands = {cube.shape[2]}\n"
      f"header offset = 0\nfile type = ENVI Standard\ndata type = {dtype_code}\n"
      f"interleave = {interleave}\nbyte order = {1 if byteorder == '>' else 0}\n"
      f"map info = {map_info}\n{extra}")
  return tmp_path / "scene.hdr"


# --------------------------------------------------------------------------------------------------
# GeoTIFF


@pytest.mark.parametrize("dtype,nodata", [(np.float32, float("nan")), (np.uint16, 65535)])
def test_geotiff_round_trip(tmp_path, dtype, nodata):
  cube = _cube(dtype)
  path = tmp_path / "cube.tif"
  rasters.write_geotiff(path, np.moveaxis(cube, -1, 0), _georef(), nodata=nodata)
  r = rasters.open_raster(path)
  assert r.shape == (H, W, 3) and r.dtype == np.dtype(dtype) and r.path == path
  np.testing.assert_array_equal(r.read(), cube)
  assert r.georef == _georef()
  assert CRS.from_wkt(r.georef.crs_wkt) == UTM32 and Affine(*r.georef.transform) == TRANSFORM
  assert (math.isnan(r.nodata) if math.isnan(nodata) else r.nodata == nodata)
  with rasterio.open(path) as src:
    assert src.compression == rasterio.enums.Compression.deflate


def test_describe():
  assert _georef(shape=(166, 600)).describe() == (
      "EPSG:32632, 1.0 m pixels, origin (664000.0, 5104000.0), 166x600")
  assert _georef(crs=None).describe().startswith("no CRS, 1.0-unit pixels")


def test_read_rows_geotiff(tmp_path):
  cube = _cube(np.int16, c=2)
  rasters.write_geotiff(tmp_path / "c.tif", np.moveaxis(cube, -1, 0), _georef())
  r = rasters.open_raster(tmp_path / "c.tif")
  for start, stop in [(0, 1), (1, 4), (4, 5), (2, 2), (0, H)]:
    np.testing.assert_array_equal(r.read_rows(start, stop), r.read()[start:stop])
  with pytest.raises(ValueError):
    r.read_rows(3, H + 1)


def _write_masked_geotiff(path, cube, mask, how):
  """cube (H, W, C) uint16; mask (H, W) True = no data, stored as an alpha band or a GDAL mask."""
  profile = dict(driver="GTiff", height=H, width=W, dtype="uint16", crs=UTM32, transform=TRANSFORM)
  if how == "alpha":  # GDAL's ALPHA=YES makes band 2 (the first extra sample) the alpha band
    alpha = np.where(mask, 0, 65535).astype(np.uint16)
    bands = [cube[..., 0], alpha, *np.moveaxis(cube[..., 1:], -1, 0)]
    with rasterio.open(path, "w", count=len(bands), alpha="YES", **profile) as dst:
      dst.write(np.stack(bands))
  else:
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), \
         rasterio.open(path, "w", count=cube.shape[-1], **profile) as dst:
      dst.write(np.moveaxis(cube, -1, 0))
      dst.write_mask(np.where(mask, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("how", ["alpha", "internal_mask"])
def test_alpha_band_and_gdal_mask_mark_nodata(tmp_path, how):
  """GIS tools often mark missing pixels with an alpha band or a mask instead of a nodata value:
  they are nodata, and an alpha band is not a data band."""
  cube, mask = _cube(np.uint16, c=3), np.zeros((H, W), bool)
  mask[1, 2:5] = mask[3, 0] = True
  path = tmp_path / "m.tif"
  _write_masked_geotiff(path, cube, mask, how)
  r = rasters.open_raster(path)
  assert r.shape == (H, W, 3) and r.has_mask and r.nodata is None
  np.testing.assert_array_equal(r.read(), cube)
  np.testing.assert_array_equal(r.read_rows_and_mask(1, 4)[1], mask[1:4])
  block, nodata = io.ModalityReader("HSI", [path]).read_rows(0, H)
  np.testing.assert_array_equal(block, cube)
  np.testing.assert_array_equal(nodata, mask)
  rasters.write_geotiff(tmp_path / "plain.tif", np.moveaxis(cube, -1, 0), _georef())
  plain = rasters.open_raster(tmp_path / "plain.tif")
  assert not plain.has_mask and plain.read_rows_and_mask(0, H)[1] is None


def test_float16_is_stored_as_float32(tmp_path):
  scores = np.linspace(0, 1, H * W, dtype=np.float16).reshape(H, W)
  rasters.write_geotiff(tmp_path / "s.tif", scores, _georef())
  r = rasters.open_raster(tmp_path / "s.tif")
  assert r.dtype == np.float32 and r.shape == (H, W, 1)
  np.testing.assert_array_equal(r.read()[..., 0], scores.astype(np.float32))


def test_no_georef_writes_no_crs_and_warns_nothing(tmp_path, capfd):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a NotGeoreferencedWarning would fail the test
    rasters.write_geotiff(tmp_path / "plain.tif", np.zeros((H, W), np.uint8), None)
    r = rasters.open_raster(tmp_path / "plain.tif")
    r.read()
  assert r.georef is None and r.nodata is None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    with rasterio.open(tmp_path / "plain.tif") as src:
      assert src.crs is None and src.transform.is_identity
  assert capfd.readouterr().err == ""


def test_colormap_and_band_descriptions(tmp_path):
  classes = (np.arange(H * W) % 3).reshape(H, W).astype(np.uint8)
  colours = {0: (0, 0, 0, 0), 1: (255, 0, 0, 255), 2: (0, 128, 0, 255)}
  rasters.write_geotiff(tmp_path / "map.tif", classes, _georef(), nodata=0, colormap=colours,
                        band_descriptions=["class"])
  with rasterio.open(tmp_path / "map.tif") as src:
    cmap = src.colormap(1)
    assert all(cmap[k] == v for k, v in colours.items())
    assert src.descriptions == ("class",)
  np.testing.assert_array_equal(rasters.open_raster(tmp_path / "map.tif").read()[..., 0], classes)
  with pytest.raises(ValueError):
    rasters.write_geotiff(tmp_path / "f.tif", classes.astype(np.float32), None, colormap=colours)


def test_category_names_in_gdals_sidecar(tmp_path):
  """Class names go to `<map>.aux.xml` (GDAL's PAM file; gdalinfo lists them as "Categories",
  QGIS as the legend), escaped, one per value from 0; written only with the GeoTIFF."""
  path = tmp_path / "map.tif"
  names = ["no data", "Grass & <trees>", "Roads"]
  with rasters.GeoTiffWriter(path, height=H, width=W, count=1, dtype="uint8", georef=_georef(),
                             nodata=0, category_names=names) as w:
    w.write_rows(0, np.ones((H, W), np.uint8))
  root = ElementTree.parse(f"{path}.aux.xml").getroot()
  band = root.find("PAMRasterBand")
  assert band.get("band") == "1"
  assert [c.text for c in band.find("CategoryNames")] == names
  failed = tmp_path / "failed.tif"
  with pytest.raises(RuntimeError):
    with rasters.GeoTiffWriter(failed, height=H, width=W, count=1, dtype="uint8", georef=None,
                               category_names=names):
      raise RuntimeError("stopped")
  assert not os.path.exists(f"{failed}.aux.xml") and not failed.exists()


def test_streaming_writer_equals_write_geotiff(tmp_path):
  bands = np.moveaxis(_cube(np.float32, c=4), -1, 0)
  rasters.write_geotiff(tmp_path / "whole.tif", bands, _georef(), nodata=-1.0,
                        band_descriptions=list("abcd"))
  with rasters.GeoTiffWriter(tmp_path / "rows.tif", height=H, width=W, count=4,
                             dtype=np.float32, georef=_georef(), nodata=-1.0,
                             band_descriptions=list("abcd")) as w:
    for start in range(0, H, 2):
      w.write_rows(start, bands[:, start:start + 2].astype(np.float64))  # cast to float32
  whole, rows = (rasters.open_raster(tmp_path / n) for n in ("whole.tif", "rows.tif"))
  np.testing.assert_array_equal(rows.read(), whole.read())
  assert (rows.georef, rows.nodata, rows.dtype) == (whole.georef, whole.nodata, whole.dtype)
  # one band: (rows, W) blocks
  with rasters.GeoTiffWriter(tmp_path / "one.tif", height=H, width=W, count=1, dtype=np.uint8,
                             georef=None) as w:
    w.write_rows(0, np.ones((2, W), np.int64))
    w.write_rows(2, np.full((3, W), 2, np.int32))
    with pytest.raises(ValueError):
      w.write_rows(4, np.ones((2, W), np.uint8))  # past the last row
    with pytest.raises(ValueError):
      w.write_rows(0, np.full((1, W), 300))  # does not fit uint8
  assert rasters.open_raster(tmp_path / "one.tif").read()[:, 0, 0].tolist() == [1, 1, 2, 2, 2]


def test_writes_are_atomic(tmp_path, monkeypatch):
  path = tmp_path / "out.tif"
  with pytest.raises(KeyboardInterrupt):
    with rasters.GeoTiffWriter(path, height=H, width=W, count=1, dtype=np.uint8,
                               georef=_georef()) as w:
      w.write_rows(0, np.ones((2, W), np.uint8))
      assert len(os.listdir(tmp_path)) == 1  # the temporary file, beside `path`
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == []
  # an error inside write_geotiff: an older file at `path` stays as it was, no temporary file
  rasters.write_geotiff(path, np.zeros((H, W), np.uint8), None)
  before = path.read_bytes()

  def fail(self, start, block):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(rasters.GeoTiffWriter, "write_rows", fail)
  with pytest.raises(OSError):
    rasters.write_geotiff(path, np.ones((H, W), np.uint8), _georef())
  assert os.listdir(tmp_path) == ["out.tif"] and path.read_bytes() == before


# --------------------------------------------------------------------------------------------------
# ENVI


def test_envi_round_trip(tmp_path):
  cube = _cube(np.float32, c=4)
  rasters.write_envi(tmp_path / "hsi.hdr", cube, _georef(), nodata=float("nan"))
  assert sorted(os.listdir(tmp_path)) == ["hsi.hdr", "hsi.img"]
  for opened in ("hsi.hdr", "hsi.img"):
    r = rasters.open_raster(tmp_path / opened)
    assert r.path == tmp_path / opened and r.shape == (H, W, 4) and r.dtype == np.float32
    np.testing.assert_array_equal(r.read(), cube)
    assert r.georef == _georef() and math.isnan(r.nodata)
  # GDAL reads the same grid from our header
  with rasterio.open(tmp_path / "hsi.img") as src:
    assert src.crs == UTM32 and src.transform.almost_equals(TRANSFORM)


def test_envi_round_trip_rotated_and_unreferenced(tmp_path):
  rotated = _georef(transform=TRANSFORM @ Affine.rotation(-30))
  rasters.write_envi(tmp_path / "rot.hdr", _cube(np.uint16), rotated)
  back = rasters.open_raster(tmp_path / "rot.hdr").georef
  rasters.check_same_georef(rotated, "written", back, "read")
  with rasterio.open(tmp_path / "rot.img") as src:
    assert src.transform.almost_equals(Affine(*back.transform))
  rasters.write_envi(tmp_path / "plain.hdr", _cube(np.uint16)[..., 0])
  r = rasters.open_raster(tmp_path / "plain.hdr")
  assert r.georef is None and r.nodata is None and r.shape == (H, W, 1)


@pytest.mark.parametrize("zone,epsg", [("32, North, WGS-84", 32632), ("33, South, WGS-84", 32733),
                                       ("15, North, North America 1983", 26915)])
def test_envi_utm_map_info_by_hand(tmp_path, zone, epsg):
  cube = _cube(np.float32, c=2)
  hdr = _write_envi_by_hand(
      tmp_path, cube, f"{{UTM, 1.5, 2.0, 664000.5, 5103999.0, 1.0, 2.0, {zone}, units=Meters}}")
  r = rasters.open_raster(hdr)
  # reference pixel (1.5, 2.0) is 1-based: 0.5 columns, 1 row from the outer corner
  assert r.georef == _georef(CRS.from_epsg(epsg), Affine(1.0, 0, 664000.0, 0, -2.0, 5104001.0))
  with rasterio.open(tmp_path / "scene.img") as src:  # GDAL's reading of the same header
    assert src.crs == CRS.from_epsg(epsg) and src.transform == Affine(*r.georef.transform)


def test_envi_esri_wkt_and_file_pairing(tmp_path):
  # ENVI itself writes ESRI WKT: the same CRS as EPSG:32632 for check_same_georef
  esri = UTM32.to_wkt(version="WKT1_ESRI")
  cube = _cube(np.float32, c=2)
  hdr = _write_envi_by_hand(tmp_path, cube, "{UTM, 1, 1, 664000.0, 5104000.0, 1.0, 1.0, 32, North}",
                            extra=f"coordinate system string = {{{esri}}}\n")
  r = rasters.open_raster(hdr)
  assert CRS.from_wkt(r.georef.crs_wkt) == UTM32
  rasters.check_same_georef(_georef(), "lidar.tif", r.georef, str(hdr))
  # <name>.hdr beside <name> (scene.img.hdr for scene.img) is found from the binary
  hdr.rename(tmp_path / "scene.img.hdr")
  np.testing.assert_array_equal(rasters.open_raster(tmp_path / "scene.img").read(), cube)
  np.testing.assert_array_equal(rasters.open_raster(tmp_path / "scene.img.hdr").read(), cube)
  (tmp_path / "scene.img.hdr").rename(hdr)
  (tmp_path / "scene.dat").write_bytes(b"")
  assert "scene.dat" in _one_line_error(hdr, rasters.open_raster, hdr)  # which binary?


@pytest.mark.parametrize("interleave,byteorder", [("bil", "<"), ("bip", ">"), ("bsq", ">")])
def test_read_rows_envi(tmp_path, interleave, byteorder):
  cube = _cube(np.uint16, c=3)
  hdr = _write_envi_by_hand(tmp_path, cube, "{Arbitrary, 1, 1, 0, 0, 1, 1}",
                            interleave=interleave, byteorder=byteorder,
                            extra="reflectance scale factor = 10000\n")
  r = rasters.open_raster(hdr)
  assert r.georef is None and r.dtype == np.dtype(np.uint16)  # native order, not scaled
  np.testing.assert_array_equal(r.read(), cube)
  for start, stop in [(0, 1), (1, 4), (4, 5), (3, 3)]:
    np.testing.assert_array_equal(r.read_rows(start, stop), cube[start:stop])


# --------------------------------------------------------------------------------------------------
# Grids


def test_check_same_georef():
  a = _georef()
  rasters.check_same_georef(a, "hsi.tif", _georef(), "lidar.tif")
  same_crs_other_wkt = rasters.GeoRef(UTM32.to_wkt(version="WKT2_2019"), a.transform, a.shape)
  rasters.check_same_georef(a, "hsi.tif", same_crs_other_wkt, "lidar.tif")
  rasters.check_same_georef(a, "hsi.tif", None, "lidar.tif")
  rasters.check_same_georef(None, "hsi.tif", a, "lidar.tif")
  nearly = _georef(transform=Affine(1.0, 0, 664000.0 + 1e-9, 0, -1.0, 5104000.0))
  rasters.check_same_georef(a, "hsi.tif", nearly, "lidar.tif")
  for other, what in [(_georef(crs=CRS.from_epsg(32633)), "CRS EPSG:32633"),
                      (_georef(transform=TRANSFORM @ Affine.translation(1, 0)), "+1 columns"),
                      (_georef(transform=Affine(2.0, 0, 664000.0, 0, -2.0, 5104000.0)),
                       "pixel size"),
                      (_georef(shape=(H, W + 1)), f"is {H}x{W + 1} pixels")]:
    with pytest.raises(UserError) as e:
      rasters.check_same_georef(a, "hsi.tif", other, "lidar.tif")
    msg = str(e.value)
    assert "hsi.tif" in msg and "lidar.tif" in msg and what in msg and "\n" not in msg, msg


# --------------------------------------------------------------------------------------------------
# Damaged and foreign files


def test_damaged_geotiffs(tmp_path, capfd):
  rasters.write_geotiff(tmp_path / "ok.tif", np.moveaxis(_cube(np.float32, c=8), -1, 0), _georef())
  data = (tmp_path / "ok.tif").read_bytes()
  cases = {"cut.tif": data[:len(data) // 2], "head.tif": data[:100],
           "garbage.tif": bytes(range(256)) * 4, "empty.tif": b"",
           "png.tif": b"\x89PNG\r\n\x1a\n" + bytes(200)}
  for name, content in cases.items():
    (tmp_path / name).write_bytes(content)
    msg = _one_line_error(tmp_path / name, rasters.open_raster, tmp_path / name)
    assert "GeoTIFF" in msg, msg
  assert capfd.readouterr().err == ""


def test_damaged_envi(tmp_path, capfd):
  rasters.write_envi(tmp_path / "ok.hdr", _cube(np.float32), _georef())
  header = (tmp_path / "ok.hdr").read_text()
  binary = (tmp_path / "ok.img").read_bytes()

  def case(name, hdr_text, img_bytes=None):
    (tmp_path / f"{name}.hdr").write_bytes(hdr_text if isinstance(hdr_text, bytes)
                                           else hdr_text.encode())
    if img_bytes is not None:
      (tmp_path / f"{name}.img").write_bytes(img_bytes)
    return tmp_path / f"{name}.hdr"

  cases = [(case("nobinary", header), "no ENVI binary"),
           (case("garbage", bytes(range(256)) * 2, binary), "cannot be read as ENVI"),
           (case("text", "hello\n", binary), "cannot be read as ENVI"),
           (case("complex", header.replace("data type = 4", "data type = 6"), binary), "complex"),
           (case("nolines", header.replace(f"lines = {H}\n", ""), binary), "'lines'"),
           (case("badlines", header.replace(f"lines = {H}", "lines = five"), binary), "five"),
           (case("short", header, binary[:-4]), "bytes"),
           (case("mapinfo", header.replace("{UTM, 1, 1,", "{UTM, one, 1,"), binary), "map info"),
           (case("order", header.replace("byte order = 0", "byte order = 2"), binary), "0 or 1"),
           (case("wkt", header.replace("= {PROJCS", "= {PROXCS"), binary), "WKT"),
           (case("nodata", header + "data ignore value = n/a\n", binary), "ignore value")]
  for hdr, what in cases:
    path = hdr.with_suffix(".img") if what == "bytes" else hdr
    msg = _one_line_error(path, rasters.open_raster, hdr)
    assert what in msg, msg
  (tmp_path / "alone.img").write_bytes(binary)
  _one_line_error(tmp_path / "alone.img", rasters.open_raster, tmp_path / "alone.img")
  assert capfd.readouterr().err == ""


def test_not_a_raster(tmp_path):
  _one_line_error(tmp_path / "missing.tif", rasters.open_raster, tmp_path / "missing.tif")
  _one_line_error(tmp_path, rasters.open_raster, tmp_path)
  (tmp_path / "x.png").write_bytes(b"")
  _one_line_error(tmp_path / "x.png", rasters.open_raster, tmp_path / "x.png")
