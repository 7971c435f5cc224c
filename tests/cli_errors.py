"""Helpers of the bad-input tests: a CLI run in-process must end in one line `error: ...` (exit
2, no traceback) or succeed, and a failing command must leave no output behind."""
import os
import pathlib

import pytest


def run_cli(capsys, main, argv):
  """Runs a CLI `main(argv)` in this process; returns (exit status, stdout, stderr)."""
  capsys.readouterr()  # drop what came before
  rc = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def assert_one_line_error(rc, err, *fragments):
  """Exit status 2 and stderr's last line `error: ...` naming every fragment (case-sensitive);
  no other line starts with "error:" and no traceback was printed."""
  assert rc == 2, f"exit {rc}, expected 2; stderr: {err[-2000:]}"
  assert "Traceback" not in err, err[-2000:]
  lines = [l for l in err.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line last: {lines}"
  for f in fragments:
    assert f in errors[0], f"{f!r} not in {errors[0]!r}"
  return errors[0]


def listing(root) -> set[str]:
  """Every path below `root` (relative), for checking that a failed command wrote nothing."""
  root = pathlib.Path(root)
  if not root.exists():
    return set()
  return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_nothing_written(root, before: set[str]):
  """No new file or folder below `root` since `before = listing(root)` (temp files included)."""
  new = listing(root) - before
  assert not new, f"left behind: {sorted(new)}"


def assert_no_temp_files(root):
  """No atomic-write leftovers (`.<name>.*.tmp`, orbax `*.orbax-checkpoint-tmp*`) below `root`."""
  left = [p for p in listing(root) if os.path.basename(p).endswith(".tmp")
          or "orbax-checkpoint-tmp" in p]
  assert not left, f"temp files left: {left}"


def private_text_cache(tmp_path_factory):
  """Module-fixture body: the text features cache in a temp folder, not the user's. Use as
  `_cache_dir = pytest.fixture(scope="module", autouse=True)(private_text_cache)`."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DPMAMBA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
