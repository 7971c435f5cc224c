"""Atomic writes and the safe PyTorch state-dict reader."""
import importlib.util
import json
import os
import stat

import numpy as np
import pytest

from dpmamba_jax import fileio
from dpmamba_jax.data import rasters
from dpmamba_jax.errors import UserError


def test_atomic_writes_leave_only_the_file(tmp_path):
  path = tmp_path / "sub" / "m.json"
  fileio.write_json(path, {"a": 1})
  fileio.write_json(path, {"a": 2})  # replaces, never appends
  assert json.loads(path.read_text()) == {"a": 2}
  assert os.listdir(path.parent) == ["m.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / "x.txt"
  fileio.write_text(path, "old")
  with pytest.raises(TypeError):
    fileio.write_bytes(path, "not bytes")  # fails mid-write
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["x.txt"]


def test_outputs_get_the_permissions_of_an_ordinary_new_file(tmp_path):
  """Atomic writes go through 0600 temp files; the results must not stay 0600."""
  (tmp_path / "plain").write_bytes(b"")
  expected = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
  assert expected & stat.S_IRGRP or expected == 0o600  # a umask of 077 would keep 0600
  fileio.write_json(tmp_path / "m.json", {"a": 1})
  arr = np.zeros((3, 4), np.uint8)
  g = rasters.GeoRef(crs_wkt=None, transform=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0), shape=(3, 4))
  rasters.write_geotiff(tmp_path / "m.tif", arr, g)
  rasters.write_envi(tmp_path / "m.hdr", arr, g)
  for name in ("m.json", "m.tif", "m.hdr", "m.img"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == expected, name
  fileio.write_bytes(tmp_path / "x", b"", mode=0o640)
  assert stat.S_IMODE(os.stat(tmp_path / "x").st_mode) == 0o640


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pth_without_torch_is_a_one_line_error(tmp_path):
  path = tmp_path / "w.pth"
  path.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(UserError, match=r"w\.pth: reading \.pth/\.pt needs torch") as e:
    fileio.read_torch_state_dict(str(path))
  assert "\n" not in str(e.value)


def test_what_is_says_what_a_path_is(tmp_path):
  """For messages: a path that is not what a command expected is named for what it is."""
  loop, broken, folder = tmp_path / "loop", tmp_path / "broken", tmp_path / "folder.yaml"
  os.symlink(loop, loop)
  os.symlink(tmp_path / "nowhere", broken)
  folder.mkdir()
  (tmp_path / "file").write_text("x")
  assert fileio.what_is(loop) == "a symlink loop"
  assert fileio.what_is(broken) == f"a broken symlink (to {tmp_path / 'nowhere'})"
  assert fileio.what_is(folder) == "a folder"
  assert fileio.what_is(tmp_path / "file") == "a file"
  assert fileio.what_is(tmp_path / "nothing") == "not found"
  from dpmamba_jax.data import dataset_file
  for path, what in ((folder, "is a folder"), (loop, "is a symlink loop")):
    with pytest.raises(UserError, match=f"dataset file {path}: {what}; expected a YAML file"):
      dataset_file.load_dataset_file(str(path))
