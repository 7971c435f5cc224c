"""One writer at a time (locks.py): a held lock stops a second process with one line naming the
holder; a lock left by a dead process is taken over with a warning; a release leaves nothing."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dpmamba_jax import locks
from dpmamba_jax.errors import UserError


def _holder_script(path: str) -> str:
  return (f"import time; from dpmamba_jax import locks\n"
          f"with locks.hold({path!r}, 'the test folder', warn=print):\n"
          f"  print('held', flush=True); time.sleep(60)\n")


def test_a_held_lock_names_its_holder(tmp_path):
  """Another process holds the lock: one line with its pid, host and since when; nothing of
  ours is left (the lock file keeps its holder)."""
  path = str(tmp_path / ".dpmamba.lock")
  proc = subprocess.Popen([sys.executable, "-c", _holder_script(path)], stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    t0 = time.time()
    with pytest.raises(UserError) as e:
      with locks.hold(path, "--workdir W", warn=print):
        pass
    assert time.time() - t0 < 1.0
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"--workdir W: in use by pid {proc.pid} on host {socket.gethostname()} "
                          "since ")
    assert path in msg
    assert json.loads(open(path).read())["pid"] == proc.pid
  finally:
    proc.kill()
    proc.wait()
  # the kernel released the killed holder's lock; its file stays, and is taken over
  warnings = []
  with locks.hold(path, "--workdir W", warn=warnings.append):
    assert json.loads(open(path).read())["pid"] == os.getpid()
  assert len(warnings) == 1
  assert warnings[0].startswith(f"warning: {path}: taking over the lock of pid {proc.pid} ")
  assert "killed?" in warnings[0]
  assert not os.path.exists(path)  # a clean release removes the file


def test_a_clean_lock_is_silent_and_exclusive_within_a_process(tmp_path):
  path = str(tmp_path / "l")
  warnings = []
  with locks.hold(path, "x", warn=warnings.append):
    info = json.loads(open(path).read())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(UserError, match=f"^x: in use by pid {os.getpid()} "):
      with locks.hold(path, "x", warn=warnings.append):
        pass
  assert warnings == [] and os.listdir(tmp_path) == []
  with locks.hold(path, "x", warn=warnings.append, enabled=False):  # another host's process
    assert not os.path.exists(path)


def test_an_unreadable_holder_is_still_taken_over(tmp_path):
  path = tmp_path / "l"
  path.write_bytes(b'{"pid": 12')  # cut short by a kill
  warnings = []
  with locks.hold(str(path), "x", warn=warnings.append):
    pass
  assert warnings and "its lock file does not say which" in warnings[0]


def test_a_lock_in_a_missing_folder_is_one_line(tmp_path):
  with pytest.raises(UserError, match="cannot create the lock of x"):
    with locks.hold(str(tmp_path / "no" / "l"), "x", warn=print):
      pass
