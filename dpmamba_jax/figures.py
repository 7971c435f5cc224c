"""Drawing class maps: colours, a one-map PNG with a legend, and the side-by-side comparison.

Pure drawing (numpy + matplotlib's Figure API, no pyplot, no model), so that every layer can
draw. Maps are (H, W) 1-based class ids with 0 = unlabelled, drawn black.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dpmamba_jax import fileio

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


def _legend_handles(class_names: Sequence[str], palette: Sequence[Sequence[int]],
                    unlabelled: bool) -> list[Patch]:
  """Legend patches of the classes (+ "unlabelled"); black edges keep the black patch visible."""
  handles = [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="black", linewidth=0.3, label=n)
             for n, c in zip(class_names, palette)]
  if unlabelled:
    handles.append(Patch(facecolor=np.asarray(UNLABELLED_RGB) / 255.0, edgecolor="black",
                         linewidth=0.3, label="unlabelled"))
  return handles


def _write_png(path: str, fig: Figure) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  fileio.write_bytes(path, buf.getvalue())


def save_png(path: str, label_map: np.ndarray, class_names: Sequence[str],
             palette: Sequence[Sequence[int]] | None = None, title: str = "") -> None:
  """PNG of a 1-based (H, W) map with a legend of class names (matplotlib's Figure, no pyplot)."""
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
  fig.legend(handles=_legend_handles(class_names, palette, bool((label_map == 0).any())),
             loc="center right", fontsize=8, frameon=False)
  _write_png(path, fig)


# Comparison layout, in inches (text sizes are in points, so inches keep them in proportion).
PANEL_IN = 4.0        # the longer side of each map
MIN_PANEL_IN = 0.8    # the shorter side, at least (very thin scenes)
GAP_IN = 0.2          # between panels, and around the figure
PANEL_TITLE_PT = 10
TITLE_PT = 12
LEGEND_PT = 9


def _extent_in(artist, renderer, dpi: float) -> tuple[float, float]:
  """(width, height) in inches of a drawn text or legend."""
  box = artist.get_window_extent(renderer)
  return box.width / dpi, box.height / dpi


def _measure(titles: Sequence[str], handles: Sequence[Patch], title: str, ncols: Sequence[int]
             ) -> tuple[float, tuple[float, float], dict[int, tuple[float, float]]]:
  """Sizes in inches: (widest panel title, figure title (w, h), {ncol: legend (w, h)})."""
  fig = Figure(dpi=72)
  renderer = FigureCanvasAgg(fig).get_renderer()
  title_w = max(_extent_in(fig.text(0, 0, t, fontsize=PANEL_TITLE_PT), renderer, 72)[0]
                for t in titles)
  suptitle = _extent_in(fig.text(0, 0, title, fontsize=TITLE_PT), renderer, 72) if title else (0, 0)
  legends = {}
  for n in ncols:
    leg = fig.legend(handles=handles, ncol=n, fontsize=LEGEND_PT, frameon=False)
    legends[n] = _extent_in(leg, renderer, 72)
    leg.remove()
  return title_w, suptitle, legends


def comparison_figure(panels: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str],
                      palette: Sequence[Sequence[int]] | None = None, title: str = "") -> Figure:
  """The maps side by side in one row, each titled, with one shared legend (see save_comparison).

  Args:
    panels: (panel title, (H, W) 1-based map with 0 = unlabelled), all of one shape.
  """
  if not panels:
    raise ValueError("save_comparison: no panels")
  maps = [np.asarray(m) for _, m in panels]
  titles = [str(t) for t, _ in panels]
  shapes = {m.shape for m in maps}
  if len(shapes) != 1 or maps[0].ndim != 2:
    raise ValueError(f"save_comparison: the maps must be 2-D and of one shape, "
                     f"got {sorted(shapes)}")
  palette = list(palette) if palette else default_palette(len(class_names))
  rgbs = [colorize(m, palette) for m in maps]
  h, w = maps[0].shape
  n = len(maps)
  handles = _legend_handles(class_names, palette, any(bool((m == 0).any()) for m in maps))

  scale = PANEL_IN / max(h, w)
  pw, ph = max(w * scale, MIN_PANEL_IN), max(h * scale, MIN_PANEL_IN)
  title_w, (suptitle_w, suptitle_h), legends = _measure(titles, handles, title,
                                                        range(1, len(handles) + 1))
  slot_w = max(pw, title_w + 0.1)  # a narrow map keeps its title on one line
  title_h = PANEL_TITLE_PT / 72 * 1.8  # the text and its pad above the axes
  row_w = n * slot_w + (n - 1) * GAP_IN
  row_h = title_h + ph
  top = GAP_IN + (suptitle_h + GAP_IN if title else 0)

  leg_w1, leg_h1 = legends[1]
  right = leg_h1 <= row_h  # one column fits beside the row (tall scenes); else below in columns
  if right:
    ncol = 1
    content_w = row_w + 2 * GAP_IN + leg_w1
    fig_h = top + row_h + GAP_IN
  else:
    widest = max(k for k, (lw, _) in legends.items() if lw <= max(row_w, leg_w1))
    rows = math.ceil(len(handles) / widest)
    ncol = math.ceil(len(handles) / rows)  # rows as full as the widest, columns balanced
    content_w = max(row_w, legends[ncol][0])
    fig_h = top + row_h + GAP_IN + legends[ncol][1] + GAP_IN
  fig_w = max(content_w, suptitle_w) + 2 * GAP_IN

  # At least one image pixel per map pixel, so that thin classes stay visible.
  dpi = max(100, int(math.ceil(max(w / pw, h / ph))))
  fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
  x0 = (fig_w - (content_w if right else row_w)) / 2  # left of the row: content centred
  y0 = fig_h - top - row_h  # bottom of the maps, inches from the figure's bottom
  for i, (rgb, t) in enumerate(zip(rgbs, titles)):
    left = x0 + i * (slot_w + GAP_IN) + (slot_w - pw) / 2
    ax = fig.add_axes([left / fig_w, y0 / fig_h, pw / fig_w, ph / fig_h])
    ax.imshow(rgb, interpolation="nearest", aspect="auto")  # the axes has the map's aspect
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
      spine.set_linewidth(0.5)
    ax.set_title(t, fontsize=PANEL_TITLE_PT, pad=PANEL_TITLE_PT * 0.5)
  if title:
    fig.text(0.5, 1 - GAP_IN / fig_h, title, fontsize=TITLE_PT, ha="center", va="top")
  if right:
    anchor = ((x0 + row_w + 2 * GAP_IN) / fig_w, (y0 + ph / 2) / fig_h)
    loc = "center left"
  else:
    anchor = (0.5, (y0 - GAP_IN) / fig_h)
    loc = "upper center"
  fig.legend(handles=handles, ncol=ncol, fontsize=LEGEND_PT, frameon=False, loc=loc,
             bbox_to_anchor=anchor, borderaxespad=0.0)
  return fig


def save_comparison(path: str, panels: Sequence[tuple[str, np.ndarray]],
                    class_names: Sequence[str], palette: Sequence[Sequence[int]] | None = None,
                    title: str = "") -> None:
  """The paper's map figure as a PNG, written atomically: the maps in one row (e.g. ground
  truth | complete | each missing-modality scenario), each titled, and one legend of the class
  names (+ "unlabelled" when any map has 0) beside the row when it fits there, else below.

  Args:
    panels: (panel title, (H, W) 1-based map with 0 = unlabelled), all of one shape.
    class_names: C names; palette: C RGB triples 0..255 (default_palette when None).
  """
  _write_png(path, comparison_figure(panels, class_names, palette, title))
