"""A user's own scene: a dataset YAML over GeoTIFF / ENVI files, training on it, and
`python -m dpmamba_jax.predict` on it and on folders / scenes laid out like it.

The scenes are written by scene_files.write_scene (24 x 30, 6 classes, EPSG:32632, 2 m pixels).
One tiny training run per module (a nodata block in the HSI, whitened PCA on it); every predict
case runs in this process and compares its GeoTIFF with the run's own maps (written by the
evaluation's Predictor), so "predict on the training scene equals evaluate" is checked pixel by
pixel.
"""
import errno
import json
import os
import shutil

import numpy as np
import pytest
import rasterio
import yaml

import scene_files
from cli_errors import (assert_nothing_written, assert_one_line_error, listing,
                        private_text_cache, run_cli)
from dpmamba_jax import checkpoint, data, evaluate, locks, predict, train
from dpmamba_jax.data import __main__ as data_cli
from dpmamba_jax.data import dataset_file, datasets, io, rasters
from dpmamba_jax.data.preprocessing import InputTransform, fit_transform, make_split
from dpmamba_jax.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the random text encoder's

NODATA = 0
NODATA_BOX = (4, 7, 20, 26)  # HSI pixels without data (rows 4..6, columns 20..25)
TINY = ["--epochs", "2", "--text-encoder", "random", "--quiet",
        "--set", "model=tiny", "--set", "depth=0", "--set", "hidden=8",
        "--set", "eval_batch=128", "--set", "log_every=1"]


_cache_dir = pytest.fixture(scope="module", autouse=True)(private_text_cache)


@pytest.fixture(scope="module")
def scene_yaml(tmp_path_factory):
  return scene_files.write_scene(tmp_path_factory.mktemp("scene"), hsi_nodata=NODATA,
                                 nodata_box=NODATA_BOX, hsi_pca=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, scene_yaml, _cache_dir):
  """The module's one finished run on the scene: teacher/, student/ (with inputs/), maps/."""
  w = tmp_path_factory.mktemp("run") / "run"
  assert train.main(["--dataset-file", str(scene_yaml), "--workdir", str(w), *TINY]) == 0
  return w


def _predict(capsys, *args):
  return run_cli(capsys, predict.main, [*args, "--quiet"])


def _read(path):
  with rasterio.open(path) as src:
    return src.read(), src.crs, src.transform, src


def _valid():
  r0, r1, c0, c1 = NODATA_BOX
  valid = np.ones((24, 30), bool)
  valid[r0:r1, c0:c1] = False
  return valid


# --------------------------------------------------------------------------------------------------
# The dataset file


def _yaml(folder, **changes):
  """scene.yaml in `folder` rewritten with top-level `changes` (None deletes a key)."""
  path = folder / "scene.yaml"
  doc = yaml.safe_load(path.read_text())
  for k, v in changes.items():
    if v is None:
      doc.pop(k, None)
    else:
      doc[k] = v
  out = folder / "edited.yaml"
  out.write_text(yaml.safe_dump(doc, sort_keys=False))
  return out


def test_dataset_file_spec(scene_yaml):
  spec = dataset_file.load_dataset_file(scene_yaml)
  assert spec.modalities == ("HSI", "LiDAR") and spec.bands == (8, 1) and spec.pca == (4, None)
  assert spec.model_bands == (4, 1)
  assert spec.class_names == tuple(scene_files.CLASSES)
  assert spec.class_texts == tuple(scene_files.TEXTS)
  assert (spec.patch_size, spec.batch_size, spec.train_per_class) == (3, 24, 8)
  # saved with the models and read back unchanged
  assert datasets.spec_from_json(json.loads(json.dumps(datasets.spec_to_json(spec)))) == spec


@pytest.mark.parametrize("changes, fragments", [
    (dict(modalities=[{"name": "HSI", "file": "hsi.tif"}, {"name": "hsi", "file": "lidar.hdr"}]),
     ["modalities[1].name", "'hsi' is also modalities[0]"]),
    (dict(modalities=[{"name": "HSI", "file": "nothere.tif"}]), ["nothere.tif: file not found"]),
    (dict(modalities=[{"name": "HSI", "file": "."}]), ["modalities[0].file", "is a folder"]),
    (dict(modalities=[{"name": "HSI", "file": "hsi.tif", "pca": 9}]),
     ["modalities[0].pca", "9 components", "8 bands"]),
    (dict(modalities=[{"name": "HSI", "file": "hsi.tif", "band": 3}]),
     ["modalities[0].band", "unknown key"]),
    (dict(class_texts=scene_files.TEXTS[:5]), ["5 class texts for the 6 classes"]),
    (dict(class_texts="nothere.txt"), ["nothere.txt: file not found"]),
    (dict(palette=[[0, 0, 0]] * 5), ["palette", "one [r, g, b] per class (6)"]),
    (dict(palette=[[0, 0, 300]] * 6), ["palette", "ints 0..255"]),
    (dict(classes=["Grass", "Trees", "Grass"]), ["'Grass' is listed twice"]),
    (dict(train={"batch_size": 25}), ["train.batch_size", "multiple of the 6 classes"]),
    (dict(train={"patch_size": 4}), ["train.patch_size", "odd"]),
    (dict(train={"epoch": 4}), ["train.epoch", "unknown training setting"]),
    (dict(labels=None), ["labels: missing"]),
    (dict(colour="red"), ["unknown key 'colour'"]),
])
def test_dataset_file_errors(scene_yaml, changes, fragments):
  path = _yaml(scene_yaml.parent, **changes)
  with pytest.raises(UserError) as e:
    dataset_file.load_dataset_file(path)
  msg = str(e.value)
  assert "\n" not in msg and (str(path) in msg or "file not found" in msg), msg
  for f in fragments:
    assert f in msg, msg


def test_label_values_beyond_the_classes(scene_yaml):
  path = _yaml(scene_yaml.parent, classes=scene_files.CLASSES[:4],
               class_texts=scene_files.TEXTS[:4], train={"patch_size": 3, "batch_size": 8})
  with pytest.raises(UserError, match=r"gt\.tif: label value [56] outside 0\.\.4"):
    io.load_scene(dataset_file.load_dataset_file(path))


def test_too_few_labelled_pixels_names_the_label_file(capsys, tmp_path, scene_yaml):
  path = _yaml(scene_yaml.parent, train={"patch_size": 3, "batch_size": 24,
                                         "train_per_class": 1000})
  rc, _, err = run_cli(capsys, data_cli.main, ["--dataset-file", path])
  assert rc == 2 and err.count("\n") == 1, err
  assert f"{scene_yaml.parent / 'gt.tif'}: class 1 (Grass) has " in err, err
  assert "fewer than the 1000 training pixels per class" in err, err


def test_stacked_single_band_files(tmp_path, scene_yaml):
  """files: [...] stacks single-band rasters into one modality, in order."""
  hsi = rasters.open_raster(scene_yaml.parent / "hsi.tif").read()           # (H, W, 8)
  g = scene_files.georef(hsi.shape[:2])
  names = []
  for b in range(hsi.shape[-1]):
    names.append(f"band{b}.tif")
    rasters.write_geotiff(tmp_path / names[-1], hsi[..., b], g, nodata=NODATA)
  for f in ("lidar.hdr", "lidar.img", "gt.tif", "texts.txt"):
    shutil.copy(scene_yaml.parent / f, tmp_path / f)
  doc = yaml.safe_load(scene_yaml.read_text())
  doc["modalities"][0] = {"name": "HSI", "files": names}
  (tmp_path / "scene.yaml").write_text(yaml.safe_dump(doc))
  stacked = io.load_scene(dataset_file.load_dataset_file(tmp_path / "scene.yaml"))
  whole = io.load_scene(dataset_file.load_dataset_file(scene_yaml))
  np.testing.assert_array_equal(stacked.cubes[0], whole.cubes[0])
  np.testing.assert_array_equal(stacked.labels, whole.labels)


# --------------------------------------------------------------------------------------------------
# Georeference and nodata


@pytest.mark.parametrize("what, fragment", [
    ("crs", "CRS EPSG:32633 differs from EPSG:32632"),
    ("transform", "is shifted by +5 columns, +0 rows"),
    ("pixel", "pixel size / rotation"),
    ("shape", "is 24x31 pixels but"),
])
def test_georef_mismatch_names_both_files(tmp_path, what, fragment):
  path = scene_files.write_scene(tmp_path)
  lidar = rasters.open_raster(tmp_path / "lidar.hdr").read()
  g = scene_files.georef((24, 30))
  if what == "crs":
    g = scene_files.georef((24, 30), wkt=rasterio.crs.CRS.from_epsg(32633).to_wkt())
  elif what == "transform":
    g = scene_files.georef((24, 30), transform=(2.0, 0.0, 664010.0, 0.0, -2.0, 5104000.0))
  elif what == "pixel":
    g = scene_files.georef((24, 30), transform=(1.0, 0.0, 664000.0, 0.0, -1.0, 5104000.0))
  else:
    lidar = np.pad(lidar, ((0, 0), (0, 1), (0, 0)))
    g = scene_files.georef((24, 31))
  rasters.write_envi(tmp_path / "lidar.hdr", lidar, g)
  with pytest.raises(UserError) as e:
    io.load_scene(dataset_file.load_dataset_file(path))
  msg = str(e.value)
  assert fragment in msg and "lidar.hdr" in msg and "hsi.tif" in msg, msg


def test_nodata_pixels_are_unlabelled_and_left_out_of_the_statistics(tmp_path, scene_yaml):
  scene = io.load_scene(dataset_file.load_dataset_file(scene_yaml))
  assert scene.georef is not None and scene.georef.shape == (24, 30)
  np.testing.assert_array_equal(scene.invalid(), ~_valid())
  assert (scene.labels[~_valid()] == 0).all() and (scene.labels[_valid()] > 0).any()
  split = make_split(scene.labels, 8, seed=0)
  assert _valid().ravel()[split.train_idx].all() and _valid().ravel()[split.test_idx].all()
  # other values under the nodata block (declared by the YAML, not the file): the same fit
  other = scene_files.write_scene(tmp_path, nodata_box=NODATA_BOX, hsi_nodata=9999, hsi_pca=4)
  doc = yaml.safe_load(other.read_text())
  doc["modalities"][0]["nodata"] = 9999
  other.write_text(yaml.safe_dump(doc))
  scene2 = io.load_scene(dataset_file.load_dataset_file(other))
  np.testing.assert_array_equal(scene2.labels, scene.labels)
  hsi_info = data_cli.inspect_scene(scene2, split, {"kind": "random"})["modalities"][0]
  assert hsi_info["nodata_pixels"] == 3 * 6 and hsi_info["max"] < 9999
  t1, t2 = fit_transform(scene, split), fit_transform(scene2, split)
  for p1, p2 in zip(t1.parts, t2.parts):
    for k in ("pca_mean", "pca_proj", "mean", "std"):
      if getattr(p1, k) is not None:
        np.testing.assert_allclose(getattr(p1, k), getattr(p2, k), rtol=1e-6, atol=1e-7)
  x = t1.apply(scene.cubes, scene.nodata_masks())
  assert (x[0][~_valid()] == 0).all()


# --------------------------------------------------------------------------------------------------
# Training on the file, and the saved input transform


@pytest.mark.slow
def test_run_saves_the_input_transform(run_dir, scene_yaml):
  for model in ("teacher", "student"):
    inputs = checkpoint.load_inputs(run_dir / model)
    spec = datasets.spec_from_json(inputs["dataset"])
    assert spec == dataset_file.load_dataset_file(scene_yaml)
    t = InputTransform.from_json(inputs["transform"])
    assert [p.bands for p in t.parts] == [8, 1] and [p.out_bands for p in t.parts] == [4, 1]
    assert InputTransform.from_json(json.loads(json.dumps(t.to_json()))).to_json() == t.to_json()
    assert np.asarray(inputs["text"]["features"]).shape[0] == 6
  assert (run_dir / "comparison_student.png").is_file()
  # the maps reused the evaluation's test pixels and classified the other pixels with data only
  records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
  first = next(r for r in records if r.get("stage") == "maps")  # the training's
  n_test = np.load(run_dir / "split.npz")["test_idx"].size
  assert first["models"] == ["student"] and first["reused"] == 3 * n_test
  assert first["patches"] == 3 * (int(_valid().sum()) - n_test) and first["wall_time_s"] > 0
  assert "student" in (run_dir / "maps" / ".complete").read_text().split()


@pytest.mark.slow
def test_data_and_evaluate_accept_the_file(capsys, run_dir, scene_yaml):
  rc, out, _ = run_cli(capsys, data_cli.main, ["--dataset-file", scene_yaml, "--json"])
  assert rc == 0 and json.loads(out)["dataset"] == "testscene"
  before = json.loads((run_dir / "metrics.json").read_text())
  student_maps = {p.name: np.load(p) for p in (run_dir / "maps").glob("student_*.npy")}
  last_record = lambda: json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
  marker = lambda: (run_dir / "maps" / ".complete").read_text().split()
  # a rerun of the finished run with maps=all draws the teacher's maps only (the student's are
  # complete); no evaluation ran, so every pixel with data is classified
  assert train.main(["--dataset-file", str(scene_yaml), "--workdir", str(run_dir), *TINY,
                     "--set", "maps=all"]) == 0
  assert last_record()["models"] == ["teacher"] and last_record()["reused"] == 0
  assert last_record()["patches"] == 3 * int(_valid().sum()) and marker() == ["student", "teacher"]
  teacher_maps = {p.name: np.load(p) for p in (run_dir / "maps").glob("teacher_*.npy")}
  rc, _, err = run_cli(capsys, evaluate.main, ["--workdir", run_dir,
                                               "--dataset-file", scene_yaml, "--maps", "all"])
  assert rc == 0, err
  after = json.loads((run_dir / "metrics.json").read_text())
  assert after["student"] == before["student"]
  # evaluate --maps all: both models' maps, reusing the evaluation (the same maps as before),
  # one log.jsonl record
  assert len(student_maps) == len(teacher_maps) == 6
  for name, m in student_maps.items():
    np.testing.assert_array_equal(np.load(run_dir / "maps" / name), m)
    teacher = teacher_maps[name.replace("student_", "teacher_")]
    np.testing.assert_array_equal(np.load(run_dir / "maps" / name.replace("student_", "teacher_")),
                                  teacher)
    assert teacher.shape == m.shape and ((teacher == 0) == (m == 0)).all()
  assert (run_dir / "comparison_teacher.png").is_file()
  assert last_record()["stage"] == "maps" and last_record()["models"] == ["student", "teacher"]
  assert last_record()["reused"] == 2 * 3 * np.load(run_dir / "split.npz")["test_idx"].size
  assert marker() == ["student", "teacher"]
  rc, _, err = run_cli(capsys, evaluate.main, ["--workdir", run_dir, "--maps", "teacher"])
  assert_one_line_error(rc, err, "--maps", "'teacher'", "expected all")


# --------------------------------------------------------------------------------------------------
# predict


@pytest.mark.slow
def test_predict_equals_the_runs_maps_and_keeps_the_georeference(capsys, tmp_path, run_dir,
                                                                  scene_yaml):
  out = tmp_path / "map.tif"
  rc, _, err = _predict(capsys, "--model", run_dir / "student", "--input", scene_yaml,
                        "--out", out, "--tile", "5", "--probabilities")
  assert rc == 0, err
  ids, crs, transform, src = _read(out)
  assert ids.shape == (1, 24, 30) and ids.dtype == np.uint8
  assert crs == rasterio.crs.CRS.from_epsg(32632)
  assert tuple(transform)[:6] == scene_files.TRANSFORM
  with rasterio.open(out) as f:
    assert f.nodata == 0 and f.colormap(1)[1][3] == 255 and f.colormap(1)[0][3] == 0
  names = (tmp_path / "map.tif.aux.xml").read_text()  # GDAL's sidecar: the class names
  assert f"<Category>{scene_files.CLASSES[0]}</Category>" in names
  ids = ids[0]
  full = np.load(run_dir / "maps" / "student_complete_full.npy")  # 0 where no data, too
  np.testing.assert_array_equal(ids, full)
  assert (ids[~_valid()] == 0).all() and 1 <= ids[_valid()].min() and ids.max() <= 6
  probs, pcrs, _, _ = _read(tmp_path / "map_probabilities.tif")
  assert probs.shape == (6, 24, 30) and probs.dtype == np.float32 and pcrs == crs
  assert np.isnan(probs[:, ~_valid()]).all()
  np.testing.assert_array_equal(probs[:, _valid()].argmax(0) + 1, ids[_valid()])
  np.testing.assert_allclose(probs[:, _valid()].sum(0), 1.0, rtol=1e-5)
  assert (tmp_path / "map.png").is_file()

  # one tile of the whole scene (a tile taller than the scene is the scene): the same map
  rc, _, err = _predict(capsys, "--model", run_dir / "student", "--input", scene_yaml,
                        "--out", tmp_path / "untiled.tif", "--tile", "1000000", "--batch", "64")
  assert rc == 0, err
  np.testing.assert_array_equal(_read(tmp_path / "untiled.tif")[0][0], ids)


@pytest.mark.slow
def test_predict_without_a_modality(capsys, tmp_path, run_dir, scene_yaml):
  """--missing LiDAR, a folder without the LiDAR files and a YAML without LiDAR all give the
  run's without-LiDAR map (the student's prompt in LiDAR's place)."""
  full = np.load(run_dir / "maps" / "student_without-LiDAR_full.npy")
  folder = tmp_path / "no-lidar"
  folder.mkdir()
  shutil.copy(scene_yaml.parent / "hsi.tif", folder / "hsi.tif")
  only_hsi = tmp_path / "only-hsi.yaml"
  only_hsi.write_text(yaml.safe_dump({"name": "x", "modalities": [
      {"name": "HSI", "file": str(scene_yaml.parent / "hsi.tif")}]}))
  cases = {"flag": [scene_yaml, "--missing", "LiDAR"], "folder": [folder],
           "yaml": [only_hsi], "flag-folder": [scene_yaml.parent, "--missing", "lidar"]}
  for name, (source, *extra) in cases.items():
    rc, _, err = _predict(capsys, "--model", run_dir / "student", "--input", source,
                          "--out", tmp_path / f"{name}.tif", *extra)
    assert rc == 0, (name, err)
    ids = _read(tmp_path / f"{name}.tif")[0][0]
    np.testing.assert_array_equal(ids, full, err_msg=name)
  # a folder with everything: the complete map
  rc, _, err = _predict(capsys, "--model", run_dir / "student", "--input", scene_yaml.parent,
                        "--out", tmp_path / "complete.tif")
  assert rc == 0, err
  ids = _read(tmp_path / "complete.tif")[0][0]
  complete = np.load(run_dir / "maps" / "student_complete_full.npy")
  np.testing.assert_array_equal(ids, complete)


@pytest.mark.slow
def test_predict_a_scene_without_georeference(capsys, tmp_path, run_dir, scene_yaml):
  """A new scene as .npy files (another size): the same files, no CRS; a NaN is no data."""
  hsi, lidar, _ = scene_files.make_arrays(20, 17, seed=5)
  lidar[3, 4] = np.nan
  np.save(tmp_path / "hsi.npy", hsi)
  np.save(tmp_path / "lidar.npy", lidar)
  src = tmp_path / "scene.yaml"
  src.write_text(yaml.safe_dump({"name": "new", "modalities": [
      {"name": "HSI", "file": "hsi.npy"}, {"name": "LiDAR", "file": "lidar.npy"}]}))
  rc, _, err = _predict(capsys, "--model", run_dir / "student", "--input", src,
                        "--out", tmp_path / "new.tif", "--tile", "7")
  assert rc == 0, err
  ids, crs, _, _ = _read(tmp_path / "new.tif")
  assert ids.shape == (1, 20, 17) and crs is None and ids.max() <= 6
  assert ids[0, 3, 4] == 0 and (np.delete(ids.ravel(), 3 * 17 + 4) >= 1).all()
  assert (tmp_path / "new.png").is_file()


@pytest.mark.slow
def test_predict_refuses_to_overwrite_and_bad_inputs(capsys, tmp_path, run_dir, scene_yaml):
  student = run_dir / "student"
  out = tmp_path / "map.tif"
  assert _predict(capsys, "--model", student, "--input", scene_yaml, "--out", out)[0] == 0
  stamp = out.stat().st_mtime_ns
  rc, _, err = _predict(capsys, "--model", student, "--input", scene_yaml, "--out", out)
  assert_one_line_error(rc, err, "map.tif: exists already", "--force")
  assert out.stat().st_mtime_ns == stamp
  assert _predict(capsys, "--model", student, "--input", scene_yaml, "--out", out,
                  "--force")[0] == 0

  bad = tmp_path / "bad"
  bad.mkdir()
  hsi = rasters.open_raster(scene_yaml.parent / "hsi.tif").read()
  rasters.write_geotiff(bad / "hsi7.tif", np.moveaxis(hsi[..., :7], -1, 0),
                        scene_files.georef((24, 30)))
  rasters.write_geotiff(bad / "hsi_shifted.tif", np.moveaxis(hsi, -1, 0), scene_files.georef(
      (24, 30), transform=(2.0, 0.0, 664000.0, 0.0, -2.0, 5104020.0)))
  lidar = str(scene_yaml.parent / "lidar.hdr")

  def source(name, hsi_file, lidar_file=lidar):
    p = bad / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "modalities": [
        {"name": "HSI", "file": hsi_file}, {"name": "LiDAR", "file": lidar_file}]}))
    return p

  npy = bad / "small.npy"
  np.save(npy, np.zeros((24, 29), np.float32))
  cases = [
      (source("bands", "hsi7.tif"), [], ["hsi7.tif", "HSI has 7 bands", "trained on 8"]),
      (source("grid", "hsi_shifted.tif"), [], ["lidar.hdr", "hsi_shifted.tif", "shifted by"]),
      (source("size", str(scene_yaml.parent / "hsi.tif"), str(npy)), [],
       ["small.npy", "24x29", "hsi.tif", "24x30"]),
      (scene_yaml, ["--missing", "SAR"], ["--missing 'SAR'", "HSI, LiDAR"]),
      (scene_yaml, ["--missing", "HSI,LiDAR"], ["no modality left"]),
      (bad / "nothere", [], ["--input", "nothere: not found"]),
      (scene_yaml, ["--batch", "1000000000"], ["--batch 1000000000", "at most 65536"]),
  ]
  rc, _, err = _predict(capsys, "--model", student, "--input", scene_yaml,
                        "--out", str(tmp_path / "map\udcff.tif"))  # the byte 0xff in argv
  assert_one_line_error(rc, err, "--out", "map\\xff.tif", "not a UTF-8 path")
  before = listing(tmp_path)
  for src, extra, fragments in cases:
    rc, _, err = _predict(capsys, "--model", student, "--input", src,
                          "--out", tmp_path / "never.tif", *extra)
    assert_one_line_error(rc, err, *fragments)
  assert_nothing_written(tmp_path, before)


def _disk_full_for(name):
  """os.fsync failing with ENOSPC for the temporary file of output `name` (the data of our own
  atomic writes reach the disk there)."""
  real = os.fsync

  def fsync(fd):
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(fd)

  return fsync


def test_predict_output_in_use_leftovers_and_a_full_disk(capsys, tmp_path, run_dir, scene_yaml,
                                                         monkeypatch):
  """--out is locked while a predict writes it; what a killed predict of the same outputs left is
  removed; a full disk at any output is one line and no output appears, not even those
  finished before it."""
  out = tmp_path / "map.tif"
  args = ["--model", run_dir / "student", "--input", scene_yaml, "--out", out, "--probabilities"]
  with locks.hold(str(tmp_path / ".map.tif.lock"), "the test", warn=print):
    before = listing(tmp_path)
    rc, _, err = _predict(capsys, *args)
    assert_one_line_error(rc, err, f"--out {out}: in use by pid {os.getpid()} on host ")
    assert_nothing_written(tmp_path, before)
  for name in (".map.tif.k1ll3d00.tmp", ".map_probabilities.tif.abcdefgh.tmp",
               ".other.tif.abcdefgh.tmp"):
    (tmp_path / name).write_bytes(b"x" * 1000)
  for failing in ("map.png", "map.tif.aux.xml"):  # the last output, and one within the GeoTIFF's
    with monkeypatch.context() as mp:
      mp.setattr(os, "fsync", _disk_full_for(failing))
      rc, _, err = _predict(capsys, *args)
    assert_one_line_error(rc, err, f"{tmp_path / failing}: no space left on device; free some "
                          "space, then rerun the same command")
    if failing == "map.png":  # the first run removed what the killed one left
      assert f"warning: {tmp_path}: removed 2 temporary file(s) left by an interrupted predict" in err
    assert sorted(os.listdir(tmp_path)) == [".other.tif.abcdefgh.tmp"]  # another program's
  assert _predict(capsys, *args)[0] == 0
  assert sorted(os.listdir(tmp_path)) == [".other.tif.abcdefgh.tmp", "map.png", "map.tif",
                                          "map.tif.aux.xml", "map_probabilities.tif"]


@pytest.mark.slow
def test_old_checkpoint_says_how_to_export(capsys, tmp_path, run_dir, scene_yaml):
  old = tmp_path / "old"
  shutil.copytree(run_dir, old)
  shutil.rmtree(old / "student" / "inputs")
  rc, _, err = _predict(capsys, "--model", old / "student", "--input", scene_yaml,
                        "--out", tmp_path / "map.tif")
  assert_one_line_error(rc, err, "does not record its input transform", "--export-inputs")
  assert not (tmp_path / "map.tif").exists()
  rc, out, err = run_cli(capsys, evaluate.main, ["--workdir", old,
                                                 "--export-inputs"])
  assert rc == 0, err
  assert "input transform and dataset definition added" in out
  assert checkpoint.load_inputs(old / "student") == checkpoint.load_inputs(run_dir / "student")
  rc, _, err = _predict(capsys, "--model", old / "student", "--input", scene_yaml,
                        "--out", tmp_path / "map.tif")
  assert rc == 0, err
  # damaged inputs: the advised repair rebuilds them
  (old / "student" / "inputs" / "metadata").write_text('{"transform": ')
  rc, _, err = _predict(capsys, "--model", old / "student", "--input", scene_yaml,
                        "--out", tmp_path / "map2.tif")
  assert_one_line_error(rc, err, "inputs/metadata", "--export-inputs")
  rc, out, err = run_cli(capsys, evaluate.main, ["--workdir", old, "--export-inputs"])
  assert rc == 0, err
  assert "input transform and dataset definition rebuilt (they were damaged)" in out
  assert checkpoint.load_inputs(old / "student") == checkpoint.load_inputs(run_dir / "student")


@pytest.mark.parametrize("lidar", [np.float32(1e30), np.float32(np.nan)])
def test_a_wrong_byte_order_is_named_when_the_values_show_it(tmp_path, lidar):
  """An ENVI header with the wrong byte order reads garbage: values far beyond any sensor's
  (or NaN) are an error naming the file and the likely cause, before anything is trained."""
  path = scene_files.write_scene(tmp_path)
  img = tmp_path / "lidar.img"
  values = np.fromfile(img, np.float32)
  values[5] = lidar
  values.tofile(img)
  with pytest.raises(UserError) as e:
    data.load_scene(dataset_file.load_dataset_file(str(path)))
  msg = str(e.value)
  assert "lidar" in msg and "byte order" in msg and "\n" not in msg, msg
