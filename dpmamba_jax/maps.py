"""Classification maps: full scene (every pixel) and labelled pixels, as PNG / .npy / .mat.

On disk, maps hold 1-based class ids with 0 = unlabelled (the .mat key is `data`, as the
authors' predMap files). The predictions come from `inference.Predictor` (streamed in batches, so
the H*W patches are never all in memory); this module saves them, drawn by figures.py.
"""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
import scipy.io

from dpmamba_jax import figures
from dpmamba_jax import fileio
from dpmamba_jax import masks as masks_lib
from dpmamba_jax.figures import save_comparison, save_png
from dpmamba_jax.inference import Predictor

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
                   log=print, comparison: str | None = None) -> list[str]:
  """Full-scene and labelled-pixel maps of `model` for complete + every missing scenario.

  Files: <out_dir>/<which>_<scenario>_{full,labelled}.{png,npy,mat}, scenario "complete" or
  e.g. "without-HSI"; with `comparison`, also that PNG: ground truth | the full maps of every
  scenario side by side (figures.save_comparison). Returns the written paths.
  """
  spec = rd.spec
  predictor = Predictor.for_run(model, rd, batch)
  palette = tuple(spec.palette) if getattr(spec, "palette", None) else None
  scene = predictor.prepare_scene(rd.cubes)  # once for all scenarios
  written, panels = [], []
  for name, row in masks_lib.eval_scenarios(spec.modalities):
    pred = predictor.predict_scene(
        scene, rd.z, rd.height, row,
        desc=None if getattr(log, "quiet", False) else f"map {which} {name}")
    full, labelled = to_maps(pred, rd.labels, getattr(rd, "invalid", None))
    panels.append((panel_title(name), full))
    stem = f"{which}_{masks_lib.scenario_file_stem(name)}"
    written += save_map(out_dir, stem + "_full", full, spec.class_names, palette,
                        f"{spec.name} {which}, {name}: every pixel")
    written += save_map(out_dir, stem + "_labelled", labelled, spec.class_names, palette,
                        f"{spec.name} {which}, {name}: labelled pixels")
  gt = np.asarray(rd.labels)
  written += save_map(out_dir, "ground_truth", gt, spec.class_names, palette,
                      f"{spec.name} ground truth")
  log(f"maps: {len(written)} files in {out_dir}")
  if comparison:
    save_comparison(comparison, [("ground truth", gt)] + panels, spec.class_names, palette,
                    f"{spec.name} {which}")
    written.append(comparison)
    log(f"maps: side by side in {comparison}")
  return written
