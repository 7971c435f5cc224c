#!/usr/bin/env bash
# GPU check on one H100/H200: Houston-sized streaming scene inference, the parity tests at
# matmul precision "highest", benchmark, short synthetic train. Fits 5 minutes: 247 s on an
# H200 (2026-11-27), most of it XLA:GPU compiles (docs/gpu.md).
#
#   tools/gpu_check.sh [OUT_DIR]          # default $OUT if set, else ./gpu_check_out
#
# Env: PYTHON (default python3: the device image's Python with CUDA JAX, flax, optax, orbax,
# chex, pytest), DPMAMBA_PARITY_DIR (golden vectors; default ./shared/parity, then
# ../shared/parity), GPU_CHECK_BUDGET_S (total, default 600), ALLOW_CPU=1 (run without a GPU,
# for a dry run of the script). Every step has its own timeout, capped by what is left of the
# budget; a failed or timed-out step is reported and the next one still runs; the exit status
# is 1 if any step failed. Outputs: OUT_DIR/{bench_trento.json,bench_houston.json,scene.json,
# train.log,parity.log,summary.txt} and the train workdir OUT_DIR/run.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
BUDGET="${GPU_CHECK_BUDGET_S:-600}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DPMAMBA_XLA_CACHE_DIR="$OUT_DIR/xla_cache"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if [[ -z "${DPMAMBA_PARITY_DIR:-}" ]]; then
  for d in shared/parity ../shared/parity; do
    if [[ -d "$d" ]]; then export DPMAMBA_PARITY_DIR="$PWD/$d"; break; fi
  done
fi

T0=$(date +%s)
FAILED=()
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

# step NAME TIMEOUT_S LOGFILE CMD...: runs CMD under `timeout`, capped by the remaining budget.
step() {
  local name="$1" limit="$2" logf="$3"; shift 3
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left < 10 )); then
    echo "== $name: SKIPPED (budget of ${BUDGET}s used up)" | tee -a "$SUMMARY"
    FAILED+=("$name(skipped)"); return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  local t=$(date +%s) rc=0
  timeout --kill-after=10 "$limit" "$@" > >(tee "$logf") 2>&1 || rc=$?
  local dt=$(( $(date +%s) - t ))
  if (( rc == 0 )); then
    echo "== $name: ok in ${dt}s" | tee -a "$SUMMARY"
  else
    [[ $rc == 124 || $rc == 137 ]] && rc="$rc (timeout)"
    echo "== $name: FAILED rc=$rc after ${dt}s (log $logf)" | tee -a "$SUMMARY"
    FAILED+=("$name")
  fi
  return 0
}

# 0. Devices: refuse to "pass" on a CPU fallback.
step devices 60 "$OUT_DIR/devices.log" "$PY" -c '
import jax, os, sys
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
if jax.default_backend() != "gpu" and os.environ.get("ALLOW_CPU") != "1":
  sys.exit("no GPU backend (set ALLOW_CPU=1 for a dry run on CPU)")
'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | tee -a "$SUMMARY" || true
if [[ " ${FAILED[*]-} " == *" devices "* ]]; then
  echo "no usable GPU; stopping" | tee -a "$SUMMARY"; exit 1
fi

# Order: cheapest first; the XLA:GPU compiles dominate (H200, jax 0.11.2: the scene 24 s, bench
# Trento 57 s, train 90 s, bench Houston 63 s, each mostly compiling), so the benchmarks and the
# train run go last and get the largest timeouts.

# 1. Houston-sized full scene (349 x 1905, 48 + 1 bands, P 11), streamed, batch 1024. The
# host-RSS bound (2 GB) is the CPU claim; a CUDA process maps far more host memory for its
# libraries alone (4.8 GB on the H200), so it is not checked here.
step scene 90 "$OUT_DIR/scene.log" "$PY" tools/scene_inference.py --json --batch 1024 \
  --max-rss-mb 1e9
grep "^{" "$OUT_DIR/scene.log" 2>/dev/null | tail -1 > "$OUT_DIR/scene.json" || true

# 2. Parity with the authors' golden vectors at full float32 matmul precision.
JAX_DEFAULT_MATMUL_PRECISION=highest step parity 60 "$OUT_DIR/parity.log" \
  "$PY" -m pytest -q -x -p no:cacheprovider tests/test_parity.py

# 3. Benchmark (teacher / student step, inference, compile, RSS) at Trento's real shapes.
step bench_trento 240 "$OUT_DIR/bench_trento.log" "$PY" tools/bench.py --dataset trento --json \
  --out "$OUT_DIR/bench_trento.json"

# 4. Short synthetic train (both stages, evaluation; no maps, no text-model download).
step train 180 "$OUT_DIR/train.log" "$PY" -m dpmamba_jax.train --workdir "$OUT_DIR/run" \
  --epochs 5 --text-encoder random --set maps=false --quiet

# 5. Benchmark at Houston's shapes (the first to go when the budget runs short).
step bench_houston 180 "$OUT_DIR/bench_houston.log" "$PY" tools/bench.py --dataset houston \
  --json --out "$OUT_DIR/bench_houston.json"

# Numbers.
"$PY" - "$OUT_DIR" <<'EOF' | tee -a "$SUMMARY" || true
import json, os, sys
out = sys.argv[1]
def load(name):
  try:
    with open(os.path.join(out, name)) as f:
      return json.load(f)
  except Exception as e:  # noqa: BLE001 - report what is there
    return None
for name in ("bench_trento.json", "bench_houston.json"):
  bench = load(name)
  for r in (bench or {}).get("results", []):
    if "error" in r:
      print(f"bench {r['dataset']}: error {r['error']}")
      continue
    piped = r.get("student_step_pipelined_s")
    piped = f", {1e3 * piped:.2f} ms/step pipelined" if piped else ""
    print(f"bench {r['dataset']} ({r['resolved_impl']} scan, {r['device_kind']}): teacher step "
          f"{1e3 * r['teacher_step_s']:.2f} ms, student step {1e3 * r['student_step_s']:.2f} ms"
          f"{piped} (target <= 5 ms), inference {r['infer_patches_per_s']:.0f} patches/s at batch "
          f"{r['infer_batch']}, compile {r['compile_s']:.1f} s, host peak RSS "
          f"{r['peak_rss_mb']:.0f} MB")
scene = load("scene.json")
if scene:
  print(f"scene: {scene['pixels']} px in {scene['wall_s']} s = {scene['pixels_per_s']} px/s "
        f"(compile {scene['compile_s']} s, peak RSS {scene['peak_rss_mb']} MiB, "
        f"{scene['devices']} x {scene['device_kind']}); target full map <= 10 s")
m = load("run/metrics.json")
if m:
  print("train: wall", m.get("wall_time_s"), "student complete OA",
        m.get("student", {}).get("complete", {}).get("OA"))
EOF
echo "total $(( $(date +%s) - T0 ))s; summary in $SUMMARY"
if (( ${#FAILED[@]} )); then
  echo "FAILED: ${FAILED[*]}"; exit 1
fi
echo "gpu check: all steps ok"
