"""Tests for maps.py: colours, PNG/.npy/.mat files; streamed full-scene prediction (predict.py)."""
import errno
import os
import types

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
import scipy.io
from flax import nnx
from PIL import Image

from dpmamba_jax import data, figures, inference, losses, maps, masks
from dpmamba_jax import metrics as metrics_lib
from dpmamba_jax.model import DPMamba, ModelConfig
from dpmamba_jax.inference import Predictor


def test_colorize_and_default_palette():
  pal = [(255, 0, 0), (0, 255, 0)]
  rgb = maps.colorize(np.array([[0, 1], [2, 1]]), pal)
  np.testing.assert_array_equal(rgb[0, 0], [0, 0, 0])
  np.testing.assert_array_equal(rgb[0, 1], [255, 0, 0])
  np.testing.assert_array_equal(rgb[1, 0], [0, 255, 0])
  for n in (6, 25):
    p = maps.default_palette(n)
    assert len(p) == n and len(set(p)) == n


def test_to_maps_one_based():
  pred = np.array([[0, 2], [1, 1]])
  labels = np.array([[3, 0], [0, 2]])
  full, lab = maps.to_maps(pred, labels)
  np.testing.assert_array_equal(full, [[1, 3], [2, 2]])
  np.testing.assert_array_equal(lab, [[1, 0], [0, 2]])


def test_save_map_files(tmp_path):
  rng = np.random.default_rng(0)
  m = rng.integers(0, 4, size=(30, 50))
  paths = maps.save_map(str(tmp_path), "student_without-HSI_full", m, ["a", "b", "c"],
                        [(200, 0, 0), (0, 200, 0), (0, 0, 200)], title="t")
  assert [os.path.basename(p) for p in paths] == [
      "student_without-HSI_full.png", "student_without-HSI_full.npy",
      "student_without-HSI_full.mat"]
  np.testing.assert_array_equal(np.load(paths[1]), m)
  np.testing.assert_array_equal(scipy.io.loadmat(paths[2])["data"], m)
  img = matplotlib.image.imread(paths[0])
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > img.shape[0]  # legend room
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


@pytest.mark.slow
def test_predict_scene_streams_every_pixel(monkeypatch):
  h, w, p = 7, 9, 3
  cfg = ModelConfig.tiny(bands=(3, 2), patch_size=p, depth=1, hidden=8, out_dim=8, prompts=True)
  rng = np.random.default_rng(0)
  cubes = [jnp.asarray(c) for c in data.pad_cubes(
      [rng.normal(size=(h, w, b)).astype(np.float32) for b in cfg.bands], p)]
  z = jnp.asarray(rng.normal(size=(4, cfg.out_dim)).astype(np.float32))
  model = DPMamba(cfg, rngs=nnx.Rngs(0))
  inference._programs.cache_clear()  # Predictors of equal model graphs share programs
  predictor = Predictor(model, width=w, patch_size=p, batch=16, max_calls=1)
  calls = []
  real_batch = predictor.predict_batch

  def recording_batch(scene, z, idx, mask):
    calls.append(int(idx.shape[0]))
    return real_batch(scene, z, idx, mask)

  monkeypatch.setattr(predictor, "predict_batch", recording_batch)
  out = predictor.predict_scene(cubes, z, h, None)
  assert out.shape == (7, 9)
  # raster order: the model's own eval forward of every pixel, in one batch
  idx = jnp.arange(h * w, dtype=jnp.int32)
  xs = [data.gather_patches(c, idx, w, p) for c in cubes]
  np.testing.assert_array_equal(out.ravel(), np.asarray(losses.predict(model(xs, None), z)))
  assert len(set(out.ravel().tolist())) > 1  # not a constant map
  assert set(calls) == {16} and len(calls) == 4  # fixed batch, last one padded
  assert predictor.program._cache_size() == 1


PALETTE3 = [(200, 30, 30), (30, 160, 30), (40, 40, 220)]


def _png_rgb(path) -> np.ndarray:
  """(H, W, 3) uint8 pixels of a PNG."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _count_colour(rgb: np.ndarray, colour) -> int:
  return int(np.all(rgb == np.asarray(colour, np.uint8), axis=-1).sum())


def test_save_comparison_panels_and_legend(tmp_path):
  rng = np.random.default_rng(0)
  m = rng.integers(1, 3, size=(40, 60))  # classes 1 and 2 only: class 3's colour is the legend's
  gt = np.where(rng.random(m.shape) < 0.5, m, 0)
  sizes = {}
  for n in (2, 4):
    path = str(tmp_path / f"cmp{n}.png")
    panels = [("ground truth", gt)] + [(f"scenario {i}", m) for i in range(n - 1)]
    figures.save_comparison(path, panels, ["a", "b", "c"], PALETTE3, title="toy student")
    rgb = _png_rgb(path)
    sizes[n] = rgb.shape[:2]
    for colour in PALETTE3:
      assert _count_colour(rgb, colour) >= 20, (n, colour)
  assert sizes[4][1] > sizes[2][1] * 1.5 and sizes[4][0] == sizes[2][0]  # one row, wider
  assert maps.save_comparison is figures.save_comparison
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_comparison_legend_names_unlabelled_only_when_present():
  m = np.ones((10, 12), np.int32)
  labels = lambda fig: [t.get_text() for t in fig.legends[0].get_texts()]
  fig = figures.comparison_figure([("complete", m), ("without HSI", m)], ["a", "b"])
  assert labels(fig) == ["a", "b"] and len(fig.legends) == 1
  fig = figures.comparison_figure([("ground truth", m * 0), ("complete", m)], ["a", "b"])
  assert labels(fig) == ["a", "b", "unlabelled"]
  assert [ax.get_title() for ax in fig.axes] == ["ground truth", "complete"]
  with pytest.raises(ValueError, match="one shape"):
    figures.comparison_figure([("a", m), ("b", m[:5])], ["a", "b"])


@pytest.mark.parametrize("shape", [(166, 600), (600, 166)])
def test_comparison_keeps_every_map_pixel(tmp_path, shape):
  """Trento-wide and tall scenes: each panel gets >= 1 image pixel per map pixel, and the
  legend (below the wide row, beside the tall one) stays inside the image."""
  h, w = shape
  yy, xx = np.mgrid[:h, :w]
  m = (xx // 50 + yy // 50) % 3 + 1
  path = str(tmp_path / "cmp.png")
  names = ["Apple trees", "Buildings", "Ground"]
  figures.save_comparison(path, [("ground truth", m), ("complete", m), ("without HSI", m),
                                 ("without LiDAR", m)], names, PALETTE3)
  rgb = _png_rgb(path)
  assert rgb.shape[0] >= h and rgb.shape[1] >= 4 * w
  fig = figures.comparison_figure([("complete", m)] * 4, names, PALETTE3)
  fig.canvas.draw()
  box = fig.legends[0].get_window_extent()
  assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
  maps_top = min(ax.get_window_extent().y0 for ax in fig.axes)
  maps_right = max(ax.get_window_extent().x1 for ax in fig.axes)
  assert box.y1 <= maps_top or box.x0 >= maps_right  # below or beside, not over the maps


def _tiny_run(h=7, w=9, p=3):
  """A tiny student and a run-like object with what maps.write_all_maps reads."""
  cfg = ModelConfig.tiny(bands=(3, 2), patch_size=p, depth=1, hidden=8, out_dim=8, prompts=True)
  rng = np.random.default_rng(0)
  cubes = [jnp.asarray(c) for c in data.pad_cubes(
      [rng.normal(size=(h, w, b)).astype(np.float32) for b in cfg.bands], p)]
  spec = types.SimpleNamespace(name="toy", modalities=("HSI", "LiDAR"),
                               class_names=["a", "b", "c", "d"], palette=None)
  rd = types.SimpleNamespace(
      spec=spec, cubes=cubes, labels=rng.integers(0, 5, size=(h, w)).astype(np.int32),
      z=jnp.asarray(rng.normal(size=(4, cfg.out_dim)).astype(np.float32)),
      height=h, width=w, patch_size=p, inference_mesh=lambda batch: None)
  return DPMamba(cfg, rngs=nnx.Rngs(0)), rd


def test_write_all_maps_comparison_reuses_full_maps(tmp_path, monkeypatch):
  model, rd = _tiny_run()
  calls, drawn = [], []
  real_predict, real_compare = Predictor.predict_scene, maps.save_comparison

  def counting_predict(self, *a, **k):
    calls.append(1)
    return real_predict(self, *a, **k)

  def recording_compare(path, panels, *a, **k):
    drawn.append(panels)
    return real_compare(path, panels, *a, **k)

  monkeypatch.setattr(Predictor, "predict_scene", counting_predict)
  monkeypatch.setattr(maps, "save_comparison", recording_compare)
  out = str(tmp_path / "maps")
  cmp_path = str(tmp_path / "comparison_student.png")
  written = maps.write_all_maps(rd, model, out, batch=16, log=lambda s: None,
                                comparison=cmp_path)
  assert written[-1] == cmp_path and os.path.isfile(cmp_path)
  assert len(calls) == 3  # complete + two scenarios; the figure predicts nothing more
  (panels,) = drawn
  assert [t for t, _ in panels] == ["ground truth", "complete", "without HSI", "without LiDAR"]
  np.testing.assert_array_equal(panels[0][1], rd.labels)
  for (_, m), stem in zip(panels[1:], ("complete", "without-HSI", "without-LiDAR")):
    np.testing.assert_array_equal(m, np.load(os.path.join(out, f"student_{stem}_full.npy")))
  rgb = _png_rgb(cmp_path)
  for colour in figures.default_palette(4):
    assert _count_colour(rgb, colour) > 0
  # without comparison=: no figure
  written = maps.write_all_maps(rd, model, out, batch=16, which="teacher", log=lambda s: None)
  assert len(written) == 3 * 2 * 3 + 3
  assert [os.path.basename(p).split(".")[0] for p in written[::3]] == [  # the scenarios' order
      "teacher_complete_full", "teacher_complete_labelled", "teacher_without-HSI_full",
      "teacher_without-HSI_labelled", "teacher_without-LiDAR_full",
      "teacher_without-LiDAR_labelled", "ground_truth"]
  assert not [p for p in written if "comparison" in os.path.basename(p)]


def test_a_failed_map_write_is_the_error_of_write_all_maps(tmp_path, monkeypatch):
  """The files are written in a thread while the next scenario is classified; its error (here a
  full disk at one file) is still the call's."""
  model, rd = _tiny_run()
  real_save = maps.save_map

  def failing_save(out_dir, stem, *a, **k):
    if stem == "student_without-HSI_labelled":
      raise OSError(errno.ENOSPC, "No space left on device", stem)
    return real_save(out_dir, stem, *a, **k)

  monkeypatch.setattr(maps, "save_map", failing_save)
  with pytest.raises(OSError, match="No space left"):
    maps.write_all_maps(rd, model, str(tmp_path / "maps"), batch=16, log=lambda s: None)


def _tiny_scored_run(h=7, w=9, p=3, subsample=0):
  """_tiny_run plus what the evaluation reads: a split (half the labelled pixels are test
  pixels), the run config, the labels' class count, and one no-data pixel."""
  model, rd = _tiny_run(h, w, p)
  labelled = np.flatnonzero(rd.labels.ravel() > 0)
  invalid = np.zeros((h, w), bool)
  invalid.ravel()[np.flatnonzero(rd.labels.ravel() == 0)[0]] = True  # unlabelled, as no data is
  rd.split = types.SimpleNamespace(test_idx=labelled[::2].astype(np.int32))
  rd.cfg = types.SimpleNamespace(eval_subsample=subsample, seed=0)
  rd.spec.num_classes = 4
  rd.invalid = invalid
  return model, rd


@pytest.mark.parametrize("subsample", [0, 5])
def test_maps_reuse_the_evaluations_predictions_and_equal_a_full_classification(
    tmp_path, monkeypatch, subsample):
  """write_maps copies the test pixels evaluation classified (with eval_subsample, only that
  subset) and classifies only the rest, skipping pixels without data; the maps equal those of
  classifying every pixel (predict_scene from scratch), and the record counts the work."""
  model, rd = _tiny_scored_run(subsample=subsample)
  predictions = {}
  scores = metrics_lib.evaluate_model(model, rd, batch=16, which="student", progress=False,
                                      predictions=predictions)
  test_idx, by_scenario = predictions["student"]
  np.testing.assert_array_equal(test_idx, metrics_lib.test_pixels(rd))
  assert test_idx.size == (subsample or rd.split.test_idx.size)
  assert set(by_scenario) == set(scores) == {"complete", "without:HSI", "without:LiDAR"}
  classified = []
  real = Predictor.predict_pixels

  def counting(self, scene, z, flat_idx, *a, **k):
    classified.append(np.asarray(flat_idx).copy())
    return real(self, scene, z, flat_idx, *a, **k)

  monkeypatch.setattr(Predictor, "predict_pixels", counting)
  record = maps.write_maps(rd, str(tmp_path), [("student", model)], batch=16,
                           log=lambda s: None, predictions=predictions)
  h, w = rd.labels.shape
  want_todo = np.setdiff1d(np.arange(h * w), test_idx)
  want_todo = want_todo[~rd.invalid.ravel()[want_todo]]
  assert len(classified) == 3
  for idx in classified:
    np.testing.assert_array_equal(idx, want_todo)
  assert record["stage"] == "maps" and record["models"] == ["student"]
  assert record["patches"] == 3 * want_todo.size and record["reused"] == 3 * test_idx.size
  assert record["wall_time_s"] > 0
  monkeypatch.setattr(Predictor, "predict_pixels", real)
  predictor = Predictor(model, width=w, patch_size=rd.patch_size, batch=16)
  for name, row in masks.eval_scenarios(rd.spec.modalities):
    scratch = predictor.predict_scene(rd.cubes, rd.z, h, row)  # every pixel, nothing reused
    full, labelled = maps.to_maps(scratch, rd.labels, rd.invalid)
    stem = f"student_{masks.scenario_file_stem(name)}"
    np.testing.assert_array_equal(np.load(tmp_path / "maps" / f"{stem}_full.npy"), full)
    np.testing.assert_array_equal(np.load(tmp_path / "maps" / f"{stem}_labelled.npy"), labelled)
    assert (full[rd.invalid] == 0).all() and full[~rd.invalid].min() >= 1
  assert (tmp_path / "comparison_student.png").is_file()
