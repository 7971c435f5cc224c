"""Where a step's time goes: a device trace of one jitted step, per source line of this package.

  python tools/profile_step.py [--dataset trento] [--step student|teacher|predict]
                               [--batch 512] [--infer-calls 1] [--steps 3] [--top 30]
                               [--json OUT]

Runs the real jitted step (`tools/bench.py`'s `build`: the dataset's batch, patch and band
counts, random inputs), traces --steps calls with `jax.profiler`, and maps every XLA kernel to
the line of `dpmamba_jax` that produced it, through the stack frames XLA keeps in the optimized
HLO (dumped to a temporary folder for this). Printed: milliseconds per step and kernels per step
by source line and by file, and the total.

On a GPU, XLA's command buffers (CUDA graphs) are turned off for the run so that each kernel is
its own trace event: the per-line times hold, the total is a little higher than a normal step.
On a CPU every XLA op (fusion, matmul, loop body op) is an event. Times are per step (the trace
total divided by --steps). The predict step runs each batch as one call unless --infer-calls N
(evaluation's CPU default is inference.CPU_PREDICT_CALLS concurrent calls): the ops of concurrent
calls overlap, and their times then include the wait for a core.
"""
from __future__ import annotations

import collections
import gzip
import glob
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench.py, beside this file

from dpmamba_jax import errors  # noqa: E402
from dpmamba_jax import fileio  # noqa: E402
from dpmamba_jax import runtime  # noqa: E402

_FRAME_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_PACKAGE = "dpmamba_jax" + os.sep
_WRAPPERS = ("steps.py:", "errors.py:")  # the step functions and the CLI wrapper around them


def hlo_source_lines(path: str) -> dict[str, str]:
  """{HLO instruction name: 'file.py:line function'} from an XLA HLO text dump.

  The dump lists its stack frames at the end (FileNames, FunctionNames, FileLocations,
  StackFrames) and each instruction names its innermost frame (`stack_frame_id=`). The frame
  reported is the innermost one in this package outside steps.py / errors.py (so flax's
  LayerNorm internals count for the model line that calls them), else the innermost one in this
  package (e.g. the patch gather in steps.py), else the innermost one.
  """
  tables = {k: {} for k in _FRAME_SECTIONS}
  frame_of = {}
  section = None
  with open(path) as f:
    for line in f:
      text = line.strip()
      if text in _FRAME_SECTIONS:
        section = text
        continue
      if section and re.match(r"^\d+ ", text):
        key, rest = text.split(" ", 1)
        value = rest.strip('"') if section in ("FileNames", "FunctionNames") else dict(
            (k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", rest))
        tables[section][int(key)] = value
        continue
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*stack_frame_id=(\d+)", line)
      if m:
        frame_of[m.group(1)] = int(m.group(2))
  files, funcs, locs, frames = (tables[k] for k in _FRAME_SECTIONS)

  def describe(frame_id: int) -> str:
    chain, seen = [], set()  # (path, 'file:line function'), innermost first
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      loc = locs.get(frames[frame_id].get("file_location_id", 0), {})
      path_ = files.get(loc.get("file_name_id", 0), "?")
      func = funcs.get(loc.get("function_name_id", 0), "?").split(".")[-1]
      chain.append((path_, f"{os.path.basename(path_)}:{loc.get('line', '?')} {func}"))
      # the dump prints a frame's parent as (parent id + 1): 1 is "no parent" (checked against
      # the call chains of jax 0.10 / 0.11 dumps)
      frame_id = frames[frame_id].get("parent_frame_id", 1) - 1
    ours = [where for path_, where in chain if _PACKAGE in path_]
    model_side = [w for w in ours if not w.startswith(_WRAPPERS)]
    return (model_side or ours or [where for _, where in chain] or ["?"])[0]

  return {name: describe(fid) for name, fid in frame_of.items()}


def _device_events(trace_dir: str, backend: str) -> list[dict]:
  found = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not found:
    raise errors.UserError(f"{trace_dir}: jax.profiler wrote no *.trace.json.gz")
  with gzip.open(found[0]) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  want = "/device:gpu" if backend == "gpu" else "/host:cpu"
  return [e for e in events if e.get("ph") == "X" and "dur" in e
          and want in procs.get(e.get("pid"), "").lower()]


def attribute(events: list[dict], source_lines: dict[str, str], n_steps: int) -> dict:
  """Per-step milliseconds and kernel counts by source line and by file."""
  # kernel names are the HLO names with "." and "-" as "_" (GPU), or the names themselves (CPU)
  lookup = dict(source_lines)
  lookup.update({re.sub(r"[.\-]", "_", k): v for k, v in source_lines.items()})
  by_line = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    args = e.get("args", {})
    where = lookup.get(e["name"]) or lookup.get(str(args.get("hlo_op", "")))
    if where is None:
      continue  # host-side bookkeeping (thunk executor, python frames)
    by_line[where][0] += e["dur"] / 1e3 / n_steps
    by_line[where][1] += 1
  by_file = collections.defaultdict(float)
  for where, (ms, _) in by_line.items():
    by_file[where.split(":")[0]] += ms
  rows = sorted(([w, ms, n / n_steps] for w, (ms, n) in by_line.items()), key=lambda r: -r[1])
  return dict(total_ms=sum(r[1] for r in rows), kernels=sum(r[2] for r in rows),
              by_line=rows, by_file=dict(sorted(by_file.items(), key=lambda kv: -kv[1])))


def run(dataset: str, step: str, batch: int, n_steps: int, dump_dir: str,
        infer_calls: int = 1) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import bench

  env = bench.build(dataset, infer_calls=infer_calls)
  h, w = env.scene
  frozen = (env.t_state.params, env.t_state.batch_stats)
  box = {"t": env.t_state, "s": env.s_state}
  if step == "teacher":
    def once():
      box["t"], m = env.t_step(box["t"], env.cubes, env.z, env.idx, env.labels)
      jax.block_until_ready(m)
  elif step == "student":  # the teacher's features are an input, as training runs it
    teacher_feats = jnp.asarray(env.teacher_features(frozen, env.cubes, env.idx))  # idx's rows
    rows = jnp.arange(env.idx.shape[0], dtype=jnp.int32)

    def once():
      box["s"], m = env.s_step(box["s"], teacher_feats, env.cubes, env.z, rows, env.idx,
                               env.labels)
      jax.block_until_ready(m)
  else:
    idx = jnp.asarray(env.rng.integers(0, h * w, batch).astype(np.int32))
    mask = jnp.ones((batch, env.cfg.num_modalities), jnp.float32)
    predictor = env.predictor(env.s_state.params, env.s_state.batch_stats)
    scene = predictor.prepare_scene(env.cubes)  # as evaluation runs it

    def once():
      jax.block_until_ready(predictor.predict_batch(scene, env.z, idx, mask))
  once()
  once()
  with tempfile.TemporaryDirectory(prefix="profile_step_trace_") as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(n_steps):
        once()
    events = _device_events(trace_dir, jax.default_backend())
  module = "jit_predict" if step == "predict" else "jit_step"
  dumps = glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations.txt"))
  if not dumps:
    raise errors.UserError(f"{dump_dir}: no optimized HLO of {module} was dumped (the dump flags "
                           "act only if set before JAX starts: run this file as a script)")
  # the newest module of that name: the traced step (the only step compiled in this process)
  dump = max(dumps, key=lambda p: int(re.search(r"module_(\d+)", p).group(1)))
  result = attribute(events, hlo_source_lines(dump), n_steps)
  result.update(dataset=env.spec.name, step=step, steps=n_steps,
                batch=batch if step == "predict" else env.spec.batch_size,
                backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind)
  return result


def format_report(r: dict, top: int) -> str:
  lines = [f"{r['dataset']} {r['step']} step, batch {r['batch']}, {r['device_kind']}: "
           f"{r['total_ms']:.2f} ms and {r['kernels']:.0f} kernels per step (traced ops with a "
           "source line)", "by file: " + ", ".join(f"{k} {v:.2f} ms"
                                                  for k, v in r["by_file"].items()),
           f"{'ms/step':>9} {'kernels':>8}  source line"]
  for where, ms, n in r["by_line"][:top]:
    lines.append(f"{ms:9.3f} {n:8.0f}  {where}")
  return "\n".join(lines)


@errors.cli_entry
def main(argv=None) -> int:
  ap = errors.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dataset", default="trento")
  ap.add_argument("--step", choices=("student", "teacher", "predict"), default="student")
  ap.add_argument("--batch", type=int, default=512, help="predict batch (train steps: the "
                  "dataset's batch)")
  ap.add_argument("--infer-calls", type=int, default=1,
                  help="concurrent calls per predict batch (default 1: per-op times of one call)")
  ap.add_argument("--steps", type=int, default=3, help="traced calls (after two warm-ups)")
  ap.add_argument("--top", type=int, default=30, help="source lines printed")
  ap.add_argument("--json", metavar="OUT", help="also write the whole result here")
  args = ap.parse_args(argv)
  if args.batch < 1 or args.steps < 1 or args.infer_calls < 1:
    raise errors.UserError("--batch, --steps and --infer-calls: expected positive ints")
  from dpmamba_jax.data import datasets  # with jax, after the XLA flags are set below
  datasets.get_spec(args.dataset)  # UserError for unknown names
  with tempfile.TemporaryDirectory(prefix="profile_step_hlo_") as dump_dir:
    flags = [f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_as_text",
             "--xla_dump_hlo_module_re=jit_(step|predict)", runtime.cpu_xla_flags()]
    if any(k in (runtime.accelerator_plugin() or "") for k in ("cuda", "rocm")):
      flags.append("--xla_gpu_enable_command_buffer=")
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + flags).strip()
    result = run(args.dataset, args.step, args.batch, args.steps, dump_dir, args.infer_calls)
  print(format_report(result, args.top))
  if args.json:
    fileio.write_json(args.json, result)
  return 0


if __name__ == "__main__":
  runtime.reexec_with_hugepage_malloc()
  raise SystemExit(main())
