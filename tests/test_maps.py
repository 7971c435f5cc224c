"""Tests for maps.py: colours, PNG/.npy/.mat files, streamed full-scene prediction."""
import os

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import scipy.io

from dpmamba_jax import maps


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


def test_predict_scene_streams_every_pixel():
  calls = []

  def fake_predict(params, rest, cubes, z, idx, mask):
    calls.append(int(idx.shape[0]))
    return (idx % 3).astype(jnp.int32)

  out = maps.predict_scene(fake_predict, None, None, None, None, 7, 9, None, 2, batch=16)
  assert out.shape == (7, 9)
  np.testing.assert_array_equal(out.ravel(), np.arange(63) % 3)
  assert set(calls) == {16} and len(calls) == 4  # fixed batch, last one padded
