"""`python -m dpmamba_jax.predict`: classify every pixel of a new scene with a trained model.

Writes a land-cover map as a GeoTIFF with the input's CRS and transform, and a PNG with a
legend; a modality that is absent or listed in --missing is handled the model's way (DPMamba's
student: its prompts; its teacher and the zero-filled comparison methods: zeros). The scene is
read and classified in row tiles, so memory is bounded whatever its size (inference.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from dpmamba_jax import runtime

if __name__ == "__main__":  # before the heavy imports below (runtime.py)
  runtime.reexec_with_hugepage_malloc()

from dpmamba_jax import config as config_lib  # noqa: E402
from dpmamba_jax import errors  # noqa: E402
from dpmamba_jax import fileio  # noqa: E402
from dpmamba_jax import inference  # noqa: E402
from dpmamba_jax import locks  # noqa: E402
from dpmamba_jax.inference import DEFAULT_TILE_ROWS  # noqa: E402
from dpmamba_jax.model import cpu_kernels  # noqa: E402


def _outputs(out: str, probabilities: bool) -> dict:
  stem = out[:-len(os.path.splitext(out)[1])] if os.path.splitext(out)[1] else out
  paths = {"map": out, "png": stem + ".png"}
  if probabilities:
    paths["probabilities"] = stem + "_probabilities.tif"
  return paths


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(
      prog="python -m dpmamba_jax.predict",
      description="Classify every pixel of a new scene with a trained model (a land-cover map "
                  "as a GeoTIFF with the input's CRS and transform, a PNG with a legend); a "
                  "modality that is absent or listed in --missing is replaced by the student's "
                  "prompt (the teacher zero-fills).")
  p.add_argument("--model", required=True, help="a model folder: RUN/student (or RUN/teacher)")
  p.add_argument("--input", required=True,
                 help="a dataset .yaml, or a folder laid out like the training data")
  p.add_argument("--out", required=True, help="the class map GeoTIFF to write (e.g. map.tif)")
  p.add_argument("--missing", action="append", default=[], metavar="MODALITY",
                 help="classify without this modality (repeatable; comma-separated too)")
  p.add_argument("--batch", type=int, default=512, help="pixels per model call (512)")
  p.add_argument("--tile", type=int, default=DEFAULT_TILE_ROWS, metavar="ROWS",
                 help=f"rows read and classified at a time ({DEFAULT_TILE_ROWS}): bounds memory")
  p.add_argument("--probabilities", action="store_true",
                 help="also write <out>_probabilities.tif: the class probabilities, one float32 "
                      "band per class (NaN where no data)")
  p.add_argument("--force", action="store_true", help="overwrite existing outputs")
  p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
  p.add_argument("--no-compile-cache", action="store_true",
                 help="disable the persistent XLA compilation cache")
  return p


@errors.cli_entry
def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  for flag, v in (("--batch", args.batch), ("--tile", args.tile)):
    if v < 1:
      raise errors.UserError(f"{flag} {v}: expected an int >= 1")
  for flag, path in (("--input", args.input), ("--out", args.out)):
    try:
      path.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv: GDAL cannot take the path
      raise errors.UserError(f"{flag} {path.encode('utf-8', 'surrogateescape')!r}: not a UTF-8 "
                             "path, which GDAL needs for GeoTIFF / ENVI; rename it") from None
  if args.batch > config_lib.MAX_EVAL_BATCH:
    raise errors.UserError(f"--batch {args.batch}: expected at most {config_lib.MAX_EVAL_BATCH} "
                           "(one batch's patches and activations are held in memory at once)")
  missing = [n.strip() for item in args.missing for n in item.split(",") if n.strip()]
  log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
  model_dir = os.path.abspath(args.model)
  if not os.path.isdir(model_dir):
    raise errors.UserError(f"--model {args.model}: not found; expected a model folder such as "
                           "RUN/student")
  paths = _outputs(args.out, args.probabilities)
  if not args.force:
    there = [p for p in paths.values() if os.path.exists(p)]
    if there:
      raise errors.UserError(f"{there[0]}: exists already; use --force to overwrite it")
  for p in paths.values():
    if not os.path.isdir(os.path.dirname(os.path.abspath(p))):
      raise errors.UserError(f"--out {args.out}: the folder {os.path.dirname(os.path.abspath(p))} "
                             "does not exist")
  runtime.setup_cpu_flags()
  runtime.setup_compile_cache(not args.no_compile_cache)
  cpu_kernels.build_in_background()  # while the data loads
  folder, name = os.path.split(os.path.abspath(paths["map"]))
  warn = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
  with locks.hold(os.path.join(folder, f".{name}.lock"), f"--out {args.out}", warn=warn):
    names = {os.path.basename(p) for p in paths.values()} | {f"{name}.aux.xml"}
    removed = fileio.remove_stale_temps(folder, names=names)  # a killed predict's of these
    if removed:
      warn(f"warning: {folder}: removed {len(removed)} temporary file(s) left by an interrupted "
           f"predict (e.g. {os.path.basename(removed[0])})")
    inference.predict_to_files(model_dir, args.input, paths, missing=missing, batch=args.batch,
                               tile_rows=args.tile, probabilities=args.probabilities,
                               quiet=args.quiet, log=log)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
