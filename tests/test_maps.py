"""Tests for maps.py: colours, PNG/.npy/.mat files; streamed full-scene prediction (predict.py)."""
import os

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import scipy.io
from flax import nnx

from dpmamba_jax import data, losses, maps, predict
from dpmamba_jax.model import DPMamba, ModelConfig
from dpmamba_jax.predict import Predictor


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


def test_predict_scene_streams_every_pixel(monkeypatch):
  h, w, p = 7, 9, 3
  cfg = ModelConfig.tiny(bands=(3, 2), patch_size=p, depth=1, hidden=8, out_dim=8, prompts=True)
  rng = np.random.default_rng(0)
  cubes = [jnp.asarray(c) for c in data.pad_cubes(
      [rng.normal(size=(h, w, b)).astype(np.float32) for b in cfg.bands], p)]
  z = jnp.asarray(rng.normal(size=(4, cfg.out_dim)).astype(np.float32))
  model = DPMamba(cfg, rngs=nnx.Rngs(0))
  predict._programs.cache_clear()  # Predictors of equal model graphs share programs
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
