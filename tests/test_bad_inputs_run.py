"""Bad input and damaged runs of `python -m dpmamba_jax.train` / `evaluate`: each case is one line
`error: ...` naming the file and how to recover (or a one-line warning where the run can go on),
and nothing is left half-written.

One tiny finished run per module (3 epochs: two periodic checkpoints per stage); each case copies
it and damages the copy. Everything runs in this process (train.main / evaluate.main).
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_errors import (assert_no_temp_files, assert_nothing_written, assert_one_line_error,
                        listing, private_text_cache, run_cli)
from dpmamba_jax import evaluate, locks, run, steps, train, trainer
from dpmamba_jax.data import datasets

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the random text encoder's

TINY = ["--text-encoder", "random", "--quiet",
        "--set", "model=tiny", "--set", "depth=0", "--set", "hidden=8", "--set", "patch_size=3",
        "--set", "synthetic_height=40", "--set", "synthetic_width=40",
        "--set", "train_per_class=8", "--set", "batch_size=24", "--set", "eval_batch=256",
        "--set", "log_every=1", "--set", "ckpt_every=1", "--set", "maps=false"]
EPOCHS = ["--epochs", "3"]  # 2 steps per epoch; periodic checkpoints after epochs 1 and 2


def _train(capsys, workdir, *extra, epochs=EPOCHS):
  return run_cli(capsys, train.main, ["--workdir", workdir, *epochs, *TINY, *extra])


def _evaluate(capsys, workdir, *extra):
  return run_cli(capsys, evaluate.main, ["--workdir", workdir, *extra])


_cache_dir = pytest.fixture(scope="module", autouse=True)(private_text_cache)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, _cache_dir):
  """The module's one finished tiny run (teacher/, student/, metrics.json, ckpt/<stage>/{1,2})."""
  w = tmp_path_factory.mktemp("finished") / "run"
  assert train.main(["--workdir", str(w), *EPOCHS, *TINY]) == 0
  for stage in ("pretrain", "distill"):
    assert sorted(os.listdir(w / "ckpt" / stage)) == ["1", "2"]
  return w


def _numbers(path):
  with open(path) as f:
    m = json.load(f)
  m.pop("wall_time_s")
  return m


def _contents(root) -> dict:
  """{relative path: sha256} of every file below root except config.json (a rerun rewrites it
  with its own workdir path, atomically)."""
  out = {}
  for p in sorted(listing(root)):
    full = os.path.join(root, p)
    if os.path.isfile(full) and p != "config.json":
      with open(full, "rb") as f:
        out[p] = hashlib.sha256(f.read()).hexdigest()
  return out


def _copy(finished, tmp_path, damage=None):
  w = tmp_path / "run"
  shutil.copytree(finished, w)
  if damage:
    damage(w)
  return w


def _truncate(rel, size=10):
  def f(w):
    paths = [w / rel] if (w / rel).is_file() else [p for p in (w / rel).rglob("*") if p.is_file()]
    assert paths, rel
    for p in paths:
      os.truncate(p, min(size, p.stat().st_size // 2))
  return f


def _write(rel, text):
  return lambda w: (w / rel).write_text(text)


def _delete(rel):
  return lambda w: shutil.rmtree(w / rel) if (w / rel).is_dir() else (w / rel).unlink()


# ----------------------------------------------------------------------------------------------
# Case 1: the workdir cannot be created or written.


def _permission_denied_below(monkeypatch, folder):
  """As if `folder` were read-only (the tests run as root, where chmod does not stop writes)."""
  real_mkdir, real_mkstemp = os.mkdir, tempfile.mkstemp

  def mkdir(path, *a, **k):
    if os.path.dirname(os.path.abspath(path)) == str(folder):
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return real_mkdir(path, *a, **k)

  def mkstemp(*a, dir=None, **k):
    if dir is not None and os.path.abspath(dir) == str(folder):
      raise PermissionError(13, "Permission denied", os.path.join(dir, "tmp"))
    return real_mkstemp(*a, dir=dir, **k)

  monkeypatch.setattr(os, "mkdir", mkdir)
  monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("case", ["file", "below_a_file", "symlink_loop", "below_read_only",
                                  "read_only"])
def test_unusable_workdir(case, tmp_path, capsys, monkeypatch):
  root = tmp_path / "root"
  root.mkdir()
  (root / "afile").write_text("not a folder\n")
  if case == "file":
    w, want = root / "afile", f"error: --workdir {root / 'afile'}: is a file, expected a folder"
  elif case == "below_a_file":
    w, want = root / "afile" / "sub" / "w", f": {root / 'afile'} is a file, expected a folder"
  elif case == "symlink_loop":
    w = root / "loop"
    os.symlink(w, w)
    want = f"error: --workdir {w}: is a symlink loop, expected a folder"
  elif case == "below_read_only":
    (root / "ro").mkdir()
    _permission_denied_below(monkeypatch, root / "ro")
    w = root / "ro" / "a" / "w"
    want = f"error: --workdir {w}: cannot create {root / 'ro' / 'a'} (Permission denied)"
  else:  # the workdir exists, but config.json cannot be written into it
    (root / "ro").mkdir()
    _permission_denied_below(monkeypatch, root / "ro")
    w = root / "ro"
    want = f"error: --workdir {w}: cannot write config.json (Permission denied)"
  before = listing(root)
  rc, _, err = _train(capsys, w)
  assert assert_one_line_error(rc, err, f"--workdir {w}").startswith("error:")
  assert want in err.splitlines()[-1]
  assert_nothing_written(root, before)


# ----------------------------------------------------------------------------------------------
# Case 2: damaged files of a finished run, on a rerun of the same command and on `evaluate`.

REDO_TEACHER = "delete that folder to redo the pretrain stage"
REDO_STUDENT = "delete that folder to redo the distill stage"
DAMAGED = {  # name: (damage, fragments of the train rerun's error ({w}: the workdir))
    "config_truncated": (_truncate("config.json"), [
        "{w}/config.json: damaged (not valid JSON", "this workdir's settings cannot be checked",
        "use a new --workdir or restore the file"]),
    "config_not_an_object": (_write("config.json", "[1, 2]\n"), [
        "{w}/config.json: damaged (a JSON list, expected an object)"]),
    "metrics_truncated": (_truncate("metrics.json"), [
        "{w}/metrics.json: not valid JSON", "delete it to re-evaluate",
        "or run python -m dpmamba_jax.evaluate --workdir {w}"]),
    "metrics_not_metrics": (_write("metrics.json", '{"OA": 3}\n'), [
        "{w}/metrics.json: no key 'dataset', expected the metrics of a finished run",
        "delete it to re-evaluate"]),
    "split_truncated": (_truncate("split.npz"), [
        "{w}/split.npz", "the models in teacher/ student/ ckpt/ were trained on it",
        "delete it to draw the same split again from seed 0", "or use a new --workdir"]),
    "teacher_meta_garbage": (_write("teacher/meta/metadata", "garbage\n"), [
        "{w}/teacher: damaged checkpoint (meta/metadata: JSONDecodeError", REDO_TEACHER]),
    "teacher_config_incomplete": (_write("teacher/config/metadata", '{"bands": [24, 1]}'), [
        "{w}/teacher: damaged checkpoint (config/metadata: ", "patch_size", REDO_TEACHER]),
    "student_meta_garbage": (_write("student/meta/metadata", "garbage\n"), [
        "{w}/student: damaged checkpoint (meta/metadata: JSONDecodeError", REDO_STUDENT]),
    "student_meta_deleted": (_delete("student/meta"), [
        "{w}/student: damaged checkpoint (meta/metadata: KeyError", REDO_STUDENT]),
    "student_config_truncated": (_truncate("student/config/metadata", 3), [
        "{w}/student: damaged checkpoint (config/metadata: JSONDecodeError", REDO_STUDENT]),
    "student_state_metadata_deleted": (_delete("student/state/_METADATA"), [
        "{w}/student: damaged checkpoint (state/: FileNotFoundError", REDO_STUDENT]),
    "student_state_manifest_truncated": (_truncate("student/state/manifest.ocdbt", 5), [
        "{w}/student: damaged checkpoint (state/: ValueError: DATA_LOSS", REDO_STUDENT]),
    "student_state_data_truncated": (_truncate("student/state/ocdbt.process_0/d", 5), [
        "{w}/student: damaged checkpoint (state/: ValueError", REDO_STUDENT]),
    "student_state_data_deleted": (_delete("student/state/ocdbt.process_0"), [
        "{w}/student: damaged checkpoint (state/: ValueError", REDO_STUDENT]),
    "student_state_deleted": (_delete("student/state"), [
        "{w}/student: damaged checkpoint (state/: missing)", REDO_STUDENT]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DAMAGED))
def test_rerun_with_a_damaged_file(name, finished, tmp_path, capsys):
  damage, fragments = DAMAGED[name]
  w = _copy(finished, tmp_path, damage)
  before, contents = listing(w), _contents(w)
  rc, _, err = _train(capsys, w)
  assert_one_line_error(rc, err, *[f.format(w=w) for f in fragments])
  assert_nothing_written(w, before)
  assert _contents(w) == contents  # nothing changed either (the damaged file left as it was)


REDO_EVAL = ("delete that folder and rerun python -m dpmamba_jax.train --workdir {w} with the "
             "run's settings to redo the {stage} stage")
EVAL_DAMAGED = {
    "config_truncated": ["{w}/config.json: damaged (not valid JSON",
                         "this workdir's settings cannot be read",
                         "restore the file, or train again in a new --workdir"],
    "split_truncated": ["{w}/split.npz", "delete it to draw the same split again from seed 0"],
    "teacher_meta_garbage": ["{w}/teacher: damaged checkpoint (meta/metadata",
                             REDO_EVAL.replace("{stage}", "pretrain")],
    "student_meta_garbage": ["{w}/student: damaged checkpoint (meta/metadata",
                             REDO_EVAL.replace("{stage}", "distill")],
    "student_state_manifest_truncated": ["{w}/student: damaged checkpoint (state/: ",
                                         REDO_EVAL.replace("{stage}", "distill")],
    "student_state_deleted": ["{w}/student: damaged checkpoint (state/: missing)",
                              REDO_EVAL.replace("{stage}", "distill")],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EVAL_DAMAGED))
def test_evaluate_with_a_damaged_file(name, finished, tmp_path, capsys):
  w = _copy(finished, tmp_path, DAMAGED[name][0])
  before, contents = listing(w), _contents(w)
  rc, _, err = _evaluate(capsys, w)
  assert_one_line_error(rc, err, *[f.format(w=w) for f in EVAL_DAMAGED[name]])
  assert_nothing_written(w, before)
  assert _contents(w) == contents


# ----------------------------------------------------------------------------------------------
# Case 3: a damaged periodic checkpoint: the one before it, or the stage from scratch.

RESUME = {  # name: (what to damage, the warnings' fragments, the resume line or None)
    "latest_pretrain": (["ckpt/pretrain/2/state/manifest.ocdbt"],
                        ["{w}/ckpt/pretrain/2: damaged training checkpoint (ValueError: "],
                        "pretrain: resuming from the checkpoint at epoch 1/3"),
    "both_pretrain": (["ckpt/pretrain/2/meta/metadata", "ckpt/pretrain/1/state/_METADATA"],
                      ["{w}/ckpt/pretrain/2: damaged training checkpoint (JSONDecodeError",
                       "{w}/ckpt/pretrain/1: damaged training checkpoint (JSONDecodeError",
                       "{w}/ckpt/pretrain: no readable training checkpoint; training the "
                       "pretrain stage from epoch 0"], None),
    "latest_distill": (["ckpt/distill/2/state/ocdbt.process_0/d"],
                       ["{w}/ckpt/distill/2: damaged training checkpoint (ValueError: "],
                       "distill: resuming from the checkpoint at epoch 1/3"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUME))
def test_resume_past_a_damaged_periodic_checkpoint(name, finished, tmp_path, capsys):
  damaged, warnings, resumed = RESUME[name]
  w = _copy(finished, tmp_path)
  # as if killed during that stage: its model, the later one and the metrics not written yet
  undone = ["student", "metrics.json", "metrics.md"] + (["teacher"] if "pretrain" in name else [])
  for rel in undone:
    _delete(rel)(w)
  for rel in damaged:
    _truncate(rel, 3)(w)
  rc, out, err = run_cli(capsys, train.main,
                         ["--workdir", w, *EPOCHS, *[a for a in TINY if a != "--quiet"]])
  assert rc == 0, err[-3000:]
  assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
  lines = err.splitlines()
  for frag in warnings:
    frag = frag.format(w=w)
    assert any(l.startswith("warning: ") and frag in l for l in lines), (frag, lines)
  if resumed:
    assert resumed in out
  assert _numbers(w / "metrics.json") == _numbers(finished / "metrics.json")
  stage = "pretrain" if "pretrain" in name else "distill"
  assert sorted(os.listdir(w / "ckpt" / stage)) == ["1", "2"]  # saved again, readable
  log = [json.loads(l) for l in (w / "log.jsonl").read_text().splitlines()]
  keys = [(e["stage"], e["epoch"]) for e in log if e["stage"] == stage]
  assert keys == [(stage, 1), (stage, 2), (stage, 3)]
  assert_no_temp_files(w)


# ----------------------------------------------------------------------------------------------
# Case 4: evaluate without a student, and a bad --batch.


@pytest.mark.slow
def test_evaluate_without_the_student_says_so(finished, tmp_path, capsys):
  w = _copy(finished, tmp_path, _delete("student"))
  (w / "metrics.json").unlink()
  rc, _, err = _evaluate(capsys, w)
  assert rc == 0, err[-3000:]
  assert f"warning: {w}/student: no checkpoint; evaluated the teacher only" in err.splitlines()
  m = json.loads((w / "metrics.json").read_text())
  assert m["student"] == {} and m["teacher"] == _numbers(finished / "metrics.json")["teacher"]
  assert "DPMamba (student)" not in (w / "metrics.md").read_text()
  assert_no_temp_files(w)


@pytest.mark.slow
def test_evaluate_rewrites_a_damaged_metrics_json(finished, tmp_path, capsys):
  """metrics.json is evaluate's output, not its input: a damaged one is simply rewritten."""
  w = _copy(finished, tmp_path, _truncate("metrics.json"))
  rc, _, err = _evaluate(capsys, w)
  assert rc == 0, err[-3000:]
  assert not [l for l in err.splitlines() if l.startswith(("error:", "warning:"))]
  assert _numbers(w / "metrics.json") == _numbers(finished / "metrics.json")
  assert_no_temp_files(w)


@pytest.mark.slow
@pytest.mark.parametrize("batch", ["-4", "0"])
def test_evaluate_bad_batch(batch, finished, tmp_path, capsys):
  w = _copy(finished, tmp_path)
  before, contents = listing(w), _contents(w)
  rc, _, err = _evaluate(capsys, w, "--batch", batch)
  assert_one_line_error(rc, err, f"eval_batch={batch}: expected an int >= 1")
  assert_nothing_written(w, before)
  assert _contents(w) == contents


# ----------------------------------------------------------------------------------------------
# Case 5: training that goes non-finite stops at once; nothing non-finite is saved.

NON_FINITE = re.compile(r"^error: (pretrain|distill) epoch (\d+) step (\d+)/2: the loss is nan; "
                        r"nothing saved as the final model; use a new --workdir with a lower "
                        r"--set lr=\.\.\. than 1e\+30$")


def _saved_epochs(w, stage):
  d = w / "ckpt" / stage
  return sorted(int(e) for e in os.listdir(d)) if d.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "distill"])
def test_huge_lr_stops_with_one_line(stage, finished, tmp_path, capsys):
  w = tmp_path / "run"
  extra = ["--set", "lr=1e30"]
  if stage == "distill":  # the finished run's (good) teacher, a fresh distill stage
    extra += ["--stage", "distill", "--teacher-ckpt", str(finished / "teacher")]
  rc, _, err = _train(capsys, w, *extra)
  line = assert_one_line_error(rc, err, f"{stage} epoch ")
  match = NON_FINITE.match(line)
  assert match and match.group(1) == stage, line
  assert not (w / "teacher").exists() and not (w / "student").exists()
  assert not (w / "metrics.json").exists()
  assert all(e < int(match.group(2)) for e in _saved_epochs(w, stage))  # none of a NaN state
  assert_no_temp_files(w)


def _inject(monkeypatch, at_step, what):
  """The teacher step's `at_step`-th call (1-based, over the run) returns a non-finite `what`:
  a metric ("loss", "grad_norm"), or "params" (finite metrics, overflowed parameters)."""
  real = steps.make_teacher_step

  def make(*a, **k):
    step_fn, calls = real(*a, **k), [0]

    def step(*args):
      state, m = step_fn(*args)
      calls[0] += 1
      if calls[0] == at_step:
        if what == "params":
          state = state.replace(params=jax.tree.map(lambda x: x * jnp.inf, state.params))
        else:
          m = dict(m, **{what: jnp.asarray(np.nan if what == "loss" else np.inf, jnp.float32)})
      return state, m
    return step

  monkeypatch.setattr(steps, "make_teacher_step", make)


@pytest.mark.parametrize("log_every", ["1", "3"], ids=["log_every_1", "log_every_3"])
# log_every 1: the window fetched each epoch and checked on the host; 3: the device check
@pytest.mark.parametrize("at_step,what,want", [
    (3, "loss", "error: pretrain epoch 2 step 1/2: the loss is nan; nothing saved as the final "
                "model"),
    (6, "grad_norm", "error: pretrain epoch 3 step 2/2: the gradient norm is inf; nothing saved"),
    (2, "params", "error: pretrain epoch 1: the parameters are not finite after the epoch's last "
                  "update; nothing saved as the final model"),
], ids=["nan_loss", "inf_grad_norm", "inf_params"])
@pytest.mark.slow
def test_first_non_finite_step_is_named(at_step, what, want, log_every, tmp_path, capsys,
                                        monkeypatch):
  _inject(monkeypatch, at_step, what)
  w = tmp_path / "run"
  rc, _, err = _train(capsys, w, "--stage", "pretrain", "--set", f"log_every={log_every}")
  assert assert_one_line_error(rc, err).startswith(want)
  assert not (w / "teacher").exists()
  bad_epoch = (at_step + 1) // 2
  # the periodic checkpoints before it (max_to_keep=2), none of a non-finite state
  assert _saved_epochs(w, "pretrain") == list(range(1, bad_epoch))[-2:]
  # an epoch is logged when its metrics are finite (the parameter check follows the log line)
  last_logged = bad_epoch if what == "params" else bad_epoch - 1
  log = (w / "log.jsonl").read_text().splitlines() if (w / "log.jsonl").exists() else []
  assert all(json.loads(l)["epoch"] <= last_logged for l in log)
  assert_no_temp_files(w)


def test_input_problem_names_non_finite_and_huge_inputs():
  spec = datasets.DATASETS["trento"]
  rd = types.SimpleNamespace(spec=spec, cfg=types.SimpleNamespace(normalize="none", data_dir="d",
                                                                 lr=1e-3),
                             cubes=[jnp.ones((4, 4, 63)), jnp.ones((4, 4, 1))])
  assert run.input_problem(rd) is None
  rd.cubes[1] = rd.cubes[1].at[0, 0, 0].set(3e9)
  assert run.input_problem(rd) == (
      "the LiDAR (LiDAR_data.mat (or LiDAR.mat)) inputs reach 3e+09 after the input transform "
      "(normalize=none): use --normalize standard, or check the file's data type and scale")
  rd.cubes[0] = rd.cubes[0].at[1, 1, 1].set(jnp.nan)
  assert run.input_problem(rd).startswith("the HSI (HSI_data.mat (or HSI.mat)) inputs hold NaN/Inf")
  # the advice after a non-finite loss (the tests above: sane inputs, the lr)
  assert trainer._non_finite_advice(rd).startswith(
      "likely cause: the HSI (HSI_data.mat (or HSI.mat)) inputs hold NaN/Inf after the input "
      "transform (normalize=none): check the file; then rerun in a new --workdir")


# ----------------------------------------------------------------------------------------------
# Case 6: two processes on one workdir, a full disk, what killed runs leave.


def _hold_lock(folder):
  """The workdir's lock held as another process would (flock is per open file, so this process
  holding it stops this process's run too)."""
  return locks.hold(str(folder / locks.LOCK_NAME), "held by the test", warn=print)


@pytest.mark.slow
def test_a_workdir_in_use_stops_train_and_evaluate_at_once(finished, tmp_path, capsys):
  w = _copy(finished, tmp_path)
  before, contents = listing(w), _contents(w)
  with _hold_lock(w):
    before = listing(w)
    for main, args in ((train.main, ["--workdir", w, *EPOCHS, *TINY]),
                       (evaluate.main, ["--workdir", w])):
      rc, _, err = run_cli(capsys, main, args)
      assert_one_line_error(rc, err, f"--workdir {w}: in use by pid {os.getpid()} on host ",
                            f"lock file {w / locks.LOCK_NAME}")
      assert_nothing_written(w, before)
  assert _contents(w) == contents


@pytest.mark.slow
def test_a_dead_runs_lock_and_temporary_files_are_cleared(finished, tmp_path, capsys):
  """What kill -9 leaves (the lock file with its holder, .NAME.XXXXXXXX.tmp files, orbax's
  temporary folders) is taken over / removed with a warning; the run's numbers do not change."""
  w = _copy(finished, tmp_path)
  (w / locks.LOCK_NAME).write_text('{"pid": 999999, "host": "gone", "since": "yesterday"}\n')
  left = [w / ".metrics.json.k1ll3d_9.tmp", w / "maps" / ".student_complete_full.npy.abcdefgh.tmp",
          w / "student.orbax-checkpoint-tmp", w / "ckpt" / "distill" / "3.orbax-checkpoint-tmp"]
  for p in left:
    p.parent.mkdir(exist_ok=True)
    if p.name.endswith(".tmp"):
      p.write_bytes(b"x" * 100)
    else:
      p.mkdir()
  mine = w / "notes.tmp"
  mine.write_text("a user's file")
  rc, _, err = _evaluate(capsys, w)
  assert rc == 0, err[-3000:]
  warnings = [l for l in err.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 2, err[-3000:]
  assert warnings[0] == (
      f"warning: {w / locks.LOCK_NAME}: taking over the lock of pid 999999 on host gone since "
      "yesterday, which ended without releasing it (killed?)")
  assert warnings[1].startswith(f"warning: {w}: removed 4 temporary file(s) left by an "
                                "interrupted run (e.g. ")
  assert not any(p.exists() for p in left) and mine.read_text() == "a user's file"
  assert not (w / locks.LOCK_NAME).exists()
  assert _numbers(w / "metrics.json") == _numbers(finished / "metrics.json")


@pytest.fixture
def small_disk(tmp_path):
  """A 500 KiB tmpfs: room for the tiny run's first periodic checkpoints only. Needs root (and a
  kernel that lets this container mount): skipped elsewhere."""
  mnt = tmp_path / "disk"
  mnt.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=500k", "tmpfs",
                                          str(mnt)], capture_output=True).returncode:
    pytest.skip("mounting a small tmpfs needs root")
  yield mnt
  subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_after_freeing_space_resumes(
    finished, small_disk, capsys):
  w = small_disk / "run"
  rc, _, err = _train(capsys, w)
  line = assert_one_line_error(rc, err, "no space left on device; free some space, then rerun "
                               "the same command")
  assert line.startswith(f"error: {w}/")
  said = [l for l in err.splitlines() if l.strip() and not l.startswith("text features:")]
  assert said == [line], err[-3000:]  # no orbax / tensorstore / asyncio noise around it
  assert_no_temp_files(w)
  assert not (w / locks.LOCK_NAME).exists()
  subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
  rc, _, err = _train(capsys, w)
  assert rc == 0, err[-3000:]
  assert _numbers(w / "metrics.json") == _numbers(finished / "metrics.json")
