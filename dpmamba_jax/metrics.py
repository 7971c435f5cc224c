"""Scoring a run's models: OA / AA / kappa / per-class / confusion over every modality scenario,
metrics.json and metrics.md, and the mean ± std over seeds.

metrics.json (percentages 0-100), for DPMamba:
  {"dataset", "seed", "text_encoder", "epochs": {"pretrain", "distill"},
   "student": {SCENARIO: {"OA", "AA", "kappa", "per_class": [...], "confusion": [[...]]}},
   "teacher": {SCENARIO: {...}}, "wall_time_s": {"pretrain", "distill", "evaluate"}}
and for another method the same with "method": NAME, its stages under "epochs" and
"wall_time_s", and one entry per model it scores (method.Scored.key) instead of student/teacher.
SCENARIO is "complete" or "without:" + "+".join(missing modality names). Models that have no
missing-modality mechanism are scored with the missing modalities zero-filled (marked in
metrics.md).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from dpmamba_jax import errors
from dpmamba_jax import fileio
from dpmamba_jax import inference
from dpmamba_jax import masks as masks_lib
from dpmamba_jax import method as method_lib
from dpmamba_jax import methods
from dpmamba_jax.data.preprocessing import labels_at
from dpmamba_jax.inference import Predictor

METRIC_KEYS = ("OA", "AA", "kappa")
# The keys every metrics.json has (the module docstring); what a finished run's rerun reads back.
METRICS_FILE_KEYS = ("dataset", "seed", "text_encoder", "epochs")  # + the scored models' keys


def method_of(metrics: dict) -> method_lib.Method:
  """The method a metrics.json (or a summary of them) belongs to (DPMamba's name no method)."""
  return methods.get(metrics.get("method", "dpmamba"))


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


def predict_model(model, rd, *, batch: int = 512,
                  scenarios: Sequence[tuple[str, Any]] | None = None, progress=None,
                  desc: str | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The predictions of one model on the test pixels the run is scored on, per scenario.

  Returns (test_idx (N,) flat indices, `test_pixels`, {scenario: (N,) int32 0-based classes}).
  `rd` is a run.RunData (device cubes, text features z, split, cfg, spec). progress: a tqdm-like
  bar advanced by the pixels classified (the caller's); desc: else a bar per scenario with this
  label (None: no bar).
  """
  predictor = Predictor.for_run(model, rd, batch)
  test_idx = test_pixels(rd)
  scene = predictor.prepare_scene(rd.cubes)  # once for all scenarios
  preds = {}
  for name, row in scenarios or masks_lib.eval_scenarios(rd.spec.modalities):
    preds[name] = predictor.predict_pixels(
        scene, rd.z, test_idx, row, progress=progress,
        desc=None if desc is None or progress is not None else f"{desc} {name}")
  return test_idx, preds


def evaluate_model(model, rd, *, batch: int = 512, which: str = "model",
                   scenarios: Sequence[tuple[str, Any]] | None = None,
                   progress=True, predictions: dict | None = None) -> dict:
  """{scenario: scores} for one model over the test pixels of the run's split (`test_pixels`).

  `rd` is a run.RunData (device cubes, text features z, split, labels, spec). progress: True (a
  progress bar per scenario on stderr), False, or a tqdm-like bar of the caller's to advance.
  predictions: a dict to receive (test_idx (N,), {scenario: (N,) int32 predictions}) under the
  key `which` (what the maps reuse, `maps.write_maps`).
  """
  bar = None if progress is None or isinstance(progress, bool) else progress
  test_idx, preds = predict_model(model, rd, batch=batch, scenarios=scenarios, progress=bar,
                                  desc=f"eval {which}" if progress is True else None)
  y_true = labels_at(rd.labels, test_idx)
  if predictions is not None:
    predictions[which] = (test_idx, preds)
  return {name: scores(confusion_matrix(y_true, pred, rd.spec.num_classes))
          for name, pred in preds.items()}


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
  """The paper's Table-1/2 layout: per scenario, the zero-filled baselines first (DPMamba: the
  teacher), then the method's model (the student).

  Works for one run (numbers) and for `summarize_runs` output ({"mean", "std"} per metric).
  """
  train_mods = ", ".join(modalities)
  lines = []
  if title:
    lines += [f"### {title}", ""]
  lines += ["| Method | Training Modalities | Testing Modalities | OA(%) | AA(%) | κ(×100) |",
            "|---|---|---|---|---|---|"]
  names = [n for n, _ in masks_lib.eval_scenarios(modalities)]
  rows = sorted(method_of(metrics).scored, key=lambda s: not s.zero_filled)
  for name in names[1:] + names[:1]:  # the paper lists missing scenarios first, complete last
    for scored in rows:
      m = metrics.get(scored.key, {}).get(name)
      if m is None:
        continue
      label = scored.label
      if len(modalities) == 1 and scored.zero_filled:
        label = f"{modalities[0]}-Net"  # one modality: the teacher is the whole net
      elif scored.zero_filled and name != "complete" and "zero-filled" not in label:
        label += " (zero-filled)"
      lines.append(f"| {label} | {train_mods} | {_present(modalities, name)} | {_fmt(m['OA'])} | "
                   f"{_fmt(m['AA'])} | {_fmt(m['kappa'])} |")
  return "\n".join(lines) + "\n"


def summarize_runs(runs: Sequence[dict]) -> dict:
  """Mean ± std over runs (sample std, ddof=1; 0 for one run) of OA, AA, kappa, per-class."""
  if not runs:
    raise ValueError("no runs to summarize")
  out: dict[str, Any] = {"dataset": runs[0]["dataset"], "seeds": [r["seed"] for r in runs],
                         "text_encoder": runs[0]["text_encoder"], "epochs": runs[0]["epochs"]}
  meth = method_of(runs[0])
  if meth.name != "dpmamba":
    out["method"] = meth.name
  for key in (s.key for s in meth.scored):
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
  keys = list(dict.fromkeys(k for w in wall for k in w)) or ["evaluate"]
  out["wall_time_s"] = {k: float(sum(w.get(k, 0.0) for w in wall)) for k in keys}
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


def evaluate_run(rd, workdir: str, meth: method_lib.Method, models: dict, *, epochs: dict,
                 wall_time_s: dict, batch: int = 512, log: Callable[[str], None] = print,
                 predictions: dict | None = None) -> dict:
  """Evaluates every model `meth` scores whose stage models are in `models` (by stage model
  name) and writes metrics.json + metrics.md. Returns the metrics dict.

  One progress bar (with its ETA) over every model, scenario and test pixel, on stderr unless
  `log` is quiet (a quiet RunLog), and a log line when it starts and when it ends.
  predictions: a dict to receive, per scored model key, (test_idx (N,), {scenario: (N,) int32
  predictions}): what the maps reuse (`maps.write_maps`).
  """
  t0 = time.time()
  metrics: dict[str, Any] = {"dataset": rd.spec.name, "seed": int(rd.cfg.seed),
                             "text_encoder": rd.text_encoder}
  if meth.name != "dpmamba":
    metrics["method"] = meth.name
  stage_names = list(epochs) if meth.name != "dpmamba" else ["pretrain", "distill"]
  metrics["epochs"] = {k: int(epochs.get(k, 0)) for k in stage_names}
  metrics.update({s.key: {} for s in meth.scored})
  todo = [s for s in meth.scored if all(n in models for n in s.needs)]
  n_test, n_all = int(test_pixels(rd).size), int(rd.split.test_idx.size)
  n_scenarios = len(masks_lib.eval_scenarios(rd.spec.modalities))
  total = len(todo) * n_scenarios * n_test
  log(f"evaluation: {total:,} patches ({len(todo)} model{'s' if len(todo) != 1 else ''} x "
      f"{n_scenarios} scenarios x {n_test:,} test pixels)")
  quiet = getattr(log, "quiet", False)  # a quiet RunLog: no progress bar either
  bar = tqdm(total=total, desc="evaluation", unit="patch", unit_scale=True, mininterval=1.0,
             file=sys.stderr, dynamic_ncols=True, disable=quiet)
  try:
    inference.compile_side_by_side([s.classifier(models) for s in todo], rd, batch)
    for scored in todo:
      metrics[scored.key] = evaluate_model(scored.classifier(models), rd, batch=batch,
                                           which=scored.key, progress=bar,
                                           predictions=predictions)
  finally:
    bar.close()
  wall = float(time.time() - t0)
  metrics["wall_time_s"] = {**{k: float(wall_time_s.get(k, 0.0)) for k in stage_names},
                            "evaluate": wall}
  if n_test != n_all:  # only with eval_subsample: the default schema stays as documented
    metrics["test_pixels"] = {"scored": n_test, "of": n_all}
  if rd.cfg.protocol != "honest":  # likewise: only for the authors' protocol
    metrics["protocol"] = rd.cfg.protocol
  write_metrics(workdir, metrics, rd.spec.modalities)
  sub = "" if n_test == n_all else f" (a fixed random subset of the {n_all}: eval_subsample)"
  log(f"evaluation: {wall:.1f} s ({total / max(wall, 1e-9):,.0f} patches/s)")
  log(f"evaluation on {n_test} test pixels{sub} "
      f"({'including' if rd.cfg.include_train_in_test else 'excluding'} the training pixels), "
      f"last-epoch models:")
  log(markdown_table(metrics, rd.spec.modalities))
  return metrics


def read_metrics(path: str, workdir: str) -> dict:
  """metrics.json of a finished run; a damaged one is a UserError saying how to redo it."""
  redo = (f"delete it to re-evaluate, or run python -m dpmamba_jax.evaluate --workdir {workdir}")
  try:
    with open(path, encoding="utf-8") as f:
      metrics = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise errors.UserError(f"{path}: not valid JSON ({' '.join(str(e).split())}); {redo}") from None
  missing = None
  if isinstance(metrics, dict):
    keys = METRICS_FILE_KEYS + tuple(s.key for s in method_of(metrics).scored)
    missing = [k for k in keys if k not in metrics]
  if missing is None or missing:
    what = (f"a JSON {type(metrics).__name__}" if missing is None
            else f"no key {missing[0]!r}")
    raise errors.UserError(f"{path}: {what}, expected the metrics of a finished run; {redo}")
  return metrics
