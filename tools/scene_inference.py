"""Streaming full-scene inference on a random Houston-sized scene: pixels/s and peak RSS.

  python tools/scene_inference.py                      # 349 x 1905, bands 48 + 1, P 11, batch 1024
  python tools/scene_inference.py --rows 40 --json     # only the first 40 rows (quick CPU check)

The paper model (random weights) classifies every pixel through `inference.Predictor`: the padded
per-modality cubes are put on the device once and each fixed-size batch's patches are gathered
inside the jitted predict step from (batch,) flat indices (the last batch padded, one compile),
so memory stays bounded by one batch whatever the scene size. With several devices the batches
are sharded over all of them (`--no-data-parallel` to use one). Exit status 1 when the peak RSS
exceeds --max-rss-mb.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpmamba_jax import errors  # noqa: E402
from dpmamba_jax import runtime  # noqa: E402


def peak_rss_mb() -> float:
  """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, B on macOS)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def _ints(s: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in s.split(","))
  except ValueError:
    raise errors.UserError(f"--bands {s!r}: expected comma-separated ints, e.g. 48,1") from None


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(prog="python tools/scene_inference.py", description=__doc__.split(
      "\n\n")[0])
  p.add_argument("--height", type=int, default=349)
  p.add_argument("--width", type=int, default=1905)
  p.add_argument("--bands", default="48,1", help="bands per modality (after PCA), e.g. 48,1")
  p.add_argument("--patch", type=int, default=11)
  p.add_argument("--classes", type=int, default=15)
  p.add_argument("--text-dim", type=int, default=512)
  p.add_argument("--batch", type=int, default=1024)
  p.add_argument("--rows", type=int, default=None,
                 help="classify only the first ROWS rows (default: the whole scene)")
  p.add_argument("--scan-impl", default=None, help="ModelConfig.scan_impl (default: the model's)")
  p.add_argument("--mask", default=None,
                 help="scenario mask, e.g. 0,1 (default: complete)")
  p.add_argument("--data-parallel", action=argparse.BooleanOptionalAction, default=True,
                 help="shard the batches over all devices when there are several")
  p.add_argument("--max-rss-mb", type=float, default=2048.0,
                 help="fail (exit 1) above this peak RSS")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", action="store_true", help="print one JSON line")
  return p


@errors.cli_entry
def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  bands = _ints(args.bands)
  h, w, b = args.height, args.width, args.batch
  if min(h, w, b, args.patch, args.classes) < 1:
    raise errors.UserError("--height/--width/--batch/--patch/--classes: expected ints >= 1")
  rows = h if args.rows is None else args.rows
  if not 1 <= rows <= h:
    raise errors.UserError(f"--rows {rows}: expected 1..{h}")
  runtime.setup_cpu_flags()
  # jax after the XLA flags (and after the re-exec, runtime.py)
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from dpmamba_jax import sharding
  from dpmamba_jax.data.patches import pad_cubes
  from dpmamba_jax.model import network
  from dpmamba_jax.inference import Predictor

  t_start = time.time()
  rng = np.random.default_rng(args.seed)
  dev_cubes = []
  for c in bands:  # one modality at a time, so the host holds at most one padded cube
    cube = rng.standard_normal((h, w, c), dtype=np.float32)
    padded = pad_cubes([cube], args.patch)[0]
    del cube
    dev_cubes.append(jax.device_put(jnp.asarray(padded)))
    del padded
  z = jnp.asarray(rng.standard_normal((args.classes, args.text_dim), dtype=np.float32))
  kw = {} if args.scan_impl is None else {"scan_impl": args.scan_impl}
  cfg = network.ModelConfig(bands=bands, patch_size=args.patch, out_dim=args.text_dim, **kw)
  model = network.DPMamba(cfg, rngs=nnx.Rngs(args.seed))
  mesh = sharding.data_parallel_mesh(b, enabled=args.data_parallel, what="inference batch",
                                     log=lambda m: print(m, file=sys.stderr))
  predictor = Predictor(model, width=w, patch_size=args.patch, batch=b, mesh=mesh)
  m = len(bands)
  row = None
  if args.mask:
    row = np.asarray(_ints(args.mask), np.float32)
    if row.shape != (m,):
      raise errors.UserError(f"--mask {args.mask!r}: expected {m} comma-separated 0/1 values")
  setup_s = time.time() - t_start

  # Compile (and run) one batch first so that the timed pass is steady-state.
  t0 = time.time()
  predictor.predict_pixels(dev_cubes, z, np.arange(b, dtype=np.int32), row)
  compile_s = time.time() - t0
  rss_compiled = peak_rss_mb()
  n = rows * w
  t0 = time.time()
  if rows == h:
    pred = predictor.predict_scene(dev_cubes, z, h, row, desc="scene" if not args.json else None)
  else:
    pred = predictor.predict_pixels(dev_cubes, z, np.arange(n, dtype=np.int32), row,
                                    desc="scene" if not args.json else None)
  wall = time.time() - t0
  rss = peak_rss_mb()
  counts = np.bincount(np.asarray(pred).ravel(), minlength=args.classes)
  out = {
      "scene": [h, w], "rows": rows, "pixels": n, "bands": list(bands), "patch": args.patch,
      "batch": b, "devices": 1 if mesh is None else mesh.size,
      "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
      "scan_impl": cfg.scan_impl, "setup_s": round(setup_s, 3), "compile_s": round(compile_s, 3),
      "wall_s": round(wall, 3), "pixels_per_s": round(n / wall, 1),
      "full_scene_s_est": round(h * w / (n / wall), 1), "peak_rss_mb": round(rss, 1),
      "peak_rss_after_first_batch_mb": round(rss_compiled, 1),
      "max_rss_mb": args.max_rss_mb, "rss_ok": rss <= args.max_rss_mb,
      "classes_predicted": int((counts > 0).sum()),
  }
  if args.json:
    print(json.dumps(out))
  else:
    print(f"{n} pixels ({rows} x {w} of {h} x {w}) in {wall:.2f} s: "
          f"{out['pixels_per_s']:.0f} pixels/s on {out['devices']} {out['backend']} device(s) "
          f"[{out['device_kind']}], batch {b}, compile {compile_s:.1f} s; full scene "
          f"~{out['full_scene_s_est']:.1f} s; peak RSS {rss:.0f} MiB "
          f"({'ok' if out['rss_ok'] else 'OVER'} <= {args.max_rss_mb:.0f})")
  return 0 if out["rss_ok"] else 1


if __name__ == "__main__":
  runtime.reexec_with_hugepage_malloc()
  raise SystemExit(main())
