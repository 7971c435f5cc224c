"""tools/bench.py: the JSON it promises (issue 6, item 1) and its option checks."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
try:
  import bench
finally:
  sys.path.pop(0)


def _bench_synthetic(capsys, *extra):
  """bench.main in this process (it runs each measurement in a fresh worker process of its
  own, which is what is tested); its JSON."""
  capsys.readouterr()
  rc = bench.main(["--dataset", "synthetic", "--steps", "1", "--infer-batch", "64",
                   "--infer-calls", "2", "--json", *extra])
  out, err = capsys.readouterr()
  assert rc == 0, (out + err)[-2000:]
  return json.loads(out)


@pytest.mark.slow
def test_bench_json_on_the_synthetic_dataset(tmp_path, capsys):
  """A fresh worker process at the synthetic dataset's shapes (the model's widths tiny): every
  promised key is a positive number, inference ran as the concurrent calls asked for, and the
  first start with an empty compile cache is cold."""
  result = _bench_synthetic(capsys, "--compile-cache", str(tmp_path / "xla"), "--tiny")
  assert result["tiny"] is True and result["against_authors"] == {}
  row = result["per_dataset"]["synthetic"]
  assert set(bench.KEYS) <= set(row)
  assert all(row[k] > 0 for k in ("teacher_step_s", "student_step_s", "infer_patches_per_s",
                                  "first_step_s", "peak_rss_mb"))
  assert row["compile_s"] >= 0
  (full,) = result["results"]
  assert full["infer_calls"] == 2 and full["infer_batch"] == 64
  assert full["teacher_features_s"] > 0 and full["teacher_features_pixels"] > 0
  assert row["compile_cache_warm"] is False


def test_the_cache_hit_event_bench_counts_is_the_one_jax_emits(tmp_path):
  """compile_cache_warm counts bench.CACHE_HIT_EVENT during a worker's first step: in a fresh
  process, a program compiled again from the persistent cache emits it, the first compile not."""
  script = f"""
import jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", {str(tmp_path)!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
events = []
jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
f = lambda x: jnp.sin(x) * 2.0
jax.jit(f)(1.0).block_until_ready()
cold = events.count({bench.CACHE_HIT_EVENT!r})
jax.clear_caches()
jax.jit(f)(1.0).block_until_ready()
print(cold, events.count({bench.CACHE_HIT_EVENT!r}) - cold)
"""
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ["0", "1"]


@pytest.mark.slow
def test_bench_a_comparison_method_on_the_synthetic_dataset(capsys):
  """--method: the method's real shapes (its raw bands, patch and batch size), a positive step
  time and first-step time for every stage, and its classifier's inference rate."""
  (row,) = _bench_synthetic(capsys, "--method", "shaspec")["results"]
  assert (row["method"], row["bands"], row["patch"], row["batch"]) == ("shaspec", [24, 1], 7, 32)
  assert set(row["steps_s"]) == set(row["first_step_s"]) == {"model"}
  assert all(v > 0 for v in [*row["steps_s"].values(), *row["first_step_s"].values()])
  assert row["infer_patches_per_s"] > 0 and row["peak_rss_mb"] > 0


def test_bench_rejects_bad_counts(capsys):
  for argv in (["--infer-calls", "0"], ["--steps", "0"], ["--infer-batch", "-1"]):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "expected positive ints" in err


def test_bench_rejects_unknown_methods_and_a_scan_impl_for_a_comparison_method(capsys):
  for argv, why in ((["--method", "nope"], "expected one of dpmamba"),
                    (["--method", "dgdnet", "--scan-impl", "recurrent"], "not for --method"),
                    (["--method", "hct", "--tiny"], "--tiny: DPMamba's")):
    assert bench.main(argv) == 2
    assert why in capsys.readouterr().err


def _row(teacher, student, infer, rss=1000.0, first=10.0, warm=False):
  return dict(teacher_step_s=teacher, student_step_s=student, infer_patches_per_s=infer,
              compile_s=first - teacher, first_step_s=first, peak_rss_mb=rss,
              compile_cache_warm=warm)


def test_against_authors_speedups_and_targets():
  """Speed-ups are the authors' time / ours (rate: ours / theirs); each issue-6 target is judged
  on its own; datasets without the authors' figures are left out."""
  result = bench.against_authors({
      "trento": _row(0.5, 1.0, 1220.0, rss=1400.0, first=12.0),
      "houston": _row(0.739, 0.4, 4330.0),
      "augsburg": dict(_row(0.01, 0.01, 1e5), backend="gpu"),
      "synthetic": _row(0.1, 0.1, 100.0)})
  assert set(result) == {"trento", "houston"}  # no figures for synthetic, none for a GPU
  trento = result["trento"]
  assert abs(trento["speedup"]["teacher_step_s"] - 41.4) < 1e-9
  assert abs(trento["speedup"]["student_step_s"] - 31.2) < 1e-9
  assert abs(trento["speedup"]["infer_patches_per_s"] - 100.0) < 1e-9
  assert abs(trento["speedup_vs_chunked"]["teacher_step_s"] - 6.66) < 1e-9
  assert trento["all_met"] and len(trento["targets"]) == 11
  houston = result["houston"]
  assert "speedup_vs_chunked" not in houston
  met = {k: t["met"] for k, t in houston["targets"].items()}
  assert met == {"teacher_step_s speedup": False,  # 7.39 / 0.739 = 10x < 20x
                 "student_step_s speedup": True, "infer_patches_per_s speedup": True}
  assert not houston["all_met"]
  table = bench.format_against_authors(result)
  assert "| houston | teacher_step_s speedup | 10.0x | >= 20x | NOT met |" in table


def test_against_authors_trento_limits():
  """The absolute Trento targets: RSS 1.5 GB = 1.5e9 bytes (1,430.5 MiB), the first step 20 s
  cold and 5 s when the compile cache was already filled."""
  targets = bench.against_authors({"trento": _row(0.5, 1.0, 1220.0, rss=1440.0, first=6.0,
                                                  warm=True)})["trento"]["targets"]
  assert not targets["peak_rss_mb"]["met"]
  assert not targets["first_step_s (warm cache)"]["met"]
  assert "first_step_s (cold cache)" not in targets
  slow = bench.against_authors({"trento": _row(1.2, 1.6, 900.0)})["trento"]["targets"]
  assert [k for k, t in slow.items() if not t["met"]] == [
      "teacher_step_s speedup", "student_step_s speedup", "infer_patches_per_s speedup",
      "teacher_step_s speedup_vs_chunked", "student_step_s speedup_vs_chunked",
      "infer_patches_per_s speedup_vs_chunked", "teacher_step_s", "student_step_s", "infer_patches_per_s"]
