"""Small georeferenced scenes on disk for the own-data tests: GeoTIFF and ENVI files with a CRS
and transform, and the dataset YAML a user would write for them."""
from __future__ import annotations

import pathlib

import numpy as np
import rasterio.crs
import yaml

from dpmamba_jax.data import rasters
from dpmamba_jax.data import synthetic

CRS_WKT = None  # filled on first use: EPSG:32632 (UTM 32N, the Trento zone)
TRANSFORM = (2.0, 0.0, 664000.0, 0.0, -2.0, 5104000.0)  # 2 m pixels
CLASSES = ["Grass", "Trees", "Buildings", "Roads", "Bare soil", "Water"]
TEXTS = [f"An aerial image of {c.lower()}." for c in CLASSES]
HSI_BANDS = 8


def crs_wkt() -> str:
  global CRS_WKT  # computed once: rasterio's WKT of EPSG:32632
  if CRS_WKT is None:
    CRS_WKT = rasterio.crs.CRS.from_epsg(32632).to_wkt()
  return CRS_WKT


def georef(shape, transform=TRANSFORM, wkt=None) -> rasters.GeoRef:
  return rasters.GeoRef(crs_wkt=wkt or crs_wkt(), transform=tuple(transform), shape=tuple(shape))


def make_arrays(height: int = 24, width: int = 30, seed: int = 2, hsi_bands: int = HSI_BANDS):
  """(HSI (H, W, hsi_bands) uint16 reflectance-like, LiDAR (H, W) float32, labels (H, W)
  uint8)."""
  cfg = synthetic.SyntheticConfig(height=height, width=width, num_classes=len(CLASSES),
                                  bands=(hsi_bands, 1), seed=seed, parcel_area=30.0,
                                  unlabelled_fraction=0.1)
  (hsi, lidar), labels = synthetic.generate(cfg)
  hsi = np.clip(np.round((hsi - hsi.min()) * 400.0 + 100.0), 0, 65000).astype(np.uint16)
  return hsi, np.asarray(lidar[..., 0], np.float32), np.asarray(labels, np.uint8)


def write_scene(folder, *, height: int = 24, width: int = 30, seed: int = 2,
                lidar_format: str = "envi", hsi_nodata=None, nodata_box=None, hsi_pca=None,
                yaml_extra=None, train=None, hsi_bands: int = HSI_BANDS) -> pathlib.Path:
  """Writes hsi.tif (GeoTIFF), lidar.hdr/.img (ENVI; or lidar.tif), gt.tif and scene.yaml into
  `folder`; returns the YAML's path.

  nodata_box: (r0, r1, c0, c1) pixels of the HSI set to `hsi_nodata` (the file's nodata value);
  hsi_pca: the HSI's `pca:` components in the YAML.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  hsi, lidar, labels = make_arrays(height, width, seed, hsi_bands)
  if nodata_box is not None:
    r0, r1, c0, c1 = nodata_box
    hsi[r0:r1, c0:c1] = hsi_nodata
  g = georef((height, width))
  rasters.write_geotiff(folder / "hsi.tif", np.moveaxis(hsi, -1, 0), g, nodata=hsi_nodata)
  if lidar_format == "envi":
    rasters.write_envi(folder / "lidar.hdr", lidar[..., None], g)
    lidar_name = "lidar.hdr"
  else:
    rasters.write_geotiff(folder / "lidar.tif", lidar, g)
    lidar_name = "lidar.tif"
  rasters.write_geotiff(folder / "gt.tif", labels, g)
  (folder / "texts.txt").write_text("\n".join(TEXTS) + "\n")
  doc = {"name": "testscene",
         "modalities": [{"name": "HSI", "file": "hsi.tif",
                         **({"pca": hsi_pca} if hsi_pca else {})},
                        {"name": "LiDAR", "file": lidar_name}],
         "labels": "gt.tif", "classes": list(CLASSES), "class_texts": "texts.txt",
         "train": train or {"patch_size": 3, "batch_size": 24, "train_per_class": 8}}
  doc.update(yaml_extra or {})
  path = folder / "scene.yaml"
  path.write_text(yaml.safe_dump(doc, sort_keys=False))
  return path
