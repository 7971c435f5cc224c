"""Bad input to the data and text CLIs / readers: every case one line `error: ...` naming the file
(or flag) and what was expected, exit status 2, no traceback, nothing written.

The damaged files are made here in tmp_path from a tiny Trento-shaped scene (16 x 16, HSI 63 bands,
LiDAR 1, 6 classes); nothing from ../shared is needed.
"""
import json
import pathlib
import zipfile

import h5py
import numpy as np
import pytest
import scipy.io

from cli_errors import assert_nothing_written, assert_one_line_error, listing, run_cli
from dpmamba_jax.data import preprocessing
from dpmamba_jax.data.__main__ import main as data_main
from dpmamba_jax.errors import UserError
from dpmamba_jax.text import clip
from dpmamba_jax.text.__main__ import main as text_main

H = W = 16  # >= the Trento patch size (15)
BANDS = 63
MAT_EXPECTED = "expected a MATLAB .mat file"
NPY_EXPECTED = "expected a NumPy .npy file"
NPZ_EXPECTED = "expected a NumPy .npz archive"


def _arrays():
  rng = np.random.default_rng(0)
  hsi = rng.uniform(0, 1, (H, W, BANDS)).astype(np.float32)
  lidar = rng.uniform(0, 10, (H, W)).astype(np.float32)
  labels = (np.arange(H * W).reshape(H, W) % 6 + 1).astype(np.uint8)  # 42-43 pixels per class
  return hsi, lidar, labels


@pytest.fixture
def scene_dir(tmp_path):
  d = tmp_path / "trento"
  d.mkdir()
  hsi, lidar, labels = _arrays()
  np.save(d / "HSI_data.npy", hsi)
  np.save(d / "LiDAR_data.npy", lidar)
  np.save(d / "All_Label.npy", labels)
  return d


def _flip(path: pathlib.Path, start: int, stop: int):
  b = bytearray(path.read_bytes())
  for i in range(start, min(stop, len(b))):
    b[i] ^= 0xFF
  path.write_bytes(bytes(b))


def _cut(path: pathlib.Path, keep):
  b = path.read_bytes()
  path.write_bytes(b[:keep(len(b))])


def _mat(d, **kw):
  """HSI_data.mat (found before HSI_data.npy) holding the HSI cube."""
  p = d / "HSI_data.mat"
  scipy.io.savemat(p, {"HSI_data": _arrays()[0]}, **kw)
  return p


def _v73(d):
  p = d / "HSI_data.mat"
  with h5py.File(p, "w", userblock_size=512) as f:
    f.create_dataset("HSI_data", data=_arrays()[0].T)
  return p


def _npz(d, **arrays):
  (d / "HSI_data.npy").unlink()
  p = d / "HSI_data.npz"
  np.savez(p, **arrays)
  return p


def mat_zlib(d):
  _flip(_mat(d, do_compression=True), 300, 400)  # inside the compressed stream: zlib.error
  return "HSI_data.mat", "cannot be read as .mat", "zlib.error", MAT_EXPECTED


def mat_truncated(d):
  _cut(_mat(d), lambda n: n // 2)
  return "HSI_data.mat", "cannot be read as .mat", MAT_EXPECTED


def mat_cut_header(d):
  _cut(_mat(d), lambda n: 100)  # scipy: IndexError
  return "HSI_data.mat", "cannot be read as .mat", MAT_EXPECTED


def mat_empty(d):
  (d / "HSI_data.mat").write_bytes(b"")
  return "HSI_data.mat", "is empty (0 bytes)", MAT_EXPECTED


def mat_text(d):
  (d / "HSI_data.mat").write_text("this is a text file, not a MATLAB file\n" * 5)
  return "HSI_data.mat", "cannot be read as .mat", MAT_EXPECTED


def mat_tiny_text(d):
  (d / "HSI_data.mat").write_text("hi\n")  # scipy: MatReadError
  return "HSI_data.mat", "cannot be read as .mat", MAT_EXPECTED


def mat_v73_truncated(d):
  _cut(_v73(d), lambda n: n // 2)
  return "HSI_data.mat", "cannot be read as .mat", MAT_EXPECTED


def mat_complex(d):
  scipy.io.savemat(d / "HSI_data.mat", {"HSI_data": _arrays()[0].astype(np.complex64)})
  return "HSI_data.mat", "'HSI_data'", "complex", "expected real numbers"


def mat_v73_complex(d):
  with h5py.File(d / "HSI_data.mat", "w", userblock_size=512) as f:
    f.create_dataset("HSI_data", data=_arrays()[0].T.astype(np.complex64))
  return "HSI_data.mat", "'HSI_data'", "complex", "expected real numbers"


def mat_label_text(d):
  scipy.io.savemat(d / "All_Label.mat", {"All_Label": "not a label map"})
  return "All_Label.mat", "'All_Label'", "holds text", "expected a numeric array"


def mat_label_cell(d):
  scipy.io.savemat(d / "All_Label.mat", {"All_Label": np.array([[1, "a"]], dtype=object)})
  return "All_Label.mat", "'All_Label'", "expected a numeric array"


def npy_strings(d):
  np.save(d / "HSI_data.npy", np.array(["a", "b"]))
  return "HSI_data.npy", "holds text", "expected a numeric array"


def npy_object(d):
  np.save(d / "HSI_data.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
  return "HSI_data.npy", "holds objects", "expected a numeric array"


def npy_complex(d):
  np.save(d / "HSI_data.npy", _arrays()[0].astype(np.complex64))
  return "HSI_data.npy", "complex", "expected real numbers"


def npy_bool_cube(d):
  np.save(d / "LiDAR_data.npy", _arrays()[1] > 5)
  return "LiDAR_data.npy", "dtype bool", "expected real numbers"


def npy_label_strings(d):
  np.save(d / "All_Label.npy", np.full((H, W), "x"))
  return "All_Label.npy", "holds text", "expected a numeric array"


def npy_label_complex(d):
  np.save(d / "All_Label.npy", _arrays()[2].astype(np.complex64))
  return "All_Label.npy", "complex", "expected real numbers"


def npy_empty_array(d):
  np.save(d / "HSI_data.npy", np.zeros((0, W, BANDS), np.float32))
  return "HSI_data.npy", "is empty", "expected a non-empty numeric array"


def npy_truncated(d):
  _cut(d / "HSI_data.npy", lambda n: n // 2)
  return "HSI_data.npy", "cannot be read as .npy", NPY_EXPECTED


def npy_zero_bytes(d):
  (d / "HSI_data.npy").write_bytes(b"")
  return "HSI_data.npy", "is empty (0 bytes)", NPY_EXPECTED


def npy_text(d):
  (d / "HSI_data.npy").write_text("hello")
  return "HSI_data.npy", "not a .npy file", NPY_EXPECTED


def npz_strings(d):
  _npz(d, a=np.array(["a", "b"]), b=np.array(["c"]))
  return "HSI_data.npz", "holds no numeric array", "expected a non-empty array of real numbers"


def npz_object(d):
  _npz(d, HSI_data=np.array([{"a": 1}, None], dtype=object))
  return "HSI_data.npz", "'HSI_data'", "holds objects", "expected a numeric array"


def npz_truncated(d):
  _cut(_npz(d, HSI_data=_arrays()[0]), lambda n: n // 2)
  return "HSI_data.npz", "cannot be read as .npz", "BadZipFile", NPZ_EXPECTED


def npz_corrupt(d):
  p = d / "HSI_data.npz"
  (d / "HSI_data.npy").unlink()
  np.savez_compressed(p, HSI_data=_arrays()[0])
  _flip(p, 200, 300)
  return "HSI_data.npz", "cannot be read as .npz", NPZ_EXPECTED


def npz_zero_bytes(d):
  _npz(d).write_bytes(b"")
  return "HSI_data.npz", "is empty (0 bytes)", NPZ_EXPECTED


def npz_is_npy(d):
  (d / "HSI_data.npy").rename(d / "HSI_data.npz")
  return "HSI_data.npz", "is a .npy file, not a .npz archive"


DATA_FILE_CASES = [mat_zlib, mat_truncated, mat_cut_header, mat_empty, mat_text, mat_tiny_text,
                   mat_v73_truncated, mat_complex, mat_v73_complex, mat_label_text, mat_label_cell,
                   npy_strings, npy_object, npy_complex, npy_bool_cube, npy_label_strings,
                   npy_label_complex, npy_empty_array, npy_truncated, npy_zero_bytes, npy_text,
                   npz_strings, npz_object, npz_truncated, npz_corrupt, npz_zero_bytes, npz_is_npy]


@pytest.mark.parametrize("damage", DATA_FILE_CASES, ids=lambda f: f.__name__)
def test_data_cli_damaged_file(capsys, tmp_path, scene_dir, damage):
  fragments = damage(scene_dir)
  before = listing(tmp_path)
  rc, out, err = run_cli(capsys, data_main, ["--dataset", "trento", "--data-dir", scene_dir,
                                             "--per-class", 2])
  assert_one_line_error(rc, err, *fragments)
  assert out == ""
  assert_nothing_written(tmp_path, before)


def test_data_cli_accepts_the_tiny_scene(capsys, scene_dir):
  """The undamaged scene of these tests loads (so each case above fails for its damage only)."""
  rc, out, err = run_cli(capsys, data_main, ["--dataset", "trento", "--data-dir", scene_dir,
                                             "--per-class", 2, "--json"])
  assert rc == 0, err
  assert json.loads(out)["split"]["train"] == 12


@pytest.mark.parametrize("argv, fragments", [
    (["--per-class", "-3"], ("--per-class -3", "expected an int >= 1")),
    (["--per-class", "0"], ("--per-class 0", "expected an int >= 1")),
    (["--seed", "-1"], ("--seed -1", "expected a non-negative int")),
    (["--per-class", "1000"], ("class 1 (Apple trees)", "fewer than the 1000")),
], ids=["per-class-negative", "per-class-zero", "seed-negative", "per-class-too-many"])
def test_data_cli_bad_flags(capsys, tmp_path, scene_dir, argv, fragments):
  before = listing(tmp_path)
  rc, out, err = run_cli(capsys, data_main, ["--dataset", "trento", "--data-dir", scene_dir, *argv])
  assert_one_line_error(rc, err, *fragments)
  assert_nothing_written(tmp_path, before)


def _maps(path, train=None, test=None):
  labels = _arrays()[2]
  first = np.arange(H * W).reshape(H, W) < 60
  np.savez(path, train=np.where(first, labels, 0) if train is None else train,
           test=np.where(first, 0, labels) if test is None else test)
  return path


def maps_truncated(p):
  _cut(_maps(p), lambda n: n // 2)
  return "maps.npz", "cannot be read as .npz", NPZ_EXPECTED


def maps_text(p):
  p.write_text("train,test\n")
  return "maps.npz", "not a .npz archive", NPZ_EXPECTED


def maps_bool(p):
  _maps(p, train=np.ones((H, W), bool))
  return "maps.npz:train", "boolean map", "expected class indices"


def maps_fraction(p):
  _maps(p, train=np.full((H, W), 0.5))
  return "maps.npz:train", "not an integer", "expected class indices"


def maps_strings(p):
  _maps(p, test=np.full((H, W), "a"))
  return "maps.npz", "'test'", "holds text"


@pytest.mark.parametrize("damage", [maps_truncated, maps_text, maps_bool, maps_fraction,
                                    maps_strings], ids=lambda f: f.__name__)
def test_data_cli_bad_split_maps(capsys, tmp_path, scene_dir, damage):
  p = tmp_path / "maps.npz"
  fragments = damage(p)
  before = listing(tmp_path)
  rc, _, err = run_cli(capsys, data_main, ["--dataset", "trento", "--data-dir", scene_dir,
                                           "--split-maps", p])
  assert_one_line_error(rc, err, *fragments)
  assert_nothing_written(tmp_path, before)


# --------------------------------------------------------------------------------------------------
# Split files (library: load_split / split_from_maps / make_split)


def _good_split():
  return preprocessing.make_split(_arrays()[2], 3, seed=0)


def split_truncated(p):
  preprocessing.save_split(p, _good_split())
  _cut(p, lambda n: n // 2)
  return "split.npz", "not a readable split .npz", "BadZipFile"


def split_zero_bytes(p):
  p.write_bytes(b"")
  return "split.npz", "is empty (0 bytes)", "train_idx, test_idx"


def split_text(p):
  p.write_text("1 2 3\n")
  return "split.npz", "not a split .npz", "train_idx, test_idx"


def split_missing_key(p):
  np.savez(p, train_idx=np.arange(3))
  return "split.npz", "no key 'test_idx'"


def split_strings(p):
  np.savez(p, train_idx=np.array(["a"]), test_idx=np.array([7]))
  return "split.npz", "train_idx has dtype <U1", "expected a 1-D array of integer"


def split_floats(p):
  np.savez(p, train_idx=np.array([1.5]), test_idx=np.array([7]))
  return "split.npz", "train_idx has dtype float64", "integer flat pixel indices"


def split_2d(p):
  np.savez(p, train_idx=np.zeros((2, 2), int), test_idx=np.array([7]))
  return "split.npz", "shape (2, 2)", "expected a 1-D array"


def split_object(p):
  np.savez(p, train_idx=np.array([None], object), test_idx=np.array([7]))
  return "split.npz", "not a readable split .npz"


def split_bad_seed(p):
  np.savez(p, train_idx=np.array([1]), test_idx=np.array([7]), seed=np.array([1, 2]))
  return "split.npz", "seed has dtype int64 and shape (2,)", "expected one integer"


def split_outside(p):
  np.savez(p, train_idx=np.array([1, H * W + 5]), test_idx=np.array([7]))
  return "split.npz", f"index {H * W + 5} outside the scene", f"expected 0..{H * W - 1}"


def split_negative(p):
  np.savez(p, train_idx=np.array([-5, 1]), test_idx=np.array([7]))
  return "split.npz", "index -5 outside the scene"


def split_duplicates(p):
  np.savez(p, train_idx=np.array([1, 1, 2]), test_idx=np.array([7]))
  return "split.npz", "train_idx holds 1 pixels more than once (e.g. pixel 1)", "expected each"


def split_empty_train(p):
  np.savez(p, train_idx=np.zeros(0, np.int64), test_idx=np.array([7]))
  return "split.npz", "train_idx is empty"


def split_overlap(p):
  np.savez(p, train_idx=np.array([1, 2, 3]), test_idx=np.array([2, 3, 4]))
  return ("split.npz", "2 pixels are in both train_idx and test_idx; expected disjoint sets "
          "(use include_train_in_test to test on training pixels)")


SPLIT_CASES = [split_truncated, split_zero_bytes, split_text, split_missing_key, split_strings,
               split_floats, split_2d, split_object, split_bad_seed, split_outside,
               split_negative, split_duplicates, split_empty_train, split_overlap]


def _one_line_user_error(fn, *args, **kw) -> str:
  with pytest.raises(UserError) as e:
    fn(*args, **kw)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


@pytest.mark.parametrize("damage", SPLIT_CASES, ids=lambda f: f.__name__)
def test_load_split_bad_file(tmp_path, damage):
  p = tmp_path / "split.npz"
  fragments = damage(p)
  msg = _one_line_user_error(preprocessing.load_split, p, _arrays()[2])
  for f in fragments:
    assert f in msg, (f, msg)
  if damage not in (split_outside, split_negative):  # these need the scene to be detected
    msg = _one_line_user_error(preprocessing.load_split, p)
    assert "split.npz" in msg


def test_load_split_overlap_only_when_allowed(tmp_path):
  labels = _arrays()[2]
  p = tmp_path / "split.npz"
  split_overlap(p)
  s = preprocessing.load_split(p, labels, allow_overlap=True)
  assert np.intersect1d(s.train_idx, s.test_idx).size == 2
  split = preprocessing.Split(s.train_idx, s.test_idx, 0)
  with pytest.raises(UserError, match="2 pixels are in both"):
    preprocessing.check_split(split, labels)
  preprocessing.check_split(split, labels, allow_overlap=True)
  # A split drawn with include_train_in_test says so in the file: it loads as it was saved.
  incl = preprocessing.make_split(labels, 3, seed=0, include_train_in_test=True)
  q = tmp_path / "run" / "split.npz"
  preprocessing.save_split(q, incl)
  back = preprocessing.load_split(q, labels)
  np.testing.assert_array_equal(back.test_idx, incl.test_idx)
  # A disjoint split saved and loaded is unchanged; the strict check holds for it.
  preprocessing.save_split(q, _good_split())
  back = preprocessing.load_split(q, labels)
  assert np.intersect1d(back.train_idx, back.test_idx).size == 0


@pytest.mark.parametrize("damage", [maps_truncated, maps_text, maps_bool, maps_fraction,
                                    maps_strings], ids=lambda f: f.__name__)
def test_split_from_maps_bad_file(tmp_path, damage):
  p = tmp_path / "maps.npz"
  fragments = damage(p)
  for labels in (_arrays()[2], None):
    msg = _one_line_user_error(preprocessing.split_from_maps, p, labels=labels)
    for f in fragments:
      assert f in msg, (f, msg)


@pytest.mark.parametrize("per_class, seed, fragment", [
    (0, 0, "train_per_class=0; expected an int >= 1"),
    (-3, 0, "train_per_class=-3; expected an int >= 1"),
    (2.5, 0, "train_per_class=2.5; expected an int >= 1"),
    (2, -1, "seed=-1; expected a non-negative int"),
])
def test_make_split_bad_numbers(per_class, seed, fragment):
  assert fragment in _one_line_user_error(preprocessing.make_split, _arrays()[2], per_class, seed)


# --------------------------------------------------------------------------------------------------
# CLIP text weights (python -m dpmamba_jax.text --encoder clip --clip-weights X)

WEIGHTS_EXPECTED = "expected an OpenAI-format CLIP text state dict"
# Each case writes its damaged weights into a folder and returns (the --clip-weights argument
# relative to it, *fragments the error line must hold).


def _garbage(n=4096):
  return b"\xff" * 8 + np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()


def _sd(**changes):
  sd = clip.random_openai_state_dict(0, width=16, layers=1, vocab_size=64, context_length=8,
                                     embed_dim=16)
  for k, v in changes.items():
    if v is None:
      del sd[k]
    else:
      sd[k] = v
  return sd


def w_npz_garbage(d):
  (d / "w.npz").write_bytes(_garbage())
  return "w.npz", "is not a .npz archive", WEIGHTS_EXPECTED


def w_npz_truncated(d):
  np.savez(d / "w.npz", **_sd())
  _cut(d / "w.npz", lambda n: n // 2)
  return "w.npz", "cannot be read as .npz", "BadZipFile", WEIGHTS_EXPECTED


def w_npz_zero_bytes(d):
  (d / "w.npz").write_bytes(b"")
  return "w.npz", "is empty (0 bytes)", WEIGHTS_EXPECTED


def w_npz_object(d):
  np.savez(d / "w.npz", a=np.array([None], dtype=object))
  return "w.npz", "Object arrays cannot be loaded", WEIGHTS_EXPECTED


def w_npz_no_clip_keys(d):
  np.savez(d / "w.npz", a=np.zeros(3), b=np.ones(2))
  return "w.npz", "not an OpenAI CLIP text state dict", "'token_embedding.weight'", "keys: a, b"


def w_npz_missing_key(d):
  np.savez(d / "w.npz", **_sd(**{"ln_final.bias": None}))
  return "w.npz", "missing key 'ln_final.bias'", "expected a complete OpenAI-format"


def w_npz_text_tensor(d):
  np.savez(d / "w.npz", **_sd(**{"ln_final.weight": np.array(["x"] * 16)}))
  return "w.npz", "ln_final.weight has dtype <U1", "expected a tensor of real numbers"


def w_npz_nan(d):
  np.savez(d / "w.npz", **_sd(**{"ln_final.weight": np.full(16, np.nan, np.float32)}))
  return "w.npz", "holds NaN/Inf values", "expected finite weights"


def w_npz_bad_in_proj(d):
  sd = _sd()
  sd["transformer.resblocks.0.attn.in_proj_weight"] = sd[
      "transformer.resblocks.0.attn.in_proj_weight"][:5]
  np.savez(d / "w.npz", **sd)
  return "w.npz", "in_proj_weight has shape (5, 16), expected (48, 16)"


def w_safetensors_garbage(d):
  (d / "w.safetensors").write_bytes(_garbage())
  return "w.safetensors", "header too large", WEIGHTS_EXPECTED


def w_safetensors_zero_bytes(d):
  (d / "w.safetensors").write_bytes(b"")
  return "w.safetensors", "cannot be read as .safetensors", WEIGHTS_EXPECTED


def w_mat(d):
  (d / "w.mat").write_bytes(_garbage())
  return "w.mat", "unsupported CLIP weights file type", WEIGHTS_EXPECTED


def w_missing(d):
  (d / "w.npz").unlink(missing_ok=True)
  return "w.npz", "CLIP weights not found", WEIGHTS_EXPECTED


def w_empty_folder(d):
  (d / "w").mkdir()
  return "w", "folder holds no CLIP weights", "model.safetensors", WEIGHTS_EXPECTED


def w_folder_garbage_safetensors(d):
  (d / "w").mkdir()
  (d / "w" / "model.safetensors").write_bytes(_garbage())
  return "w", "w/model.safetensors", "header too large", WEIGHTS_EXPECTED


def w_folder_garbage_msgpack(d):
  (d / "w").mkdir()
  (d / "w" / "flax_model.msgpack").write_bytes(_garbage())
  return "w", "w/flax_model.msgpack", "cannot be read as Flax msgpack", WEIGHTS_EXPECTED


def w_folder_bad_config(d):
  (d / "w").mkdir()
  (d / "w" / "config.json").write_text("{not json")
  from safetensors.numpy import save_file
  save_file({"a": np.zeros(3, np.float32)}, str(d / "w" / "model.safetensors"))
  return "w", "w/config.json", "not a readable CLIP config", "expected the config.json"


WEIGHT_CASES = [w_npz_garbage, w_npz_truncated, w_npz_zero_bytes, w_npz_object, w_npz_no_clip_keys,
                w_npz_missing_key, w_npz_text_tensor, w_npz_nan, w_npz_bad_in_proj,
                w_safetensors_garbage, w_safetensors_zero_bytes, w_mat, w_missing,
                w_empty_folder, w_folder_garbage_safetensors, w_folder_garbage_msgpack,
                w_folder_bad_config]


@pytest.mark.parametrize("damage", WEIGHT_CASES, ids=lambda f: f.__name__)
def test_text_cli_bad_clip_weights(capsys, tmp_path, monkeypatch, damage):
  monkeypatch.delenv("DPMAMBA_CLIP_WEIGHTS", raising=False)
  d = tmp_path / "weights"
  d.mkdir()
  fragments = damage(d)
  target = d / fragments[0]  # the --clip-weights argument, named in the message
  before = listing(tmp_path)
  rc, out, err = run_cli(capsys, text_main, ["--dataset", "trento", "--encoder", "clip",
                                             "--clip-weights", target,
                                             "--cache-dir", tmp_path / "cache"])
  assert_one_line_error(rc, err, *fragments)
  assert out == ""
  assert_nothing_written(tmp_path, before)  # no feature cache written


def test_text_cli_bad_class_texts(capsys, tmp_path):
  p = tmp_path / "texts.json"
  p.write_bytes(b"\x97\xff not utf-8")
  before = listing(tmp_path)
  rc, _, err = run_cli(capsys, text_main, ["--dataset", "trento", "--encoder", "random",
                                           "--class-texts", p, "--cache-dir", tmp_path / "c"])
  assert_one_line_error(rc, err, "texts.json", "not UTF-8 text", "expected a JSON / YAML list")
  assert_nothing_written(tmp_path, before)


@pytest.mark.filterwarnings("ignore::dpmamba_jax.text.texts.RandomTextEncoderWarning")
def test_text_damaged_cache_is_a_miss(capsys, tmp_path):
  """A damaged feature cache file is recomputed (and rewritten), not a traceback."""
  argv = ["--dataset", "trento", "--encoder", "random", "--cache-dir", tmp_path / "c", "--json"]
  rc, out, _ = run_cli(capsys, text_main, argv)
  assert rc == 0
  (cache,) = (tmp_path / "c").iterdir()
  good = json.loads(out)["similarity"]
  _cut(cache, lambda n: n // 2)
  rc, out, err = run_cli(capsys, text_main, argv)
  assert rc == 0 and "is unreadable" in err, err
  assert json.loads(out)["similarity"] == good
  with zipfile.ZipFile(cache) as z:  # rewritten whole
    assert "features.npy" in z.namelist()
