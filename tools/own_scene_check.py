"""End-to-end check of the own-scene path, as a user would run it, with wall time and peak RSS.

  python tools/own_scene_check.py trento --data-dir ../shared/data/trento-semireal
  python tools/own_scene_check.py memory

Outputs go to runs/own-scene-check/{trento,memory} in the repository (--out to change it).

trento: writes a GeoTIFF copy of a Trento-layout folder (HSI_data / LiDAR_data / All_Label) with a
made-up CRS (EPSG:32632, 1 m pixels), a dataset YAML and texts.txt; trains on the YAML
(`--epochs`, default 2); runs `predict` complete, --missing LiDAR, --missing HSI; checks each
output's CRS, transform, shape and class range and compares it with the run's maps and with
metrics.json on the run's test pixels. Exit status 1 on any difference.

memory: a Houston-sized scene (349 x 1905, 144-band uint16 HSI, 1-band LiDAR, 15 classes, PCA 48,
P 11) and a 120-row crop of it as GeoTIFFs; a model trained 1 epoch per stage on the crop (the
default model size); `predict --missing LiDAR` on both; reports wall time and peak RSS, and
checks that the two maps agree on the rows the crop's edge does not reach.

Every command runs in its own child process; its peak RSS is that child's ru_maxrss.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# A child that runs the command and reports its own children's peak RSS (KiB on Linux).
_MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
            "file=sys.stderr); sys.exit(rc)")


def run(label: str, *args) -> dict:
  """Runs `python -m ...args` measured; returns {label, wall_s, peak_rss_mb}."""
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, *map(str, args)],
                        cwd=REPO, stderr=subprocess.PIPE, text=True)
  wall = time.time() - t0
  lines = proc.stderr.strip().splitlines()
  if proc.returncode != 0:
    sys.stderr.write("\n".join(lines[-20:]) + "\n")
    raise SystemExit(f"{label}: exit status {proc.returncode}")
  rss = int(lines[-1].split()[1]) / 1024.0
  out = {"label": label, "wall_s": round(wall, 1), "peak_rss_mb": round(rss)}
  print(f"{label}: {wall:.1f} s, peak RSS {rss:,.0f} MB", flush=True)
  return out


def _grid(shape, pixel: float):
  from scene_files import crs_wkt
  from dpmamba_jax.data import rasters
  return rasters.GeoRef(crs_wkt(), (pixel, 0.0, 664000.0, 0.0, -pixel, 5104000.0), tuple(shape))


def _out_dir(args) -> pathlib.Path:
  """--out as an absolute path (the children run in the repository root)."""
  if args.out is None:
    return REPO / "runs" / "own-scene-check" / args.what
  return pathlib.Path(args.out).resolve()


def trento(args) -> int:
  from dpmamba_jax.data import io, rasters
  from dpmamba_jax.text import texts as texts_lib
  out = _out_dir(args)
  scene_dir, run_dir = out / "scene", out / "run"
  scene_dir.mkdir(parents=True, exist_ok=True)
  scene = io.load_scene("trento", args.data_dir)
  raw = [io.read_array(p.split(":")[0])[0] for p in scene.files]  # the files' own dtypes
  g = _grid(scene.shape, 1.0)
  rasters.write_geotiff(scene_dir / "hsi.tif", np.moveaxis(raw[0], -1, 0), g)
  rasters.write_geotiff(scene_dir / "dsm.tif", np.asarray(raw[1], np.float32), g)
  rasters.write_geotiff(scene_dir / "gt.tif", np.asarray(raw[2], np.uint8), g)
  (scene_dir / "texts.txt").write_text("\n".join(texts_lib.class_texts("trento")) + "\n")
  (scene_dir / "trento.yaml").write_text(
      "name: trento-tif\n"
      "modalities:\n  - name: HSI\n    file: hsi.tif\n  - name: LiDAR\n    file: dsm.tif\n"
      "labels: gt.tif\n"
      "classes: [Apple trees, Buildings, Ground, Woods, Vineyard, Roads]\n"
      "class_texts: texts.txt\n"
      "train:\n  patch_size: 15\n  batch_size: 120\n  train_per_class: 40\n")
  yaml_path = scene_dir / "trento.yaml"
  report = [run("train", "-m", "dpmamba_jax.train", "--dataset-file", yaml_path,
                "--workdir", run_dir, "--epochs", args.epochs, "--quiet")]
  cases = (("complete", [], "student_complete_full.npy", "complete"),
           ("without-LiDAR", ["--missing", "LiDAR"], "student_without-LiDAR_full.npy",
            "without:LiDAR"),
           ("without-HSI", ["--missing", "HSI"], "student_without-HSI_full.npy", "without:HSI"))
  import rasterio
  gt = np.asarray(raw[2])
  test = np.load(run_dir / "split.npz")["test_idx"]
  metrics = json.loads((run_dir / "metrics.json").read_text())["student"]
  ok = True
  for name, extra, ref, scenario in cases:
    tif = run_dir / f"predict_{name}.tif"
    report.append(run(f"predict {name}", "-m", "dpmamba_jax.predict", "--model",
                      run_dir / "student", "--input", yaml_path, "--out", tif, "--force",
                      "--quiet", *extra))
    with rasterio.open(tif) as src:
      ids = src.read(1)
      same_grid = (src.crs == rasterio.crs.CRS.from_wkt(g.crs_wkt)
                   and tuple(src.transform)[:6] == g.transform and ids.shape == gt.shape)
    maps = np.load(run_dir / "maps" / ref)
    oa = float(np.mean(ids.ravel()[test] == gt.ravel()[test]) * 100)
    line = (f"{name}: grid {'kept' if same_grid else 'CHANGED'}, classes {ids.min()}..{ids.max()}, "
            f"equal to maps/{ref} on {np.mean(ids == maps) * 100:.3f}% of pixels, OA on the "
            f"{test.size} test pixels {oa:.2f}% (metrics.json {metrics[scenario]['OA']:.2f}%)")
    print(line)
    ok &= (same_grid and ids.min() >= 1 and ids.max() <= 6 and bool((ids == maps).all())
           and abs(oa - metrics[scenario]["OA"]) < 0.005)
    report[-1]["check"] = line
  (out / "report.json").write_text(json.dumps(report, indent=1))
  print("all checks passed" if ok else "CHECK FAILED")
  return 0 if ok else 1


def memory(args) -> int:
  from dpmamba_jax.data import rasters, synthetic
  out = _out_dir(args)
  cfg = synthetic.SyntheticConfig(height=349, width=1905, num_classes=15, bands=(144, 1), seed=3,
                                  parcel_area=300.0)
  (hsi, lidar), labels = synthetic.generate(cfg)
  hsi = np.clip(np.round((hsi - hsi.min()) * 400 + 100), 0, 65000).astype(np.uint16)
  classes = [f"class{i + 1}" for i in range(15)]
  for name, rows in (("full", 349), ("crop", 120)):
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    g = _grid((rows, 1905), 2.0)
    rasters.write_geotiff(d / "hsi.tif", np.moveaxis(hsi[:rows], -1, 0), g)
    rasters.write_geotiff(d / "lidar.tif", lidar[:rows, :, 0].astype(np.float32), g)
    rasters.write_geotiff(d / "gt.tif", labels[:rows].astype(np.uint8), g)
    (d / "scene.yaml").write_text(
        f"name: houston-size-{name}\n"
        "modalities:\n  - {name: HSI, file: hsi.tif, pca: 48}\n  - {name: LiDAR, file: lidar.tif}\n"
        f"labels: gt.tif\nclasses: [{', '.join(classes)}]\n"
        f"class_texts: [{', '.join(f'An aerial image of {c}.' for c in classes)}]\n"
        "train: {patch_size: 11, batch_size: 150, train_per_class: 40}\n")
  run_dir = out / "run"
  report = [run("train (crop, 1 epoch)", "-m", "dpmamba_jax.train", "--dataset-file",
                out / "crop" / "scene.yaml", "--workdir", run_dir, "--epochs", 1, "--quiet",
                "--set", "eval_subsample=1000", "--set", "maps=false")]
  import rasterio
  maps = {}
  for name in ("crop", "full"):
    tif = out / f"{name}.tif"
    report.append(run(f"predict {name} ({'120' if name == 'crop' else '349'} x 1905)", "-m",
                      "dpmamba_jax.predict", "--model", run_dir / "student", "--input",
                      out / name / "scene.yaml", "--out", tif, "--missing", "LiDAR", "--force",
                      "--quiet"))
    with rasterio.open(tif) as src:
      maps[name] = src.read(1)
  edge = 120 - 11 // 2  # rows whose patches do not reach the crop's mirrored edge
  same = bool((maps["crop"][:edge] == maps["full"][:edge]).all())
  print(f"crop and full scene maps agree on the first {edge} rows: {same}")
  (out / "report.json").write_text(json.dumps(report, indent=1))
  return 0 if same else 1


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="what", required=True)
  t = sub.add_parser("trento", help="GeoTIFF Trento: train, predict, compare")
  t.add_argument("--data-dir", required=True, help="a Trento-layout folder")
  t.add_argument("--out", help="a folder for the files and runs "
                                 "(default: runs/own-scene-check/trento in the repository)")
  t.add_argument("--epochs", type=int, default=2)
  m = sub.add_parser("memory", help="predict's peak RSS on a Houston-sized scene")
  m.add_argument("--out", help="a folder for the files and runs "
                                 "(default: runs/own-scene-check/memory in the repository)")
  args = p.parse_args()
  return trento(args) if args.what == "trento" else memory(args)


if __name__ == "__main__":
  raise SystemExit(main())
