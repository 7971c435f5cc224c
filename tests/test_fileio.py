"""Atomic writes, what killed writes leave, full disks, and the safe PyTorch state-dict reader."""
import errno
import importlib.util
import json
import os
import stat

import numpy as np
import pytest

from dpmamba_jax import errors
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


def test_stale_temps_of_ours_are_removed_and_nothing_else(tmp_path):
  """What killed writes leave (`.NAME.XXXXXXXX.tmp`, ENVI's pair, orbax's folders) goes; files
  that only look alike stay."""
  ours = [".metrics.json.ab12_x9z.tmp", ".map.tif.0123abcd.tmp", ".x.hdr.abcdefgh.tmp.hdr",
          ".x.hdr.abcdefgh.tmp.img"]
  theirs = ["notes.tmp", ".vimrc.tmp", ".a.b.TOOLONG99.tmp", "metrics.json", ".map.tif.lock"]
  for name in ours + theirs:
    (tmp_path / name).write_bytes(b"x")
  (tmp_path / "teacher.orbax-checkpoint-tmp").mkdir()
  (tmp_path / "teacher.orbax-checkpoint-tmp" / "state").write_bytes(b"x")
  (tmp_path / "3.orbax-checkpoint-tmp-1733500000").mkdir()
  removed = fileio.remove_stale_temps(tmp_path, names={"map.tif"})
  assert [os.path.basename(p) for p in removed] == [".map.tif.0123abcd.tmp"]
  removed = fileio.remove_stale_temps(tmp_path)
  assert sorted(os.path.basename(p) for p in removed) == sorted(
      [n for n in ours if n != ".map.tif.0123abcd.tmp"]
      + ["teacher.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1733500000"])
  assert sorted(os.listdir(tmp_path)) == sorted(theirs)
  assert fileio.remove_stale_temps(tmp_path / "absent") == []


def test_a_temp_file_has_the_name_stale_cleanup_knows(tmp_path):
  tmp = fileio.temp_file(tmp_path / "out.json")
  assert fileio.remove_stale_temps(tmp_path, names={"out.json"}) == [tmp]


def _full_disk(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
  path = tmp_path / "m.json"
  fileio.write_text(path, "old")
  monkeypatch.setattr(os, "fsync", _full_disk)  # the data reach the disk at fsync
  with pytest.raises(errors.NoSpace) as e:
    fileio.write_json(path, {"a": 1})
  assert str(e.value) == (f"{path}: no space left on device; free some space, then rerun the "
                          "same command")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["m.json"]


def test_full_disk_errors_are_recognised_through_their_causes():
  ts = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/r/ckpt/1/x\": Failed to write "
                  "9 bytes to file 7: No space left on device [os_error_code='28']")
  assert errors.is_no_space(ts)
  assert errors.is_no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = OSError(errno.ENOSPC, "x")
  assert errors.is_no_space(wrapped)
  assert not errors.is_no_space(OSError(errno.EACCES, "Permission denied"))
  assert not errors.is_no_space(ValueError("RESOURCE_EXHAUSTED: out of memory"))


def test_cli_entry_turns_any_full_disk_into_one_line(capsys):
  """A library's own write (tensorstore's message, an OSError with its file) that no write path
  named: still one line and exit 2; other errors keep their traceback."""

  @errors.cli_entry
  def tensorstore_write(argv=None):
    raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/r/a.bin\": Failed writing: "
                     "\"/r/a.bin.__lock\": No space left on device [os_error_code='28']")

  @errors.cli_entry
  def plain_write(argv=None):
    raise OSError(errno.ENOSPC, "No space left on device", "/r/b.npz")

  @errors.cli_entry
  def other(argv=None):
    raise OSError(errno.EACCES, "Permission denied", "/r/c")

  assert tensorstore_write() == 2
  assert capsys.readouterr().err == ("error: /r/a.bin: no space left on device; free some space, "
                                     "then rerun the same command\n")
  assert plain_write() == 2
  assert capsys.readouterr().err.startswith("error: /r/b.npz: no space left on device; ")
  with pytest.raises(PermissionError):
    other()
