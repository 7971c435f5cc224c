"""Classification maps: full scene (every pixel) and labelled pixels, as PNG / .npy / .mat.

On disk, maps hold 1-based class ids with 0 = unlabelled (the .mat key is `data`, as the
authors' predMap files). The predictions come from `inference.Predictor` (streamed in batches, so
the H*W patches are never all in memory); this module saves them, drawn by figures.py. After an
evaluation, a model's test pixels are not classified again: `write_maps` takes the evaluation's
predictions and classifies the other pixels (those with data) only.
"""
from __future__ import annotations

import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import scipy.io
from tqdm import tqdm

from dpmamba_jax import figures
from dpmamba_jax import fileio
from dpmamba_jax import masks as masks_lib
from dpmamba_jax.figures import save_comparison, save_png
from dpmamba_jax.inference import Predictor, pixels_to_classify

# The drawing lives in figures.py (below predict, for the predict command); kept importable here.
UNLABELLED_RGB = figures.UNLABELLED_RGB
colorize = figures.colorize
default_palette = figures.default_palette


def save_npy(path: str, label_map: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, np.asarray(label_map))
  fileio.write_bytes(path, buf.getvalue())


def save_mat(path: str, label_map: np.ndarray) -> None:
  """MATLAB file with key `data`: the 1-based map, 0 = unlabelled."""
  buf = io.BytesIO()
  scipy.io.savemat(buf, {"data": np.asarray(label_map)})
  fileio.write_bytes(path, buf.getvalue())


def save_map(out_dir: str, stem: str, label_map: np.ndarray, class_names: Sequence[str],
             palette=None, title: str = "") -> list[str]:
  """Writes <stem>.png, .npy and .mat; returns the paths."""
  label_map = np.asarray(label_map)
  dtype = np.uint8 if label_map.max(initial=0) < 256 else np.int32
  label_map = label_map.astype(dtype)
  paths = [os.path.join(out_dir, stem + ext) for ext in (".png", ".npy", ".mat")]
  save_png(paths[0], label_map, class_names, palette, title)
  save_npy(paths[1], label_map)
  save_mat(paths[2], label_map)
  return paths


def to_maps(pred_full: np.ndarray, labels: np.ndarray,
            invalid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """0-based (H, W) predictions -> (full 1-based map, labelled-pixels map with 0 elsewhere);
  pixels without data (`invalid`, (H, W) bool) are 0 in both, as `predict` writes them."""
  full = np.asarray(pred_full).astype(np.int32) + 1
  if invalid is not None:
    full = np.where(invalid, 0, full)
  labelled = np.where(np.asarray(labels) > 0, full, 0)
  return full, labelled


def panel_title(scenario: str) -> str:
  """A scenario name as a figure panel title: "without:HSI+SAR" -> "without HSI+SAR"."""
  return scenario.replace("without:", "without ", 1)


def write_all_maps(rd, model, out_dir: str, *, batch: int = 512, which: str = "student",
                   log=print, comparison: str | None = None, known: tuple | None = None,
                   progress=None) -> list[str]:
  """Full-scene and labelled-pixel maps of `model` for complete + every missing scenario.

  Files: <out_dir>/<which>_<scenario>_{full,labelled}.{png,npy,mat}, scenario "complete" or
  e.g. "without-HSI", and ground_truth.{png,npy,mat}; with `comparison`, also that PNG: ground
  truth | the full maps of every scenario side by side (figures.save_comparison). Returns the
  written paths.

  known: (test_idx (N,), {scenario: (N,) int32 predictions}) that evaluation made of this model
  (`metrics.evaluate_run`'s predictions): those pixels are not classified again, only the rest
  (`inference.pixels_to_classify`), which gives the maps of classifying every pixel. Pixels
  without data (`rd.invalid`) are 0 in the maps and not classified. progress: a tqdm-like bar
  advanced by the pixels classified (None: a bar per scenario unless `log` is quiet).
  """
  spec = rd.spec
  predictor = Predictor.for_run(model, rd, batch)
  palette = tuple(spec.palette) if getattr(spec, "palette", None) else None
  scene = predictor.prepare_scene(rd.cubes)  # once for all scenarios
  invalid = getattr(rd, "invalid", None)
  gt = np.asarray(rd.labels)
  # The files are drawn and written in a thread while the next scenario is classified: the
  # drawing is on one core, which would leave the other idle.
  with ThreadPoolExecutor(1, thread_name_prefix="maps") as writer:
    ground_truth = writer.submit(save_map, out_dir, "ground_truth", gt, spec.class_names,
                                 palette, f"{spec.name} ground truth")
    files, panels = [], []
    for name, row in masks_lib.eval_scenarios(spec.modalities):
      pred = predictor.predict_scene(
          scene, rd.z, rd.height, row, progress=progress, skip=invalid,
          known=None if known is None else (known[0], known[1][name]),
          desc=None if getattr(log, "quiet", False) else f"map {which} {name}")
      full, labelled = to_maps(pred, rd.labels, invalid)
      panels.append((panel_title(name), full))
      stem = f"{which}_{masks_lib.scenario_file_stem(name)}"
      files.append(writer.submit(save_map, out_dir, stem + "_full", full, spec.class_names,
                                 palette, f"{spec.name} {which}, {name}: every pixel"))
      files.append(writer.submit(save_map, out_dir, stem + "_labelled", labelled,
                                 spec.class_names, palette,
                                 f"{spec.name} {which}, {name}: labelled pixels"))
    written = [path for f in files + [ground_truth] for path in f.result()]
  log(f"maps: {len(written)} files in {out_dir}")
  if comparison:
    save_comparison(comparison, [("ground truth", gt)] + panels, spec.class_names, palette,
                    f"{spec.name} {which}")
    written.append(comparison)
    log(f"maps: side by side in {comparison}")
  return written


def maps_models(scored: Sequence, which) -> list:
  """The scored models (method.Scored, the method's order) whose maps the `maps` setting draws:
  True -> the first (the method's own model: DPMamba's student), "all" -> every one, False ->
  none."""
  if which == "all":
    return list(scored)
  return list(scored[:1]) if which else []


def write_maps(rd, workdir: str, entries: Sequence[tuple], *, batch: int = 512, log=print,
               predictions: dict | None = None) -> dict:
  """The maps of several models of a run, into <workdir>/maps, with one progress bar (with its
  ETA) over every pixel they classify and a log line when they start and when they end.

  entries: (key, model) pairs, e.g. ("student", the student); each model's maps are
  `write_all_maps` with the comparison figure <workdir>/comparison_<key>.png. predictions:
  `metrics.evaluate_run`'s, {key: (test_idx, {scenario: predictions})}: a model's test pixels
  are reused, not classified again.

  Returns the log.jsonl record {"stage": "maps", "models": [keys], "patches": pixels classified,
  "reused": pixels taken from the evaluation, "wall_time_s": seconds}.
  """
  t0 = time.time()
  predictions = predictions or {}
  shape = (rd.height, rd.width)
  invalid = getattr(rd, "invalid", None)
  n_scenarios = len(masks_lib.eval_scenarios(rd.spec.modalities))
  todo = {key: pixels_to_classify(shape, predictions[key][0] if key in predictions else None,
                                  invalid).size
          for key, _ in entries}
  total = n_scenarios * sum(todo.values())
  reused = n_scenarios * sum(int(predictions[k][0].size) for k, _ in entries if k in predictions)
  keys = [k for k, _ in entries]
  log(f"maps of the {', '.join(keys)}: {total:,} patches to classify "
      f"({n_scenarios} scenarios; {reused:,} reused from the evaluation)")
  out_dir = os.path.join(workdir, "maps")
  bar = tqdm(total=total, desc="maps", unit="patch", unit_scale=True, mininterval=1.0,
             file=sys.stderr, dynamic_ncols=True, disable=getattr(log, "quiet", False))
  try:
    for key, model in entries:
      write_all_maps(rd, model, out_dir, batch=batch, which=key, log=log,
                     comparison=os.path.join(workdir, f"comparison_{key}.png"),
                     known=predictions.get(key), progress=bar)
  finally:
    bar.close()
  wall = time.time() - t0
  log(f"maps: {wall:.1f} s")
  return {"stage": "maps", "models": keys, "patches": int(total), "reused": int(reused),
          "wall_time_s": float(wall)}


MARKER = os.path.join("maps", ".complete")  # in a workdir: the models whose maps are complete


def complete_maps(workdir: str, first: str) -> set[str]:
  """The scored-model keys whose maps in <workdir>/maps are complete (MARKER, one key a line;
  an empty marker, as older runs wrote it, stands for `first`: the method's own model)."""
  path = os.path.join(workdir, MARKER)
  try:
    with open(path, encoding="utf-8") as f:
      keys = {line.strip() for line in f if line.strip()}
  except (OSError, UnicodeDecodeError):
    return set()
  return keys or {first}


def mark_complete(workdir: str, keys: Sequence[str]) -> None:
  """Records `keys` as the models whose maps are complete (none: removes the marker)."""
  path = os.path.join(workdir, MARKER)
  if keys:
    fileio.write_text(path, "".join(f"{k}\n" for k in keys))
  elif os.path.isfile(path):
    os.remove(path)

