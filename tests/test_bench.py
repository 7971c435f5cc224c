"""tools/bench.py: the JSON it promises (issue 6, item 1) and its option checks."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
try:
  import bench
finally:
  sys.path.pop(0)


def test_bench_json_on_the_synthetic_dataset():
  """One fresh worker process at the synthetic dataset's real shapes: every promised key is a
  positive number, and inference ran as the concurrent calls asked for."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "bench.py"), "--dataset", "synthetic",
       "--steps", "1", "--infer-batch", "64", "--infer-calls", "2", "--json"],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout)
  row = result["per_dataset"]["synthetic"]
  assert set(bench.KEYS) <= set(row)
  assert all(row[k] > 0 for k in ("teacher_step_s", "student_step_s", "infer_patches_per_s",
                                  "first_step_s", "peak_rss_mb"))
  assert row["compile_s"] >= 0
  (full,) = result["results"]
  assert full["infer_calls"] == 2 and full["infer_batch"] == 64


def test_bench_rejects_bad_counts(capsys):
  for argv in (["--infer-calls", "0"], ["--steps", "0"], ["--infer-batch", "-1"]):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "expected positive ints" in err
