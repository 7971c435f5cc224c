"""Evaluation: OA / AA / kappa / per-class / confusion over every modality scenario.

`python -m dpmamba_jax.evaluate --workdir DIR` re-evaluates the last-epoch teacher and student
saved in DIR (the test set never picks a model) and rewrites DIR/metrics.json and
DIR/metrics.md (atomically). A missing student/ (or teacher/) is a one-line warning and the other
model is evaluated; a damaged config.json, split.npz or checkpoint is a one-line error saying how
to recover. Inference is jitted with a fixed batch (the last batch padded), the scenario
mask being an input array, so each model compiles once.

metrics.json (percentages 0-100):
  {"dataset", "seed", "text_encoder", "epochs": {"pretrain", "distill"},
   "student": {SCENARIO: {"OA", "AA", "kappa", "per_class": [...], "confusion": [[...]]}},
   "teacher": {SCENARIO: {...}}, "wall_time_s": {"pretrain", "distill", "evaluate"}}
SCENARIO is "complete" or "without:" + "+".join(missing modality names).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Sequence

from dpmamba_jax import runtime

if __name__ == "__main__":  # before the heavy imports below (runtime.py)
  runtime.reexec_with_hugepage_malloc()

import numpy as np  # noqa: E402

from dpmamba_jax import checkpoint  # noqa: E402
from dpmamba_jax import config as config_lib  # noqa: E402
from dpmamba_jax import errors  # noqa: E402
from dpmamba_jax import fileio  # noqa: E402
from dpmamba_jax import maps  # noqa: E402
from dpmamba_jax import masks as masks_lib  # noqa: E402
from dpmamba_jax import run  # noqa: E402
from dpmamba_jax.data.preprocessing import labels_at  # noqa: E402
from dpmamba_jax.predict import Predictor  # noqa: E402

METRIC_KEYS = ("OA", "AA", "kappa")
# The keys every metrics.json has (the module docstring); what a finished run's rerun reads back.
METRICS_FILE_KEYS = ("dataset", "seed", "text_encoder", "epochs", "student", "teacher")


# ----------------------------------------------------------------------------------------------
# Metrics.


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
  """(C, C) int64 counts; rows = true class, columns = predicted class (both 0-based)."""
  y_true = np.asarray(y_true, np.int64).ravel()
  y_pred = np.asarray(y_pred, np.int64).ravel()
  if y_true.shape != y_pred.shape:
    raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ")
  c = int(num_classes)
  if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= c):
    raise ValueError(f"labels outside 0..{c - 1}")
  return np.bincount(y_true * c + y_pred, minlength=c * c).reshape(c, c)


def scores(conf: np.ndarray) -> dict:
  """OA, AA (mean per-class recall), Cohen's kappa, all x100, plus per-class and confusion.

  Classes with no test pixel get per_class None and are left out of AA.
  """
  conf = np.asarray(conf, np.int64)
  n = conf.sum()
  diag = np.diag(conf).astype(np.float64)
  support = conf.sum(axis=1).astype(np.float64)
  predicted = conf.sum(axis=0).astype(np.float64)
  oa = diag.sum() / n if n else 0.0
  with np.errstate(invalid="ignore", divide="ignore"):
    per_class = np.where(support > 0, diag / support, np.nan)
  aa = float(np.nanmean(per_class)) if np.any(support > 0) else 0.0
  pe = float((support * predicted).sum() / (n * n)) if n else 0.0
  kappa = (oa - pe) / (1.0 - pe) if pe < 1.0 else (1.0 if oa == 1.0 else 0.0)
  return {
      "OA": 100.0 * float(oa),
      "AA": 100.0 * aa,
      "kappa": 100.0 * float(kappa),
      "per_class": [None if np.isnan(p) else 100.0 * float(p) for p in per_class],
      "confusion": conf.tolist(),
  }


# ----------------------------------------------------------------------------------------------
# Scoring a run's models.


def test_pixels(rd) -> np.ndarray:
  """The flat test-pixel indices the run is scored on (sorted).

  Every test pixel of the split, unless the run config sets eval_subsample = N > 0 (quick
  ablation grids): then a fixed uniform random N of them, drawn from the run's seed, the same
  subset for every model and scenario of the run.
  """
  idx = np.asarray(rd.split.test_idx)
  n = int(getattr(rd.cfg, "eval_subsample", 0) or 0)
  if n <= 0 or n >= idx.size:
    return idx
  rng = np.random.default_rng([int(rd.cfg.seed), 20250801])
  return np.sort(rng.choice(idx, size=n, replace=False))


def evaluate_model(model, rd, *, batch: int = 512, which: str = "model",
                   scenarios: Sequence[tuple[str, Any]] | None = None,
                   progress: bool = True) -> dict:
  """{scenario: scores} for one model over the test pixels of the run's split (`test_pixels`).

  `rd` is a run.RunData (device cubes, text features z, split, labels, spec). progress: a
  progress bar per scenario on stderr.
  """
  predictor = Predictor.for_run(model, rd, batch)
  test_idx = test_pixels(rd)
  y_true = labels_at(rd.labels, test_idx)
  scene = predictor.prepare_scene(rd.cubes)  # once for all scenarios
  out = {}
  for name, row in scenarios or masks_lib.eval_scenarios(rd.spec.modalities):
    pred = predictor.predict_pixels(scene, rd.z, test_idx, row,
                                    desc=f"eval {which} {name}" if progress else None)
    out[name] = scores(confusion_matrix(y_true, pred, rd.spec.num_classes))
  return out


# ----------------------------------------------------------------------------------------------
# Reports.


def _present(modalities: Sequence[str], scenario: str) -> str:
  if scenario == "complete":
    return ", ".join(modalities)
  missing = scenario.split(":", 1)[1].split("+")
  return ", ".join(m for m in modalities if m not in missing)


def _fmt(v) -> str:
  if isinstance(v, dict):  # {"mean", "std"}
    return f"{v['mean']:.2f} ± {v['std']:.2f}"
  return f"{v:.2f}"


def markdown_table(metrics: dict, modalities: Sequence[str], title: str = "") -> str:
  """The paper's Table-1/2 layout: one Baseline (teacher, zeros) and one DPMamba row per scenario.

  Works for one run (numbers) and for `summarize_runs` output ({"mean", "std"} per metric).
  """
  train_mods = ", ".join(modalities)
  lines = []
  if title:
    lines += [f"### {title}", ""]
  lines += ["| Method | Training Modalities | Testing Modalities | OA(%) | AA(%) | κ(×100) |",
            "|---|---|---|---|---|---|"]
  names = [n for n, _ in masks_lib.eval_scenarios(modalities)]
  for name in names[1:] + names[:1]:  # the paper lists missing scenarios first, complete last
    teacher_label = ("Baseline (teacher, zero-filled)" if len(modalities) > 1
                     else f"{modalities[0]}-Net")  # one modality: the teacher is the whole net
    for label, key in ((teacher_label, "teacher"), ("DPMamba (student)", "student")):
      m = metrics.get(key, {}).get(name)
      if m is None:
        continue
      lines.append(f"| {label} | {train_mods} | {_present(modalities, name)} | {_fmt(m['OA'])} | "
                   f"{_fmt(m['AA'])} | {_fmt(m['kappa'])} |")
  return "\n".join(lines) + "\n"


def summarize_runs(runs: Sequence[dict]) -> dict:
  """Mean ± std over runs (sample std, ddof=1; 0 for one run) of OA, AA, kappa, per-class."""
  if not runs:
    raise ValueError("no runs to summarize")
  out: dict[str, Any] = {"dataset": runs[0]["dataset"], "seeds": [r["seed"] for r in runs],
                         "text_encoder": runs[0]["text_encoder"], "epochs": runs[0]["epochs"]}
  for key in ("student", "teacher"):
    out[key] = {}
    for name in runs[0].get(key, {}):
      vals = [r[key][name] for r in runs if name in r.get(key, {})]
      entry = {}
      for k in METRIC_KEYS:
        a = np.array([v[k] for v in vals], np.float64)
        entry[k] = {"mean": float(a.mean()), "std": _std(a)}
      pc = np.array([[np.nan if x is None else x for x in v["per_class"]] for v in vals])
      with np.errstate(invalid="ignore"):
        entry["per_class"] = [{"mean": float(np.nanmean(c)) if np.any(~np.isnan(c)) else None,
                               "std": _std(c[~np.isnan(c)]) if np.any(~np.isnan(c)) else None}
                              for c in pc.T]
      out[key][name] = entry
  wall = [r.get("wall_time_s", {}) for r in runs]
  out["wall_time_s"] = {k: float(sum(w.get(k, 0.0) for w in wall)) for k in
                        ("pretrain", "distill", "evaluate")}
  return out


def _std(a: np.ndarray) -> float:
  return float(np.std(a, ddof=1)) if a.size > 1 else 0.0


def write_metrics(workdir: str, metrics: dict, modalities: Sequence[str]) -> None:
  path = os.path.join(workdir, "metrics.json")
  try:
    fileio.write_json(path, metrics)
  except OSError as e:  # an unwritable workdir: one line, nothing half-written (atomic)
    raise errors.UserError(f"{path}: cannot write it ({e.strerror or e})") from None
  title = (f"{metrics['dataset']}, seed {metrics['seed']}, text encoder "
           f"{metrics['text_encoder']}, last-epoch models")
  if metrics.get("protocol"):
    title += f", {metrics['protocol']} protocol (docs/deviations.md)"
  tp = metrics.get("test_pixels")
  if tp and tp["scored"] != tp["of"]:
    title += f", scored on a fixed random {tp['scored']} of the {tp['of']} test pixels"
  fileio.write_text(os.path.join(workdir, "metrics.md"), markdown_table(metrics, modalities, title))


def evaluate_run(rd, workdir: str, teacher=None, student=None, *, epochs: dict,
                 wall_time_s: dict, batch: int = 512, log: Callable[[str], None] = print) -> dict:
  """Evaluates the teacher (zeros for missing modalities) and the student (prompts) and writes
  metrics.json + metrics.md. Returns the metrics dict."""
  t0 = time.time()
  metrics: dict[str, Any] = {
      "dataset": rd.spec.name, "seed": int(rd.cfg.seed), "text_encoder": rd.text_encoder,
      "epochs": {"pretrain": int(epochs.get("pretrain", 0)),
                 "distill": int(epochs.get("distill", 0))},
      "student": {}, "teacher": {}}
  progress = not getattr(log, "quiet", False)  # a quiet train.RunLog: no progress bars either
  if student is not None:
    metrics["student"] = evaluate_model(student, rd, batch=batch, which="student",
                                        progress=progress)
  if teacher is not None:
    metrics["teacher"] = evaluate_model(teacher, rd, batch=batch, which="teacher",
                                        progress=progress)
  metrics["wall_time_s"] = {"pretrain": float(wall_time_s.get("pretrain", 0.0)),
                            "distill": float(wall_time_s.get("distill", 0.0)),
                            "evaluate": float(time.time() - t0)}
  n_test, n_all = int(test_pixels(rd).size), int(rd.split.test_idx.size)
  if n_test != n_all:  # only with eval_subsample: the default schema stays as documented
    metrics["test_pixels"] = {"scored": n_test, "of": n_all}
  if getattr(rd.cfg, "protocol", "honest") != "honest":  # likewise: only for the authors' protocol
    metrics["protocol"] = rd.cfg.protocol
  write_metrics(workdir, metrics, rd.spec.modalities)
  sub = "" if n_test == n_all else f" (a fixed random subset of the {n_all}: eval_subsample)"
  log(f"evaluation on {n_test} test pixels{sub} "
      f"({'including' if rd.cfg.include_train_in_test else 'excluding'} the training pixels), "
      f"last-epoch models:")
  log(markdown_table(metrics, rd.spec.modalities))
  return metrics


# ----------------------------------------------------------------------------------------------
# CLI.


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(
      prog="python -m dpmamba_jax.evaluate",
      description="Re-evaluate the last-epoch teacher/student of a training workdir over every "
                  "modality scenario; rewrites metrics.json and metrics.md (and the maps).")
  p.add_argument("--workdir", required=True, help="a workdir written by dpmamba_jax.train")
  p.add_argument("--data-dir", default=None, help="override the data dir saved in config.json")
  p.add_argument("--dataset-file", default=None, metavar="YAML",
                 help="override the dataset file saved in config.json (a moved file)")
  p.add_argument("--export-inputs", action="store_true",
                 help="add the input transform and dataset definition to models saved before "
                      "checkpoints kept them (needed by python -m dpmamba_jax.predict), then "
                      "evaluate")
  p.add_argument("--batch", type=int, default=None, help="inference batch (default: config)")
  p.add_argument("--maps", action=argparse.BooleanOptionalAction, default=False,
                 help="also write the classification maps (default off here)")
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
  cfg, spec = config_lib.resolve(overrides)
  runtime.setup_cpu_flags()
  runtime.setup_compile_cache(cfg.compile_cache)
  rd = run.load_run_data(cfg, spec, workdir)
  models = {}
  stages = {"teacher": "pretrain", "student": "distill"}
  for key in ("teacher", "student"):
    path = os.path.join(workdir, key)
    hint = (f"delete that folder and rerun python -m dpmamba_jax.train --workdir {workdir} with "
            f"the run's settings to redo the {stages[key]} stage")
    if not checkpoint.has_model(path, hint=hint):  # nothing there (damaged: UserError)
      if not (key == "teacher" and cfg.teacher_ckpt
              and checkpoint.is_model_checkpoint(cfg.teacher_ckpt)):
        continue
      path, hint = cfg.teacher_ckpt, f"check teacher_ckpt in {cfg_path}"
    if args.export_inputs and path == os.path.join(workdir, key):
      if checkpoint.has_inputs(path):
        print(f"{path}: has its input transform already")
      else:
        checkpoint.add_inputs(path, run.saved_inputs(rd))
        print(f"{path}: input transform and dataset definition added")
    models[key] = checkpoint.load_model(path, scan_impl=cfg.scan_impl or "auto", hint=hint)
  if not models:
    raise errors.UserError(f"{workdir}: no teacher/ or student/ model checkpoint to evaluate")
  for key, other in (("teacher", "student"), ("student", "teacher")):
    # no student by design: a one-modality run (no distill stage) or a --stage pretrain run
    if key not in models and (key == "teacher" or (spec.num_modalities > 1
                                                   and cfg.stage != "pretrain")):
      print(f"warning: {os.path.join(workdir, key)}: no checkpoint; evaluated the {other} only",
            file=sys.stderr)
  epochs = {k: v[2].get("epochs", 0) for k, v in (("pretrain", models.get("teacher")),
                                                  ("distill", models.get("student"))) if v}
  walls = {k: v[2].get("wall_time_s", 0.0) for k, v in (("pretrain", models.get("teacher")),
                                                        ("distill", models.get("student"))) if v}
  teacher = models["teacher"][0] if "teacher" in models else None
  student = models["student"][0] if "student" in models else None
  evaluate_run(rd, workdir, teacher, student, epochs=epochs, wall_time_s=walls,
               batch=cfg.eval_batch)
  if args.maps and student is not None:
    maps.write_all_maps(rd, student, os.path.join(workdir, "maps"), batch=cfg.eval_batch,
                        comparison=os.path.join(workdir, "comparison_student.png"))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
