"""Atomic writes and the safe PyTorch state-dict reader."""
import importlib.util
import json
import os

import pytest

from dpmamba_jax import fileio
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


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pth_without_torch_is_a_one_line_error(tmp_path):
  path = tmp_path / "w.pth"
  path.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(UserError, match=r"w\.pth: reading \.pth/\.pt needs torch") as e:
    fileio.read_torch_state_dict(str(path))
  assert "\n" not in str(e.value)
