"""What evaluation and the maps cost against training, on an own scene of issue 32's size.

  python tools/eval_cost.py [--out DIR] [--warm-cache] train [--epochs 60] [--code CHECKOUT]
  python tools/eval_cost.py [--out DIR] [--warm-cache] ab --old CHECKOUT [--new CHECKOUT] [--rounds 2]

Outputs go to runs/eval-cost in the repository (--out to change it).

train: writes an own scene as GeoTIFFs with its dataset YAML (DIR/scene: 325 x 220 pixels, a 64-band
uint16 HSI, a 2-band LiDAR, 11 classes, about 60 % of the pixels labelled, the YAML's default
training settings: patch 11, batch 110, 40 training pixels per class), then trains DPMamba on it
with the train CLI (`--epochs` per stage, default 60) in DIR/run and reports the wall times of the
two stages, of the evaluation (metrics.json) and of the maps (log.jsonl's "maps" entry; for code
that writes none, the file times `ab` uses), and the ratio (evaluation + maps) / training. Appends to DIR/report.json.

ab: times `python -m dpmamba_jax.evaluate --workdir COPY --maps` of two checkouts on copies of
DIR/run (the trained run), alternately (old, new, old, new, ...), each in its own copy, and checks
that both wrote the same metrics (wall times aside) and the same maps. The evaluation's wall time
is metrics.json's; the maps' is from metrics.md's modification time to the comparison figure's (the
last file the maps write), the same measure for both sides.

Every timed command runs in its own child process with the checkout as its working folder and
PYTHONPATH, and compiles cold (an emptied DIR/xla-cache; --warm-cache: the user's cache). The
report has `uptime`'s load averages before and after each command (they count the command's own
threads), the share of the cores the command got (CPU time / wall time) and the CPU's name.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

HEIGHT, WIDTH, CLASSES = 325, 220, 11
HSI_BANDS, LIDAR_BANDS = 64, 2


def _load() -> str:
  """The 1, 5, 15-minute load averages, as `uptime` prints them."""
  return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  except OSError:
    return "unknown"
  fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
  model = fields.get("Model name", "unknown").strip()
  return f"{model}, {fields.get('CPU(s)', '?').strip()} cores"


def write_scene(folder: pathlib.Path) -> pathlib.Path:
  """The scene's GeoTIFFs, texts and YAML in `folder`; returns the YAML's path."""
  sys.path.insert(0, str(REPO))
  from dpmamba_jax.data import rasters, synthetic
  folder.mkdir(parents=True, exist_ok=True)
  cfg = synthetic.SyntheticConfig(height=HEIGHT, width=WIDTH, num_classes=CLASSES,
                                  bands=(HSI_BANDS,) + (1,) * LIDAR_BANDS, seed=5,
                                  parcel_area=400.0, unlabelled_fraction=0.3)
  cubes, labels = synthetic.generate(cfg)
  hsi = np.clip(np.round((cubes[0] - cubes[0].min()) * 400 + 100), 0, 65000).astype(np.uint16)
  lidar = np.concatenate(cubes[1:], axis=-1).astype(np.float32)  # a DSM and an intensity, say
  import rasterio.crs
  wkt = rasterio.crs.CRS.from_epsg(32632).to_wkt()  # UTM 32N, 1 m pixels (made up)
  g = rasters.GeoRef(wkt, (1.0, 0.0, 664000.0, 0.0, -1.0, 5104000.0), (HEIGHT, WIDTH))
  rasters.write_geotiff(folder / "hsi.tif", np.moveaxis(hsi, -1, 0), g)
  rasters.write_geotiff(folder / "lidar.tif", np.moveaxis(lidar, -1, 0), g)
  rasters.write_geotiff(folder / "gt.tif", labels.astype(np.uint8), g)
  names = [f"class {i + 1}" for i in range(CLASSES)]
  (folder / "scene.yaml").write_text(
      "name: eval-cost\n"
      "modalities:\n  - {name: HSI, file: hsi.tif}\n  - {name: LiDAR, file: lidar.tif}\n"
      f"labels: gt.tif\nclasses: [{', '.join(names)}]\n"
      f"class_texts: [{', '.join(f'An aerial image of {n}.' for n in names)}]\n")
  print(f"scene: {HEIGHT} x {WIDTH}, {HSI_BANDS} + {LIDAR_BANDS} bands, {CLASSES} classes, "
        f"{int((labels > 0).sum())} labelled pixels, in {folder}", flush=True)
  return folder / "scene.yaml"


def timed(code: pathlib.Path, args, log_path: pathlib.Path, cache: pathlib.Path | None) -> dict:
  """Runs `python -m ARGS` with `code` as working folder and PYTHONPATH; stdout and stderr to
  log_path; cache: a compile cache folder emptied first, and beside it the CPU kernels' folder
  (a new user's cold start: the kernels are built again; None: the user's own caches). Returns
  {wall_s, load_before, load_after, cores_used}: cores_used is the child's CPU time over its wall
  time, against the machine's cores (less when other work competes; the load averages count the
  command's own threads too)."""
  env = dict(os.environ, PYTHONPATH=str(code))
  if cache is not None:
    kernels = cache.with_name(cache.name + "-kernels")
    for folder in (cache, kernels):
      shutil.rmtree(folder, ignore_errors=True)
    env["DPMAMBA_XLA_CACHE_DIR"], env["DPMAMBA_KERNEL_DIR"] = str(cache), str(kernels)
  before = _load()
  r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.time()
  with open(log_path, "w") as f:
    rc = subprocess.call([sys.executable, "-m", *map(str, args)], cwd=code, env=env, stdout=f,
                         stderr=subprocess.STDOUT)
  wall = time.time() - t0
  r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
  if rc != 0:
    sys.stderr.write("".join(open(log_path).readlines()[-20:]))
    raise SystemExit(f"{' '.join(map(str, args))}: exit status {rc} (log: {log_path})")
  return {"wall_s": round(wall, 1), "load_before": before, "load_after": _load(),
          "cores_used": f"{cpu / wall:.2f} of {os.cpu_count()}"}


def _log_lines(workdir: pathlib.Path) -> list[str]:
  path = workdir / "log.jsonl"
  return path.read_text().splitlines() if path.is_file() else []


def maps_record(workdir: pathlib.Path, after: int = 0) -> float | None:
  """The wall_time_s of the last {"stage": "maps"} entry in log.jsonl past its first `after`
  lines (None: no such entry)."""
  wall = None
  for line in _log_lines(workdir)[after:]:
    try:
      entry = json.loads(line)
    except ValueError:
      continue
    if entry.get("stage") == "maps" and "wall_time_s" in entry:
      wall = float(entry["wall_time_s"])
  return wall


def maps_wall_from_files(workdir: pathlib.Path) -> float:
  """metrics.md's modification time to the newest comparison figure's: the maps' wall time."""
  figures = list(workdir.glob("comparison_*.png"))
  return max(f.stat().st_mtime for f in figures) - (workdir / "metrics.md").stat().st_mtime


def _append(out: pathlib.Path, entry: dict) -> None:
  path = out / "report.json"
  report = json.loads(path.read_text()) if path.is_file() else []
  report.append(entry)
  path.write_text(json.dumps(report, indent=1) + "\n")


def train(args) -> int:
  out, code = args.out, args.code.resolve()
  yaml_path = write_scene(out / "scene")
  run_dir = out / "run"
  if run_dir.exists():
    raise SystemExit(f"{run_dir}: exists; remove it to train again")
  t = timed(code, ["dpmamba_jax.train", "--dataset-file", yaml_path, "--workdir", run_dir,
                   "--epochs", args.epochs, *args.train_args], out / "train.log",
            None if args.warm_cache else out / "xla-cache")
  metrics = json.loads((run_dir / "metrics.json").read_text())
  walls = metrics["wall_time_s"]
  training = walls["pretrain"] + walls["distill"]
  maps_s = maps_record(run_dir)
  if maps_s is None:  # a checkout that does not record it
    maps_s = maps_wall_from_files(run_dir)
  entry = {"what": "train", "code": str(code), "epochs": args.epochs, "cpu": cpu_name(),
           "date": time.strftime("%Y-%m-%d"), "train_s": round(training, 1),
           "pretrain_s": round(walls["pretrain"], 1), "distill_s": round(walls["distill"], 1),
           "evaluate_s": round(walls["evaluate"], 1),
           "maps_s": round(maps_s, 1), **t}
  entry["ratio"] = round((walls["evaluate"] + maps_s) / training, 3)
  _append(out, entry)
  print(json.dumps(entry, indent=1))
  return 0


def _same_results(a: pathlib.Path, b: pathlib.Path) -> str:
  """'' when the two workdirs' metrics (wall times aside) and maps are equal; else what differs."""
  ma, mb = (json.loads((w / "metrics.json").read_text()) for w in (a, b))
  ma.pop("wall_time_s", None)
  mb.pop("wall_time_s", None)
  if ma != mb:
    return "metrics.json differs"
  names = sorted(p.name for p in (a / "maps").glob("*.npy"))
  if names != sorted(p.name for p in (b / "maps").glob("*.npy")):
    return "the map files differ"
  for n in names:
    if not np.array_equal(np.load(a / "maps" / n), np.load(b / "maps" / n)):
      return f"maps/{n} differs"
  return ""


def ab(args) -> int:
  out = args.out
  run_dir = out / "run"
  if not (run_dir / "metrics.json").is_file():
    raise SystemExit(f"{run_dir}: no trained run; run `python tools/eval_cost.py train` first")
  sides = (("old", args.old.resolve()), ("new", args.new.resolve()))
  train_walls = json.loads((run_dir / "metrics.json").read_text())["wall_time_s"]
  training = train_walls["pretrain"] + train_walls["distill"]
  done = []
  for i in range(args.rounds):
    for label, code in sides:
      w = out / "ab" / f"{label}{i}"
      if w.exists():
        shutil.rmtree(w)
      shutil.copytree(run_dir, w, ignore=shutil.ignore_patterns("maps", "comparison_*.png"))
      lines = len(_log_lines(w))  # the training's: its maps entry is not this command's
      t = timed(code, ["dpmamba_jax.evaluate", "--workdir", w, "--maps", *args.maps_args],
                out / "ab" / f"{label}{i}.log", None if args.warm_cache else out / "xla-cache")
      ev = json.loads((w / "metrics.json").read_text())["wall_time_s"]["evaluate"]
      maps_s = maps_wall_from_files(w)
      entry = {"what": "evaluate --maps", "side": label, "round": i, "code": str(code),
               "evaluate_s": round(ev, 1), "maps_s": round(maps_s, 1),
               "maps_record_s": maps_record(w, lines), "train_s": round(training, 1),
               "ratio": round((ev + maps_s) / training, 3), **t}
      print(json.dumps(entry), flush=True)
      done.append(w)
  diff = ""
  for w in done[1:]:
    diff = diff or _same_results(done[0], w)
  summary = {"what": "ab", "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
             "same_results": not diff, "difference": diff or None}
  for entry in [summary]:
    _append(out, entry)
  print(json.dumps(summary))
  return 0 if not diff else 1


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", type=pathlib.Path, default=REPO / "runs" / "eval-cost",
                 help="a folder for the scene, the run and report.json (default runs/eval-cost)")
  p.add_argument("--warm-cache", action="store_true",
                 help="use the user's XLA compile cache (default: each command compiles cold, "
                      "in --out's xla-cache emptied first, as a new user's first run does)")
  sub = p.add_subparsers(dest="what", required=True)
  t = sub.add_parser("train", help="write the scene, train on it, report the walls")
  t.add_argument("--epochs", type=int, default=60, help="epochs per stage (60)")
  t.add_argument("--code", type=pathlib.Path, default=REPO, help="the checkout to run (this one)")
  t.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                 help="more arguments for the train CLI (last)")
  a = sub.add_parser("ab", help="time evaluate --maps of two checkouts on copies of the run")
  a.add_argument("--old", type=pathlib.Path, required=True, help="the checkout before")
  a.add_argument("--new", type=pathlib.Path, default=REPO, help="the checkout after (this one)")
  a.add_argument("--rounds", type=int, default=2, help="old, new pairs (2)")
  a.add_argument("--maps-args", nargs=argparse.REMAINDER, default=[],
                 help="more arguments for evaluate (last)")
  args = p.parse_args()
  args.out = args.out.resolve()
  args.out.mkdir(parents=True, exist_ok=True)
  return train(args) if args.what == "train" else ab(args)


if __name__ == "__main__":
  raise SystemExit(main())
