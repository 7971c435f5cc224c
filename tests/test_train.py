"""End-to-end tests of `python -m dpmamba_jax.train` on a tiny synthetic run, plus config parsing.

The kill test runs the CLI in subprocesses: an uninterrupted run, then a second workdir whose
run is SIGKILLed right after a pretrain checkpoint, rerun and SIGKILLed after a distill
checkpoint, then rerun to the end; its metrics must equal the uninterrupted run's (also the
determinism check: same seed, same numbers on CPU).
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from dpmamba_jax import config as config_lib
from dpmamba_jax import errors, evaluate, methods, runtime, steps, train, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--epochs", "3", "--text-encoder", "random",
        "--set", "model=tiny", "--set", "depth=0", "--set", "hidden=8", "--set", "patch_size=3",
        "--set", "synthetic_height=40", "--set", "synthetic_width=40",
        "--set", "train_per_class=8", "--set", "batch_size=24", "--set", "eval_batch=256",
        "--set", "log_every=1", "--set", "ckpt_every=1"]


def _env(cache_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", DPMAMBA_XLA_CACHE_DIR=str(cache_dir),
             DPMAMBA_CACHE_DIR=str(cache_dir), PYTHONWARNINGS="ignore")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(workdir, env, extra=(), kill_on=None):
  """Runs the CLI; with kill_on, SIGKILLs it when a stdout line contains that text."""
  cmd = [sys.executable, "-m", "dpmamba_jax.train", "--workdir", str(workdir), *TINY, *extra]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env, cwd=REPO)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if kill_on and kill_on in line:
      proc.send_signal(signal.SIGKILL)
      break
  rc = proc.wait(timeout=300)
  proc.stdout.close()
  return rc, "".join(lines)


def _numbers(path):
  with open(path) as f:
    m = json.load(f)
  m.pop("wall_time_s")
  return m


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_kill_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
  env = _env(tmp_path / "cache")
  rc, out = _run(tmp_path / "a", env)  # compiles once; the later runs hit the persistent cache
  assert rc == 0, out
  a = tmp_path / "a"
  for f in ("config.json", "split.npz", "log.jsonl", "metrics.json", "metrics.md",
            "teacher", "student", "maps/student_complete_full.png",
            "maps/student_without-HSI_labelled.mat", "maps/student_without-LiDAR_full.npy"):
    assert (a / f).exists(), f
  m = json.loads((a / "metrics.json").read_text())
  assert list(m) == ["dataset", "seed", "text_encoder", "epochs", "student", "teacher",
                     "wall_time_s"]
  assert m["epochs"] == {"pretrain": 3, "distill": 3}
  assert set(m["student"]) == set(m["teacher"]) == {"complete", "without:HSI", "without:LiDAR"}
  for entry in m["student"].values():
    assert set(entry) == {"OA", "AA", "kappa", "per_class", "confusion"}
    assert 0 <= entry["OA"] <= 100 and len(entry["confusion"]) == 6
  assert set(m["wall_time_s"]) == {"pretrain", "distill", "evaluate"}

  b = tmp_path / "b"
  no_maps = ("--set", "maps=false")  # maps do not change the numbers; they cost time
  rc, out = _run(b, env, no_maps, kill_on="pretrain: checkpoint saved at epoch 1")
  assert rc == -signal.SIGKILL and not (b / "teacher").exists()
  rc, out = _run(b, env, no_maps, kill_on="distill: checkpoint saved at epoch 1")
  assert rc == -signal.SIGKILL, out
  assert "pretrain: resuming from the checkpoint at epoch" in out
  assert (b / "teacher").exists() and not (b / "metrics.json").exists()
  rc, out = _run(b, env, no_maps)
  assert rc == 0, out
  assert "distill: resuming from the checkpoint at epoch" in out
  assert _numbers(b / "metrics.json") == _numbers(a / "metrics.json")
  # The log has each (stage, epoch) once, in order, despite the kills.
  log = [json.loads(l) for l in (b / "log.jsonl").read_text().splitlines()]
  keys = [(e["stage"], e["epoch"]) for e in log if e["stage"] != "evaluate"]
  assert keys == [("pretrain", 1), ("pretrain", 2), ("pretrain", 3),
                  ("distill", 1), ("distill", 2), ("distill", 3)]
  # `evaluate` on its own rebuilds the same inputs and gets the same numbers.
  before = _numbers(a / "metrics.json")
  (a / "metrics.json").unlink()
  monkeypatch.setenv("DPMAMBA_XLA_CACHE_DIR", str(tmp_path / "cache"))  # the runs' programs
  assert evaluate.main(["--workdir", str(a)]) == 0
  assert _numbers(a / "metrics.json") == before
  # A rerun with a different setting is refused in one line.
  assert train.main(["--workdir", str(b), *TINY, "--seed", "1", "--no-compile-cache",
                     "--quiet"]) == 2


def test_cli_user_errors(capsys):
  assert train.main(["--set", "nosuchkey=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --set nosuchkey=1: unknown config key 'nosuchkey'")
  assert len(err.splitlines()) == 1
  assert train.main(["--set", "batch_size=abc"]) == 2
  assert "batch_size='abc'" in capsys.readouterr().err
  assert train.main(["--set", "batch_size=25"]) == 2  # not a multiple of 6 classes
  assert "multiple of the 6 classes" in capsys.readouterr().err


def test_resolve_defaults_and_precedence(tmp_path):
  cfg_file = tmp_path / "c.yaml"
  cfg_file.write_text("dataset: houston\nhidden: 32\nlr: 1.0e-3\n")
  args = train._parser().parse_args(["--config", str(cfg_file), "--set", "lr=2e-3",
                                     "--seed", "4"])
  cfg, spec = train.resolve_args(args)
  assert spec.name == "houston" and cfg.hidden == 32 and cfg.lr == 2e-3 and cfg.seed == 4
  assert cfg.betas_distill == (0.85, 0.999) and cfg.betas_pretrain == (0.9, 0.999)
  assert cfg.grad_clip == 2.0 and cfg.epochs_pretrain == 500 and cfg.warmup_epochs == 30
  assert cfg.workdir == os.path.join("runs", "houston", "seed4")
  cfg, _ = train.resolve_args(train._parser().parse_args(["--dataset", "trento",
                                                          "--epochs", "100"]))
  assert cfg.epochs_distill == 100 and cfg.warmup_epochs == 6  # 30/500 of the epochs
  bad = tmp_path / "bad.json"
  bad.write_text('{"epochs_pretrain": "many"}')
  with pytest.raises(errors.UserError, match="bad.json: epochs_pretrain='many'"):
    config_lib.load_config_file(str(bad))
  assert config_lib.coerce("betas_distill", "0.8,0.99") == (0.8, 0.99)
  assert config_lib.coerce("data_dir", "none") is None
  assert config_lib.coerce("maps", "false") is False


def test_protocol_reference_resolves_the_authors_settings():
  cfg, _ = train.resolve_args(train._parser().parse_args(["--protocol", "reference"]))
  assert cfg.protocol == "reference" and cfg.normalize == "none" and cfg.include_train_in_test
  cfg, _ = train.resolve_args(train._parser().parse_args([]))
  assert cfg.protocol == "honest" and cfg.normalize == "standard"
  assert not cfg.include_train_in_test
  with pytest.raises(errors.UserError, match="normalize='standard' contradicts protocol=reference"):
    train.resolve_args(train._parser().parse_args(["--protocol", "reference",
                                                    "--normalize", "standard"]))
  with pytest.raises(errors.UserError, match="config protocol='paper'"):
    config_lib.resolve({"protocol": "paper"})


def test_protocol_reference_trains_with_the_authors_schedule_and_batchnorm():
  """The stages' optimiser follows the honest schedule, or the authors' off-by-one one under
  --protocol reference (tests/test_parity.py checks both against their loop's); the student's
  BatchNorm statistics take the masked samples only under reference."""
  for protocol, off_by_one, bn in (("honest", False, "present"), ("reference", True, "all")):
    cfg, _ = train.resolve_args(train._parser().parse_args(["--protocol", protocol]))
    assert cfg.student_bn_stats == bn
    for stage in ("pretrain", "distill"):
      oc = methods.dpmamba_optim_config(cfg, stage, steps_per_epoch=3)
      assert oc.authors_off_by_one == off_by_one
      assert (oc.total_steps, oc.warmup_steps) == (3 * cfg.epochs_pretrain, 3 * cfg.warmup_epochs)
      lr = steps.lr_at(np.arange(4), oc)
      assert lr[0] == oc.warmup_init and (lr[1] == oc.warmup_init) == off_by_one


def test_shipped_configs_resolve_to_the_dataset_defaults():
  from dpmamba_jax.data import datasets
  for name, spec in datasets.DATASETS.items():
    path = os.path.join(REPO, "configs", f"{name}.yaml")
    with open(path) as f:
      assert f"python -m dpmamba_jax.train --config configs/{name}.yaml" in f.read()
    from_file, _ = config_lib.resolve(config_lib.load_config_file(path))
    from_flag, _ = config_lib.resolve({"dataset": name})
    assert from_file == from_flag, name


def test_malloc_trim_runs_after_each_compile(monkeypatch):
  import jax
  import jax.numpy as jnp
  if not runtime.release_memory_after_compiles():
    pytest.skip("no malloc_trim in this libc")
  x7, x9 = jnp.ones(7), jnp.ones(9)  # made before counting: creating them compiles too
  jax.block_until_ready((x7, x9))
  calls = []
  monkeypatch.setattr(runtime, "_malloc_trim", lambda pad: calls.append(pad) or 1)
  f = jax.jit(lambda x: jnp.sin(x) * 3.0 + x.shape[0])
  f(x7).block_until_ready()
  assert calls == [0]  # one compile, one trim
  f(x7).block_until_ready()
  assert calls == [0]  # cached: no compile, no trim
  assert runtime.release_memory_after_compiles()  # idempotent: still one listener
  f(x9).block_until_ready()
  assert calls == [0, 0]


def test_hugepage_malloc_env_rules():
  if runtime.hugepage_malloc_env({}) is None:
    pytest.skip("not glibc >= 2.35 with transparent huge pages here")
  assert runtime.hugepage_malloc_env({})["GLIBC_TUNABLES"] == runtime.HUGEPAGE_MALLOC_TUNABLE
  mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "OTHER": "x"}
  env = runtime.hugepage_malloc_env(mine)
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + runtime.HUGEPAGE_MALLOC_TUNABLE,
                 "OTHER": "x"}
  assert mine["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"  # the input is not changed
  assert runtime.hugepage_malloc_env(env) is None  # set already: nothing to do
  assert runtime.hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert runtime.hugepage_malloc_env({"DPMAMBA_HUGEPAGE_MALLOC": "0"}) is None


# After the restart: 5 x (malloc 64 MB, touch every byte, free); prints pid, tunables, faults.
_FAULTS_SCRIPT = """
import ctypes, os, resource
from dpmamba_jax import runtime
pid = os.getpid()
runtime.reexec_with_hugepage_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  p = libc.malloc(64 << 20)
  ctypes.memset(p, 1, 64 << 20)
  libc.free(ctypes.c_void_p(p))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
print(pid, os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), faults, sep="|")
"""


def test_reexec_with_hugepage_malloc_cuts_page_faults():
  """The CLIs restart once with the tunable (same pid), and large mallocs then fault far less."""
  if runtime.hugepage_malloc_env({}) is None:
    pytest.skip("not glibc >= 2.35 with transparent huge pages here")
  runs = {}
  for setting in ("1", "0"):
    env = dict(os.environ, JAX_PLATFORMS="cpu", DPMAMBA_HUGEPAGE_MALLOC=setting)
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True)
    pid0, pid1, tunables, faults = out.stdout.strip().split("|")
    assert pid0 == pid1  # restarted in place (or not at all)
    runs[setting] = (tunables, int(faults))
  assert runs["1"][0] == runtime.HUGEPAGE_MALLOC_TUNABLE and runs["0"][0] == ""
  # 4 KB pages: >= 5 * 16,384 faults; 2 MB pages: a few hundred
  assert runs["0"][1] >= 5 * 16384
  assert runs["1"][1] < 5 * 16384 // 4


def test_cpu_xla_flags_only_without_an_accelerator_plugin(monkeypatch, tmp_path):
  """The XLA:CPU flag goes into $XLA_FLAGS on CPU only: an XLA:GPU build that no longer knows
  a CPU flag refuses to start."""
  import types
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/dev/null")
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  plugins = tmp_path / "plugins"
  (plugins / "xla_cuda13").mkdir(parents=True)
  (plugins / "xla_cuda13" / "__init__.py").write_text("")
  monkeypatch.setitem(sys.modules, "jax_plugins",
                      types.SimpleNamespace(__path__=[str(plugins)]))
  assert runtime.accelerator_plugin() == "xla_cuda13"
  runtime.setup_cpu_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/dev/null"
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the user asked for the CPU: flag added
  assert runtime.accelerator_plugin() is None
  runtime.setup_cpu_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/dev/null " + runtime.CPU_XLA_FLAGS
  monkeypatch.setitem(sys.modules, "jax_plugins", None)  # no plugin package at all
  monkeypatch.delenv("JAX_PLATFORMS")
  assert runtime.accelerator_plugin() is None and runtime.cpu_xla_flags() == runtime.CPU_XLA_FLAGS


def test_a_rerun_may_change_scan_impl_but_not_the_numbers(tmp_path):
  """scan_impl is a run-time choice (workdir._FREE_KEYS): a workdir trained with one resumes with
  the other (the periodic checkpoints hold arrays only, tests/test_checkpoint.py loads a model
  with either), while a setting that changes the numbers is refused."""
  cfg, _ = config_lib.resolve({"scan_impl": "recurrent", "workdir": str(tmp_path)})
  workdir.check_workdir_config(cfg, str(tmp_path))
  other, _ = config_lib.resolve({"scan_impl": "associative", "workdir": str(tmp_path)})
  workdir.check_workdir_config(other, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["scan_impl"] == "associative"
  lr, _ = config_lib.resolve({"scan_impl": "associative", "lr": 1e-3, "workdir": str(tmp_path)})
  workdir.check_workdir_config(lr, str(tmp_path))  # nothing drawn or trained yet: rewritten
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["lr"] == 1e-3
  (tmp_path / "split.npz").write_bytes(b"")  # the run has started: its settings bind
  with pytest.raises(errors.UserError, match="this workdir was run with lr="):
    workdir.check_workdir_config(other, str(tmp_path))
