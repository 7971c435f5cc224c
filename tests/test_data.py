"""Tests for dpmamba_jax.data (and its datasets registry): readers, validation, splits,
preprocessing, patch gather, sampler, inspect CLI."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import chex
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io

from dpmamba_jax import data
from dpmamba_jax.data import datasets
from dpmamba_jax.data.__main__ import main as data_main
from dpmamba_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
TRENTO = REPO.parent / "shared" / "data" / "trento-semireal"
H, W = 12, 10


def tiny_spec(**kw):
  """A 3-class, HSI 5 + LiDAR 1 variant of the trento spec."""
  base = dict(bands=(5, 1), pca=(None, None), class_names=("a", "b", "c"), patch_size=3,
              batch_size=6, train_per_class=4, palette=((0, 0, 0),) * 3)
  base.update(kw)
  return dataclasses.replace(datasets.get_spec("trento"), **base)


def tiny_arrays(seed=0):
  rng = np.random.default_rng(seed)
  hsi = rng.uniform(0, 100, size=(H, W, 5)).astype(np.float32)
  lidar = rng.uniform(0, 10, size=(H, W)).astype(np.float32)
  labels = np.zeros((H, W), np.uint8)
  labels[:4] = 1
  labels[4:8] = 2
  labels[8:, :6] = 3
  return hsi, lidar, labels


def write_v73(path, arrays: dict, userblock=True):
  """Writes a MATLAB v7.3-like file: HDF5 (after a 512-byte header), arrays stored transposed."""
  kw = {"userblock_size": 512} if userblock else {}
  with h5py.File(path, "w", **kw) as f:
    for k, v in arrays.items():
      f.create_dataset(k, data=np.asarray(v).T)
  if userblock:
    with open(path, "r+b") as f:
      f.write(b"MATLAB 7.3 MAT-file, test".ljust(128, b" "))


def write_dir(d, names=("HSI_data", "LiDAR_data", "All_Label"), fmt="v5", arrays=None):
  hsi, lidar, labels = arrays or tiny_arrays()
  d = pathlib.Path(d)
  d.mkdir(parents=True, exist_ok=True)
  for name, arr in zip(names, (hsi, lidar, labels)):
    if fmt == "v5":
      scipy.io.savemat(d / f"{name}.mat", {name: arr})
    elif fmt == "v73":
      write_v73(d / f"{name}.mat", {name: arr})
    elif fmt == "npz":
      np.savez(d / f"{name}.npz", **{name: arr})
    else:
      np.save(d / f"{name}.npy", arr)
  return d


# ------------------------------------------------------------------------------------------------
# registry


def test_registry():
  for name, spec in datasets.DATASETS.items():
    assert spec.name == name
    assert len(spec.palette) == spec.num_classes
    assert spec.batch_size % spec.num_classes == 0
    assert len(spec.file_stems) == spec.num_modalities
  t = datasets.get_spec("Trento")
  assert (t.bands, t.model_bands, t.patch_size, t.batch_size) == ((63, 1), (63, 1), 15, 120)
  assert t.steps_per_epoch == 2 and t.text_key == "Trento"
  h = datasets.get_spec("houston")
  assert h.model_bands == (48, 1) and h.steps_per_epoch == 4 and h.betas_distill == (0.85, 0.999)
  a3 = datasets.get_spec("augsburg3")
  assert a3.modalities == ("HSI", "SAR", "LiDAR") and a3.model_bands == (48, 4, 1)
  m = datasets.get_spec("muufl")
  assert m.num_classes == 11 and m.bands == (64, 2)
  with pytest.raises(UserError, match="unknown dataset 'nope'"):
    datasets.get_spec("nope")


# ------------------------------------------------------------------------------------------------
# readers


@pytest.mark.parametrize("userblock", [True, False])
def test_read_v73_transposes_back(tmp_path, userblock):
  hsi, lidar, _ = tiny_arrays()
  p = tmp_path / "HSI_data.mat"
  write_v73(p, {"HSI_data": hsi, "other": lidar}, userblock=userblock)
  arr, key = data.read_array(p)
  assert key == "HSI_data"
  np.testing.assert_array_equal(arr, hsi)
  arr, key = data.read_array(p, "other")
  np.testing.assert_array_equal(arr, lidar)


def test_read_v5_npy_npz_and_key_discovery(tmp_path):
  hsi, lidar, _ = tiny_arrays()
  scipy.io.savemat(tmp_path / "x.mat", {"whatever": hsi})  # one array: found under any name
  np.testing.assert_array_equal(data.read_array(tmp_path / "x.mat")[0], hsi)
  np.save(tmp_path / "y.npy", lidar)
  np.testing.assert_array_equal(data.read_array(tmp_path / "y.npy")[0], lidar)
  np.savez(tmp_path / "z.npz", a=hsi, b=lidar)
  with pytest.raises(UserError, match=r"z\.npz: holds several arrays \(a, b\)"):
    data.read_array(tmp_path / "z.npz")
  np.testing.assert_array_equal(data.read_array(tmp_path / "z.npz", "b")[0], lidar)
  with pytest.raises(UserError, match=r"z\.npz: no key 'c'; keys present: a, b"):
    data.read_array(tmp_path / "z.npz", "c")
  (tmp_path / "bad.mat").write_bytes(b"not a mat file at all" * 10)
  with pytest.raises(UserError, match=r"bad\.mat: cannot be read"):
    data.read_array(tmp_path / "bad.mat")


@pytest.mark.parametrize("fmt", ["v5", "v73", "npz", "npy"])
@pytest.mark.parametrize("names", [("HSI_data", "LiDAR_data", "All_Label"),
                                   ("HSI", "LiDAR", "All_label")])
def test_load_scene_formats_and_names(tmp_path, fmt, names):
  d = write_dir(tmp_path / "ds", names, fmt)
  scene = data.load_scene(tiny_spec(), d)
  hsi, lidar, labels = tiny_arrays()
  assert [c.shape for c in scene.cubes] == [(H, W, 5), (H, W, 1)]
  assert all(c.dtype == np.float32 for c in scene.cubes)
  np.testing.assert_array_equal(scene.cubes[0], hsi)
  np.testing.assert_array_equal(scene.cubes[1][..., 0], lidar)
  np.testing.assert_array_equal(scene.labels, labels)
  assert scene.labels.dtype == np.int32
  np.testing.assert_array_equal(scene.class_counts(), [40, 40, 24])


def test_load_scene_hdf5_written_in_c_order(tmp_path):
  """h5py files written from Python without MATLAB's transpose are recognised by their shapes."""
  hsi, lidar, labels = tiny_arrays()
  d = tmp_path / "ds"
  d.mkdir()
  for name, arr in (("HSI", hsi), ("LiDAR", lidar), ("All_label", labels)):
    with h5py.File(d / f"{name}.mat", "w") as f:
      f.create_dataset(name, data=arr)
  scene = data.load_scene(tiny_spec(), d)
  np.testing.assert_array_equal(scene.cubes[0], hsi)
  np.testing.assert_array_equal(scene.cubes[1][..., 0], lidar)
  np.testing.assert_array_equal(scene.labels, labels)


def test_default_data_dir_from_env(tmp_path, monkeypatch):
  write_dir(tmp_path / "trento")
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  assert data.resolve_data_dir(tiny_spec()) == tmp_path / "trento"
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="does not exist"):
    data.resolve_data_dir(tiny_spec())


def test_key_and_file_overrides(tmp_path):
  hsi, lidar, labels = tiny_arrays()
  d = tmp_path / "ds"
  d.mkdir()
  scipy.io.savemat(d / "HSI_data.mat", {"cube": hsi, "junk": lidar})
  scipy.io.savemat(d / "LiDAR_data.mat", {"LiDAR_data": lidar})
  np.save(tmp_path / "gt.npy", labels)
  scene = data.load_scene(tiny_spec(), d, keys={"HSI": "cube"},
                          files={"labels": str(tmp_path / "gt.npy")})
  np.testing.assert_array_equal(scene.cubes[0], hsi)
  with pytest.raises(UserError, match="override for 'DEM'"):
    data.load_scene(tiny_spec(), d, keys={"DEM": "x"})


# ------------------------------------------------------------------------------------------------
# validation errors: each one line, naming the file / key / value


def _err(fn, *args, **kw) -> str:
  with pytest.raises(UserError) as e:
    fn(*args, **kw)
  msg = str(e.value)
  assert "\n" not in msg
  return msg


def test_error_folder_missing(tmp_path):
  msg = _err(data.load_scene, tiny_spec(), tmp_path / "nope")
  assert "nope does not exist" in msg and "HSI_data.mat (or HSI.mat)" in msg
  assert "All_Label.mat" in msg and "github.com/Jiahuiqu/DPMamba" in msg


def test_error_missing_file(tmp_path):
  d = write_dir(tmp_path / "ds")
  os.remove(d / "LiDAR_data.mat")
  msg = _err(data.load_scene, tiny_spec(), d)
  assert str(d) in msg and "no LiDAR file" in msg and "LiDAR_data.mat or LiDAR.mat" in msg


def test_error_missing_key(tmp_path):
  d = write_dir(tmp_path / "ds")
  msg = _err(data.load_scene, tiny_spec(), d, keys={"labels": "TR"})
  assert "All_Label.mat: no key 'TR'; keys present: All_Label" in msg


def test_error_hw_mismatch(tmp_path):
  hsi, lidar, labels = tiny_arrays()
  d = write_dir(tmp_path / "ds", arrays=(hsi, lidar[:, :-1], labels))
  msg = _err(data.load_scene, tiny_spec(), d)
  assert "LiDAR_data.mat:LiDAR_data" in msg and f"{H}x{W - 1}" in msg and f"{H}x{W}" in msg


def test_error_label_shape(tmp_path):
  hsi, lidar, labels = tiny_arrays()
  d = write_dir(tmp_path / "ds", arrays=(hsi, lidar, labels[1:]))
  msg = _err(data.load_scene, tiny_spec(), d)
  assert "All_Label.mat:All_Label: label map has shape (11, 10)" in msg and f"{H}x{W}" in msg


def test_error_nan(tmp_path):
  hsi, lidar, labels = tiny_arrays()
  hsi[3, 4, 2] = np.nan
  hsi[5, 5, 0] = np.inf
  d = write_dir(tmp_path / "ds", arrays=(hsi, lidar, labels))
  msg = _err(data.load_scene, tiny_spec(), d)
  assert "HSI_data.mat:HSI_data: 2 NaN/Inf values (first at index (3, 4, 2))" in msg


def test_error_label_range_and_non_integer(tmp_path):
  hsi, lidar, labels = tiny_arrays()
  labels[0, 0] = 7
  d = write_dir(tmp_path / "a", arrays=(hsi, lidar, labels))
  msg = _err(data.load_scene, tiny_spec(), d)
  assert "All_Label.mat:All_Label: label value 7 outside 0..3" in msg
  flabels = tiny_arrays()[2].astype(np.float64)
  flabels[1, 1] = 1.5
  d = write_dir(tmp_path / "b", arrays=(hsi, lidar, flabels))
  assert "label value 1.5 is not an integer" in _err(data.load_scene, tiny_spec(), d)


def test_error_band_count(tmp_path):
  d = write_dir(tmp_path / "ds")
  msg = _err(data.load_scene, tiny_spec(bands=(6, 1)), d)
  assert "HSI_data.mat:HSI_data: HSI has 5 bands but dataset trento expects 6" in msg


def test_error_too_few_labelled_pixels():
  _, _, labels = tiny_arrays()
  msg = _err(data.make_split, labels, 30, 0, class_names=("a", "b", "c"))
  assert "class 3 (c) has 24 labelled pixels, fewer than the 30 training pixels" in msg


def test_error_patch_too_large():
  msg = _err(data.pad_cubes, [np.zeros((H, W, 2))], 11)
  assert f"patch size 11 does not fit the {H}x{W} scene" in msg


@pytest.mark.slow
def test_cli_error_exit_code(tmp_path, capsys):
  d = write_dir(tmp_path / "ds")
  os.remove(d / "HSI_data.mat")
  rc = data_main(["--dataset", "trento", "--data-dir", str(d)])
  err = capsys.readouterr().err
  assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ")
  assert "no HSI file" in err and str(d) in err
  # As a real process (python -m): no traceback, exit status != 0.
  r = subprocess.run([sys.executable, "-m", "dpmamba_jax.data", "--dataset", "trento",
                      "--data-dir", str(tmp_path / "missing")], capture_output=True, text=True,
                     cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.startswith("error: dataset folder") and r.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------
# splits


def test_split_reproducible_disjoint_sorted():
  _, _, labels = tiny_arrays()
  s1 = data.make_split(labels, 4, seed=3)
  s2 = data.make_split(labels, 4, seed=3)
  s3 = data.make_split(labels, 4, seed=4)
  np.testing.assert_array_equal(s1.train_idx, s2.train_idx)
  assert not np.array_equal(s1.train_idx, s3.train_idx)
  y = data.labels_at(labels, s1.train_idx)
  np.testing.assert_array_equal(y, np.repeat([0, 1, 2], 4))
  for c in range(3):  # raster order within class
    assert np.all(np.diff(s1.train_idx[y == c]) > 0)
  assert np.intersect1d(s1.train_idx, s1.test_idx).size == 0
  labelled = np.flatnonzero(labels.ravel() > 0)
  np.testing.assert_array_equal(np.union1d(s1.train_idx, s1.test_idx), labelled)
  np.testing.assert_array_equal(s1.test_idx, np.sort(s1.test_idx))
  s4 = data.make_split(labels, 4, seed=3, include_train_in_test=True)
  np.testing.assert_array_equal(s4.test_idx, labelled)


def test_split_save_load(tmp_path):
  _, _, labels = tiny_arrays()
  s = data.make_split(labels, 4, seed=5)
  p = tmp_path / "run" / "split.npz"
  data.save_split(p, s)
  assert sorted(os.listdir(p.parent)) == ["split.npz"]  # no temp files left
  t = data.load_split(p, labels)
  np.testing.assert_array_equal(s.train_idx, t.train_idx)
  np.testing.assert_array_equal(s.test_idx, t.test_idx)
  assert t.seed == 5
  np.savez(tmp_path / "bad.npz", train_idx=s.train_idx)
  assert "bad.npz: no key 'test_idx'" in _err(data.load_split, tmp_path / "bad.npz")
  bad = data.Split(s.train_idx, np.array([0, 99]), 0)  # pixel 99 is unlabelled
  assert "unlabelled pixel 99" in _err(data.check_split, bad, labels)


def test_split_from_maps(tmp_path):
  _, _, labels = tiny_arrays()
  s = data.make_split(labels, 4, seed=0)
  tr = np.zeros(H * W, np.uint8)
  tr[s.train_idx] = labels.ravel()[s.train_idx]
  te = np.where(tr == 0, labels.ravel(), 0)
  np.savez(tmp_path / "m.npz", train=tr.reshape(H, W), test=te.reshape(H, W))
  t = data.split_from_maps(tmp_path / "m.npz", labels=labels)
  np.testing.assert_array_equal(t.train_idx, s.train_idx)
  np.testing.assert_array_equal(t.test_idx, s.test_idx)
  np.savez(tmp_path / "o.npz", train=tr.reshape(H, W), test=labels)
  assert "overlap" in _err(data.split_from_maps, tmp_path / "o.npz")
  wrong = tr.reshape(H, W).copy()
  wrong[s.train_idx[0] // W, s.train_idx[0] % W] = 3
  np.savez(tmp_path / "w.npz", train=wrong, test=te.reshape(H, W))
  assert "disagrees with the label map" in _err(data.split_from_maps, tmp_path / "w.npz",
                                                 labels=labels)


# ------------------------------------------------------------------------------------------------
# preprocessing


def test_whitened_pca_unit_variance_and_matches_svd():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) + 5.0
  y = data.whitened_pca(x, 3)
  chex.assert_shape(y, (400, 3))
  np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(np.cov(y.T), np.eye(3), atol=1e-4)
  xc = x - x.mean(0)
  u, _, _ = np.linalg.svd(xc, full_matrices=False)
  ref = u[:, :3] * np.sqrt(len(x) - 1)  # sklearn PCA(whiten=True), up to sign
  np.testing.assert_allclose(np.abs(y), np.abs(ref), atol=1e-4)
  rows = np.arange(0, 400, 3)
  z = data.whitened_pca(x, 3, rows)  # fitted on a subset: whitened there, not everywhere
  np.testing.assert_allclose(np.cov(z[rows].T), np.eye(3), atol=1e-4)
  assert "5 components requested from 4 bands" in _err(data.whitened_pca, x[:, :4], 5)


def test_preprocess_standardisation_fitted_on_train_only():
  spec = tiny_spec(bands=(5, 1), pca=(3, None))
  hsi, lidar, labels = tiny_arrays()
  scene = data.Scene(spec, [hsi, lidar[..., None]], labels.astype(np.int32), "test")
  split = data.make_split(labels, 4, seed=0)
  out = data.preprocess(scene, split)
  assert [o.shape for o in out] == [(H, W, 3), (H, W, 1)]
  for o in out:
    tr = o.reshape(H * W, -1)[split.train_idx]
    np.testing.assert_allclose(tr.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(tr.std(0), 1, atol=1e-5)
  # Changing a test pixel changes nothing else (stats come from training pixels only).
  lidar2 = lidar.copy()
  t = split.test_idx[0]
  lidar2.ravel()[t] += 1000.0
  scene2 = data.Scene(spec, [hsi, lidar2[..., None]], scene.labels, "test")
  out2 = data.preprocess(scene2, split, pca_fit="train")
  mask = np.ones(H * W, bool)
  mask[t] = False
  np.testing.assert_allclose(out2[1].reshape(-1)[mask], out[1].reshape(-1)[mask], atol=1e-5)
  raw = data.preprocess(dataclasses.replace(scene, spec=tiny_spec()), split, normalize="none")
  np.testing.assert_array_equal(raw[0], hsi)
  assert "normalize='zscore'" in _err(data.preprocess, scene, split, normalize="zscore")


# ------------------------------------------------------------------------------------------------
# patches


def naive_patches(cube, patch_size):
  """Reference: per-pixel loop, reading each patch entry through an explicit mirror rule."""
  h, w, _ = cube.shape
  p = patch_size // 2

  def mirror(i, n):  # 'symmetric': -1 -> 0, -2 -> 1, n -> n-1, n+1 -> n-2
    return -i - 1 if i < 0 else (2 * n - 1 - i if i >= n else i)

  out = np.zeros((h * w, patch_size, patch_size, cube.shape[-1]), cube.dtype)
  for r in range(h):
    for c in range(w):
      for i in range(patch_size):
        for j in range(patch_size):
          out[r * w + c, i, j] = cube[mirror(r - p + i, h), mirror(c - p + j, w)]
  return out


def test_symmetric_padding_semantics():
  x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])[None, :, None].repeat(5, 0)
  padded = data.pad_cubes([x], 5)[0]
  np.testing.assert_array_equal(padded[2, :, 0], [2, 1, 1, 2, 3, 4, 5, 5, 4])


@pytest.mark.parametrize("patch_size", [1, 3, 4, 5, 7])
def test_gather_matches_naive_numpy(patch_size):
  cube = np.random.default_rng(0).normal(size=(7, 9, 3)).astype(np.float32)
  padded = data.pad_cubes([cube], patch_size)[0]
  got = data.gather_patches(padded, np.arange(7 * 9), 9, patch_size)
  assert isinstance(got, np.ndarray)
  chex.assert_shape(got, (63, patch_size, patch_size, 3))
  np.testing.assert_array_equal(got, naive_patches(cube, patch_size))
  np.testing.assert_array_equal(got[:, patch_size // 2, patch_size // 2], cube.reshape(63, 3))


class GatherJaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_gather_matches_naive_jax(self):
    cube = np.random.default_rng(1).normal(size=(6, 8, 2)).astype(np.float32)
    p = 5
    padded = jnp.asarray(data.pad_cubes([cube], p)[0])
    idx = jnp.array([0, 7, 40, 47, 19, 3])  # corners and inner pixels
    fn = self.variant(lambda pc, i: data.gather_patches(pc, i, 8, p))
    got = fn(padded, idx)
    chex.assert_shape(got, (6, p, p, 2))
    np.testing.assert_array_equal(np.asarray(got), naive_patches(cube, p)[np.asarray(idx)])

  def test_gather_jit_traces_once(self):
    padded = jnp.zeros((10, 10, 2))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(i):
      return data.gather_patches(padded, i, 6, 5)

    f(jnp.arange(4))
    f(jnp.arange(4) + 3)


# ------------------------------------------------------------------------------------------------
# sampler


def test_sampler_invariants():
  labels = np.repeat(np.arange(6), 40)
  rng = np.random.default_rng(0)
  labels = labels[rng.permutation(len(labels))]
  s = data.BalancedSampler(labels, 6, 120, seed=0)
  assert (s.k, s.steps, s.batch_size) == (20, 2, 120)
  e0, e1 = s.epoch(0), s.epoch(1)
  chex.assert_shape(e0, (2, 120))
  for e in (e0, e1):
    np.testing.assert_array_equal(np.sort(e.ravel()), np.arange(240))  # every sample once
    for batch in e:
      np.testing.assert_array_equal(labels[batch], np.repeat(np.arange(6), 20))  # class-sorted
  assert not np.array_equal(e0, e1)  # reshuffled each epoch
  np.testing.assert_array_equal(data.BalancedSampler(labels, 6, 120, seed=0).epoch(7), s.epoch(7))
  assert not np.array_equal(data.BalancedSampler(labels, 6, 120, seed=1).epoch(7), s.epoch(7))


def test_sampler_unequal_classes_and_errors():
  labels = np.array([0] * 5 + [1] * 9 + [2] * 4)
  s = data.BalancedSampler(labels, 3, 7, seed=2)  # k = 2, batch 6
  assert (s.k, s.steps) == (2, 2)
  seen = []
  for e in range(9):
    b = s.epoch(e)
    chex.assert_shape(b, (2, 6))
    for batch in b:
      np.testing.assert_array_equal(labels[batch], [0, 0, 1, 1, 2, 2])
    seen.append(b)
  # class 2 (4 samples, 4 drawn per epoch): each exactly once per epoch
  for b in seen:
    np.testing.assert_array_equal(np.sort(b[:, 4:].ravel()), np.flatnonzero(labels == 2))
  # class 1 (9 samples): over 9 epochs (36 draws) each sample 4 times
  np.testing.assert_array_equal(np.bincount(np.concatenate([b[:, 2:4].ravel() for b in seen]),
                                            minlength=18)[labels == 1], 4)
  assert "smaller than the 3 classes" in _err(data.BalancedSampler, labels, 3, 2, 0)
  assert "no sample of class 3" in _err(data.BalancedSampler, labels, 4, 8, 0)


# ------------------------------------------------------------------------------------------------
# synthetic default + inspect CLI


def test_inspect_cli_synthetic_json(capsys):
  assert data_main(["--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  spec = datasets.get_spec("synthetic")
  assert info["dataset"] == "synthetic"
  assert [m["bands"] for m in info["modalities"]] == list(spec.bands)
  assert info["split"]["train"] == spec.train_per_class * spec.num_classes
  assert info["split"]["train"] + info["split"]["test"] == info["labelled"]


# ------------------------------------------------------------------------------------------------
# ../shared/data/trento-semireal (skipped when absent)

needs_trento = pytest.mark.skipif(not TRENTO.is_dir(), reason=f"{TRENTO} not available")
TRENTO_COUNTS = [4034, 2903, 479, 9123, 10501, 3174]


@needs_trento
def test_trento_semireal_inspect(capsys):
  assert data_main(["--dataset", "trento", "--data-dir", str(TRENTO), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["counts"] == TRENTO_COUNTS
  assert (info["height"], info["width"]) == (166, 600)
  assert [m["bands"] for m in info["modalities"]] == [63, 1]
  assert info["split"]["train"] == 240 and info["split"]["test"] == sum(TRENTO_COUNTS) - 240


@needs_trento
def test_trento_official_split():
  scene = data.load_scene("trento", TRENTO)
  s = data.split_from_maps(TRENTO / "official_split.npz", labels=scene.labels)
  np.testing.assert_array_equal(np.bincount(data.labels_at(scene.labels, s.train_idx)),
                                [129, 125, 105, 154, 184, 122])
  assert s.test_idx.size == 29395
  sampler = data.BalancedSampler(data.labels_at(scene.labels, s.train_idx), 6, 120, seed=0)
  assert sampler.steps == 105 // 20


def test_pca_keeping_the_bands_puts_the_components_after_them():
  hsi, lidar, labels = tiny_arrays()
  split = data.make_split(labels, 4, seed=0)
  pca_only = data.Scene(tiny_spec(bands=(5, 1), pca=(3, None)), [hsi, lidar[..., None]],
                        labels.astype(np.int32), "test")
  raw_only = dataclasses.replace(pca_only, spec=tiny_spec(bands=(5, 1)))
  both = dataclasses.replace(pca_only, spec=tiny_spec(bands=(5, 1), pca=(3, None),
                                                        pca_keeps_bands=True))
  assert both.spec.model_bands == (8, 1)
  transform = data.fit_transform(both, split)
  out = transform.apply(both.cubes)
  chex.assert_shape(out, [(H, W, 8), (H, W, 1)])
  np.testing.assert_allclose(out[0][..., :5], data.preprocess(raw_only, split)[0], atol=1e-5)
  np.testing.assert_allclose(out[0][..., 5:], data.preprocess(pca_only, split)[0], atol=1e-5)
  again = data.InputTransform.from_json(json.loads(json.dumps(transform.to_json())))
  np.testing.assert_array_equal(again.apply(both.cubes)[0], out[0])
