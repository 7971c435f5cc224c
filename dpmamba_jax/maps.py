"""Classification maps: full scene (every pixel) and labelled pixels, as PNG / .npy / .mat.

On disk, maps hold 1-based class ids with 0 = unlabelled (the .mat key is `data`, as the
authors' predMap files). The predictions come from `predict.Predictor` (streamed in batches, so
the H*W patches are never all in memory); this module draws and saves them.
"""
from __future__ import annotations

import io
import os
from typing import Sequence

import matplotlib
import numpy as np
import scipy.io
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dpmamba_jax import fileio
from dpmamba_jax import masks as masks_lib
from dpmamba_jax.predict import Predictor

UNLABELLED_RGB = (0, 0, 0)


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
  """Distinct colours from matplotlib's tab20 (then hsv) when a dataset has no palette."""
  if num_classes <= 20:
    cols = [matplotlib.colormaps["tab20"](i) for i in range(num_classes)]
  else:
    cols = [matplotlib.colormaps["hsv"](i / num_classes) for i in range(num_classes)]
  return [tuple(int(round(255 * x)) for x in c[:3]) for c in cols]


def colorize(label_map: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
  """(H, W) 1-based map (0 = unlabelled) -> (H, W, 3) uint8 RGB; unlabelled is black."""
  lut = np.asarray([UNLABELLED_RGB] + [tuple(c) for c in palette], np.uint8)  # (C+1, 3)
  label_map = np.asarray(label_map)
  if label_map.size and (label_map.min() < 0 or label_map.max() >= len(lut)):
    raise ValueError(f"label map values outside 0..{len(lut) - 1}")
  return lut[label_map]


def save_png(path: str, label_map: np.ndarray, class_names: Sequence[str],
             palette: Sequence[Sequence[int]] | None = None, title: str = "") -> None:
  """PNG of a 1-based map with a legend of class names (matplotlib's Figure, no pyplot)."""
  palette = list(palette) if palette else default_palette(len(class_names))
  rgb = colorize(label_map, palette)
  h, w = label_map.shape
  # Scale so the longer side is ~8 in, plus room for the legend on the right.
  scale = 8.0 / max(h, w)
  fig_w, fig_h = max(w * scale, 2.0) + 2.6, max(h * scale, 2.5) + 0.6
  fig = Figure(figsize=(fig_w, fig_h), dpi=max(100, int(np.ceil(max(h, w) / 8.0))))
  ax = fig.add_axes([0.02, 0.02, (fig_w - 2.6) / fig_w - 0.02, 0.9])
  ax.imshow(rgb, interpolation="nearest")
  ax.set_axis_off()
  if title:
    ax.set_title(title, fontsize=9)
  handles = [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="black", linewidth=0.3, label=n)
             for n, c in zip(class_names, palette)]
  if (label_map == 0).any():
    handles.append(Patch(facecolor=np.asarray(UNLABELLED_RGB) / 255.0, edgecolor="black",
                         linewidth=0.3, label="unlabelled"))
  fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  fileio.write_bytes(path, buf.getvalue())


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


def to_maps(pred_full: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """0-based (H, W) predictions -> (full 1-based map, labelled-pixels map with 0 elsewhere)."""
  full = np.asarray(pred_full).astype(np.int32) + 1
  labelled = np.where(np.asarray(labels) > 0, full, 0)
  return full, labelled


def write_all_maps(rd, model, out_dir: str, *, batch: int = 512, which: str = "student",
                   log=print) -> list[str]:
  """Full-scene and labelled-pixel maps of `model` for complete + every missing scenario.

  Files: <out_dir>/<which>_<scenario>_{full,labelled}.{png,npy,mat}, scenario "complete" or
  e.g. "without-HSI". Returns the written paths.
  """
  spec = rd.spec
  predictor = Predictor.for_run(model, rd, batch)
  palette = tuple(spec.palette) if getattr(spec, "palette", None) else None
  scene = predictor.prepare_scene(rd.cubes)  # once for all scenarios
  written = []
  for name, row in masks_lib.eval_scenarios(spec.modalities):
    pred = predictor.predict_scene(
        scene, rd.z, rd.height, row,
        desc=None if getattr(log, "quiet", False) else f"map {which} {name}")
    full, labelled = to_maps(pred, rd.labels)
    stem = f"{which}_{masks_lib.scenario_file_stem(name)}"
    written += save_map(out_dir, stem + "_full", full, spec.class_names, palette,
                        f"{spec.name} {which}, {name}: every pixel")
    written += save_map(out_dir, stem + "_labelled", labelled, spec.class_names, palette,
                        f"{spec.name} {which}, {name}: labelled pixels")
  gt = np.asarray(rd.labels)
  written += save_map(out_dir, "ground_truth", gt, spec.class_names, palette,
                      f"{spec.name} ground truth")
  log(f"maps: {len(written)} files in {out_dir}")
  return written
