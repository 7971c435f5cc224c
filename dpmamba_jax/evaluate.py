"""`python -m dpmamba_jax.evaluate --workdir DIR`: re-evaluate a finished (or partial) run.

Re-evaluates the last-epoch models saved in DIR (the test set never picks a model) over every
modality scenario and rewrites DIR/metrics.json and DIR/metrics.md (atomically; the schema is in
metrics.py). A missing model (DPMamba: student/ or teacher/) is a one-line warning and the others
are evaluated; a damaged config.json, split.npz or checkpoint is a one-line error saying how to
recover. The command parses its arguments and calls the engine (metrics.py, maps.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from dpmamba_jax import runtime

if __name__ == "__main__":  # before the heavy imports below (runtime.py)
  runtime.reexec_with_hugepage_malloc()

from dpmamba_jax import checkpoint  # noqa: E402
from dpmamba_jax import config as config_lib  # noqa: E402
from dpmamba_jax import errors  # noqa: E402
from dpmamba_jax import maps  # noqa: E402
from dpmamba_jax import methods  # noqa: E402
from dpmamba_jax import metrics as metrics_lib  # noqa: E402
from dpmamba_jax import run  # noqa: E402
from dpmamba_jax import trainer  # noqa: E402
from dpmamba_jax import workdir as workdir_lib  # noqa: E402
from dpmamba_jax.model import cpu_kernels  # noqa: E402


def _maps_value(value: str) -> str:
  """--maps all (--maps alone: the method's own model)."""
  if value.strip().lower() != "all":
    raise argparse.ArgumentTypeError(f"{value!r}: expected all, or nothing after --maps")
  return "all"


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(
      prog="python -m dpmamba_jax.evaluate",
      description="Re-evaluate the last-epoch models of a training workdir (DPMamba: the teacher "
                  "and the student) over every modality scenario; rewrites metrics.json and "
                  "metrics.md (and the maps).")
  p.add_argument("--workdir", required=True, help="a workdir written by dpmamba_jax.train")
  p.add_argument("--data-dir", default=None, help="override the data dir saved in config.json")
  p.add_argument("--dataset-file", default=None, metavar="YAML",
                 help="override the dataset file saved in config.json (a moved file)")
  p.add_argument("--export-inputs", action="store_true",
                 help="add the input transform and dataset definition to models saved before "
                      "checkpoints kept them (needed by python -m dpmamba_jax.predict), then "
                      "evaluate")
  p.add_argument("--batch", type=int, default=None, help="inference batch (default: config)")
  p.add_argument("--maps", nargs="?", const=True, default=False, type=_maps_value,
                 metavar="all",
                 help="also write the classification maps (default off here): of the method's "
                      "own model (DPMamba: the student), or with --maps all of every scored "
                      "model (DPMamba's teacher too). They reuse the evaluation's predictions "
                      "of the test pixels and classify only the other pixels")
  p.add_argument("--no-maps", dest="maps", action="store_const", const=False,
                 help=argparse.SUPPRESS)
  p.add_argument("--no-compile-cache", action="store_true",
                 help="disable the persistent XLA compilation cache")
  return p


@errors.cli_entry
def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  workdir = os.path.abspath(args.workdir)
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise errors.UserError(f"{cfg_path}: not found; expected a workdir written by "
                           "python -m dpmamba_jax.train")
  with workdir_lib.lock_workdir(workdir, lambda msg: print(msg, file=sys.stderr)):
    return _evaluate_workdir(args, workdir, cfg_path)


def _evaluate_workdir(args, workdir: str, cfg_path: str) -> int:
  """main, with the workdir locked (a training or another evaluation there stops this one)."""
  saved = config_lib.read_saved_config(
      cfg_path, "this workdir's settings cannot be read: restore the file, or train again in a "
      "new --workdir")
  overrides = {k: config_lib.coerce(k, v, where=cfg_path) for k, v in saved.items()}
  overrides["workdir"] = workdir
  if args.data_dir is not None:
    overrides["data_dir"] = args.data_dir
  if args.dataset_file is not None:
    overrides["dataset_file"] = args.dataset_file
  if args.batch is not None:  # validated with the config (eval_batch >= 1)
    overrides["eval_batch"] = args.batch
  if args.no_compile_cache:
    overrides["compile_cache"] = False
  cfg, spec = config_lib.resolve(overrides, methods.defaults)
  runtime.setup_cpu_flags()
  runtime.setup_compile_cache(cfg.compile_cache)
  cpu_kernels.build_in_background()  # while the data loads
  rd = run.load_run_data(cfg, spec, workdir)
  meth = methods.get(cfg.method)
  stages = meth.stages(cfg, trainer.shapes_of(rd))
  models, metas = {}, {}
  for stage in stages:
    path = os.path.join(workdir, stage.model)
    hint = (f"delete that folder and rerun python -m dpmamba_jax.train --workdir {workdir} with "
            f"the run's settings to redo the {stage.name} stage")
    if not checkpoint.has_model(path, hint=hint):  # nothing there (damaged: UserError)
      if not (stage.model == "teacher" and cfg.teacher_ckpt
              and checkpoint.is_model_checkpoint(cfg.teacher_ckpt)):
        continue
      path, hint = cfg.teacher_ckpt, f"check teacher_ckpt in {cfg_path}"
    if any(r not in models for r in stage.reads) and stage.restore is not None:
      continue  # a comparison method's model needs the earlier ones it was built from
    frozen = {k: models[k] for k in stage.reads if k in models}
    if args.export_inputs and path == os.path.join(workdir, stage.model):
      if checkpoint.inputs_intact(path):
        print(f"{path}: has its input transform already")
      else:
        damaged = checkpoint.has_inputs(path)
        rebuild = (None if stage.restore is None else
                   lambda saved, restore=stage.restore: restore(saved, frozen))
        checkpoint.add_inputs(path, run.saved_inputs(rd), rebuild=rebuild)
        print(f"{path}: input transform and dataset definition "
              f"{'rebuilt (they were damaged)' if damaged else 'added'}")
    models[stage.model], metas[stage.name] = methods.load_stage_model(
        stage, path, frozen, scan_impl=cfg.scan_impl or "auto", hint=hint)
  scored = [s for s in meth.scored if all(n in models for n in s.needs)]
  if not scored:
    names = " or ".join(f"{s.model}/" for s in stages)
    raise errors.UserError(f"{workdir}: no {names} model checkpoint to evaluate")
  names = [s.name for s in stages]
  upto = names.index(cfg.stage) if cfg.stage in names else len(stages) - 1  # --stage S: up to S
  for stage in stages[:upto + 1]:
    if stage.model not in models:
      others = " and the ".join(s.key for s in scored)
      print(f"warning: {os.path.join(workdir, stage.model)}: no checkpoint; evaluated the "
            f"{others} only", file=sys.stderr)
  epochs = {name: meta.get("epochs", 0) for name, meta in metas.items()}
  walls = {name: meta.get("wall_time_s", 0.0) for name, meta in metas.items()}
  predictions: dict = {}  # the evaluation's: the maps reuse them
  metrics_lib.evaluate_run(rd, workdir, meth, models, epochs=epochs, wall_time_s=walls,
                           batch=cfg.eval_batch, predictions=predictions)
  drawn = maps.maps_models(scored, args.maps)  # --maps: the method's model; --maps all: every one
  if drawn:
    done = maps.complete_maps(workdir, scored[0].key)
    record = maps.write_maps(rd, workdir, [(s.key, s.classifier(models)) for s in drawn],
                             batch=cfg.eval_batch, predictions=predictions)
    workdir_lib.RunLog(workdir).record(record)
    maps.mark_complete(workdir, sorted(done | {s.key for s in drawn}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
