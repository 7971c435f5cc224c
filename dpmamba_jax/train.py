"""The main job: `python -m dpmamba_jax.train [--dataset NAME] ...`.

Stage 1 (pretrain) trains the teacher on complete inputs with L_CA and writes <workdir>/teacher/.
Stage 2 (distill) restores it as the frozen teacher, initialises the student from it (new N(0,1)
prompts) and trains the whole student with L_CA + L_TBD on randomly masked inputs; it writes
<workdir>/student/. Then the last-epoch models are evaluated over every modality scenario
(metrics.json, metrics.md) and the classification maps are drawn (maps/).

Rerunning the same command in the same workdir resumes from the last periodic checkpoint
(<workdir>/ckpt/<stage>/) and finishes with the same metrics as an uninterrupted run; a damaged
periodic checkpoint is deleted with a warning and the one before it is used (none readable: the
stage starts again). Damaged run files (config.json, split.npz, teacher/, student/, metrics.json)
and an unusable --workdir are one-line errors saying how to recover. A non-finite loss or gradient
norm stops training with an error naming the stage, epoch and step (checked with every epoch's
end, so no later), and nothing non-finite is saved as a checkpoint or a final model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

from dpmamba_jax import runtime

if __name__ == "__main__":  # before the heavy imports below (runtime.py)
  runtime.reexec_with_hugepage_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dpmamba_jax import checkpoint  # noqa: E402
from dpmamba_jax import config as config_lib  # noqa: E402
from dpmamba_jax import errors  # noqa: E402
from dpmamba_jax import evaluate  # noqa: E402
from dpmamba_jax import fileio  # noqa: E402
from dpmamba_jax import maps  # noqa: E402
from dpmamba_jax import sharding  # noqa: E402
from dpmamba_jax import steps  # noqa: E402
from dpmamba_jax.data import datasets  # noqa: E402
from dpmamba_jax.data.patches import BalancedSampler  # noqa: E402
from dpmamba_jax.model import network  # noqa: E402
from dpmamba_jax.run import RunData, load_run_data, saved_inputs  # noqa: E402

# Keys that do not change the numbers; a rerun may change them without a new workdir.
_FREE_KEYS = ("stage", "log_every", "ckpt_every", "eval_batch", "maps", "compile_cache",
              "data_parallel", "scan_impl",
              "workdir", "data_dir", "teacher_ckpt", "dataset_file")


# ----------------------------------------------------------------------------------------------
# Logging.


class RunLog:
  """Console lines (through tqdm.write) plus <workdir>/log.jsonl."""

  def __init__(self, workdir: str, quiet: bool = False):
    self.path = os.path.join(workdir, "log.jsonl")
    self.primary = runtime.primary_process()
    self.quiet = quiet or not self.primary

  def __call__(self, msg: str) -> None:
    if not self.quiet:
      tqdm.write(msg, file=sys.stdout)
      sys.stdout.flush()

  def warn(self, msg: str) -> None:
    """A `warning: ...` line on stderr, also with --quiet (on the primary process)."""
    if self.primary:
      tqdm.write(msg if msg.startswith("warning:") else f"warning: {msg}", file=sys.stderr)
      sys.stderr.flush()

  def record(self, entry: dict) -> None:
    if not self.primary:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(entry) + "\n")

  def truncate(self, stage: str, after_epoch: int) -> None:
    """Drops entries of `stage` past `after_epoch` (written before a crash, redone on resume)."""
    if not self.primary or not os.path.isfile(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          e = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        if e.get("stage") == stage and e.get("epoch", 0) > after_epoch:
          continue
        keep.append(json.dumps(e) + "\n")
    fileio.write_text(self.path, "".join(keep))


# ----------------------------------------------------------------------------------------------
# Stages.


def _copy_tree(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def stage_optim_config(cfg, stage: str, steps_per_epoch: int) -> steps.OptimConfig:
  """The optimiser settings of `stage` ("pretrain" | "distill") in run `cfg` (config.RunConfig);
  `--protocol reference` runs the authors' LR schedule with its off-by-one."""
  return steps.stage_optim_config(
      stage, lr=cfg.lr, batch_size=cfg.batch_size, steps_per_epoch=steps_per_epoch,
      epochs=cfg.epochs_pretrain if stage == "pretrain" else cfg.epochs_distill,
      warmup_epochs=cfg.warmup_epochs,
      betas=cfg.betas_pretrain if stage == "pretrain" else cfg.betas_distill, eps=cfg.eps,
      weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
      authors_off_by_one=cfg.protocol == "reference")


def student_bn_stats(cfg) -> str:
  """Which samples enter the student's embedding BatchNorm statistics (DPMamba's bn_stats):
  the authors' "all" under `--protocol reference`, else "present"."""
  return "all" if cfg.protocol == "reference" else "present"


def train_stage(stage: str, rd: RunData, model, workdir: str, log: RunLog, *,
                teacher=None) -> tuple[Any, float]:
  """Trains `model` for one stage with resume. Returns (trained model, stage wall time in s).

  stage "pretrain": teacher step on complete inputs. stage "distill": student step against the
  frozen `teacher`. Periodic checkpoints go to <workdir>/ckpt/<stage>/ (the step is the epoch).
  """
  cfg, spec = rd.cfg, rd.spec
  epochs = cfg.epochs_pretrain if stage == "pretrain" else cfg.epochs_distill
  sampler = BalancedSampler(rd.train_labels, spec.num_classes, cfg.batch_size, cfg.seed)
  oc = stage_optim_config(cfg, stage, sampler.steps)
  tx, sched = steps.make_optimizer(oc)
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1 if stage == "pretrain" else 2)
  graphdef, state = steps.init_train_state(model, tx, rng)
  state = state.replace(params=_copy_tree(state.params),
                        batch_stats=_copy_tree(state.batch_stats))  # donation must not free `model`
  ckpts = checkpoint.TrainCheckpoints(os.path.join(workdir, "ckpt", stage))
  start, wall_before = 0, 0.0
  if ckpts.latest_epoch() is not None:
    # A damaged periodic checkpoint: the one before it (deleted with a warning); none readable:
    # the stage from scratch (the same numbers, only slower).
    restored = ckpts.restore_latest(state, warn=log.warn)
    if restored is None:
      log.warn(f"warning: {ckpts.directory}: no readable training checkpoint; training the "
               f"{stage} stage from epoch 0")
    else:
      state, meta = restored
      start, wall_before = int(meta["epoch"]), float(meta.get("wall_time_s", 0.0))
      log(f"{stage}: resuming from the checkpoint at epoch {start}/{epochs}")
  log.truncate(stage, start)
  # Several devices: the batch is sharded over them, everything else replicated (one jit).
  mesh = sharding.data_parallel_mesh(sampler.batch_size,
                                  enabled=bool(getattr(cfg, "data_parallel", True)), log=log)
  common = dict(width=rd.width, patch_size=rd.patch_size, mesh=mesh)
  cubes, z, to_device = rd.cubes, rd.z, jnp.asarray
  if mesh is not None:
    state = sharding.replicate(state, mesh)
    cubes, z = sharding.replicate((rd.cubes, rd.z), mesh)
    to_device = lambda a: sharding.shard_batch(a, mesh)
  train_idx = rd.split.train_idx.astype(np.int32)
  log(f"{stage}: {epochs} epochs x {sampler.steps} steps of {sampler.batch_size} "
      f"(lr {oc.lr:g}, warmup {oc.warmup_steps} steps from {oc.warmup_init:.3g}, cosine to "
      f"{oc.lr_min:.3g}, betas ({oc.b1}, {oc.b2}), wd {oc.weight_decay}, clip {oc.grad_clip})")
  t0 = time.time()
  if stage == "pretrain":
    step_fn = steps.make_teacher_step(graphdef, tx, sched, **common)
    run = lambda st, rows: step_fn(st, cubes, z, to_device(train_idx[rows]),
                                   to_device(rd.train_labels[rows]))
  else:
    t_graphdef, t_params, t_rest = steps.split_model(teacher)
    if mesh is not None:
      t_params, t_rest = sharding.replicate((t_params, t_rest), mesh)
    # The frozen teacher sees complete inputs in eval mode, so its features of the training
    # pixels are the same on every step: computed once here (inside the stage's wall time)
    # instead of a teacher forward per step.
    features = steps.make_teacher_features(t_graphdef, batch_size=sampler.batch_size, **common)
    teacher_feats = features((t_params, t_rest), cubes, train_idx)  # (N_train, D), host
    # on the device once, like the cubes: a step sends only its (B,) rows into it
    teacher_feats = (jnp.asarray(teacher_feats) if mesh is None
                     else sharding.replicate(teacher_feats, mesh))
    log(f"{stage}: the frozen teacher's features of the {train_idx.size} training pixels "
        f"computed once ({time.time() - t0:.1f} s)")
    step_fn = steps.make_student_step(graphdef, tx, sched, num_modalities=spec.num_modalities,
                                      batch_size=sampler.batch_size, distill=cfg.distill,
                                      bn_stats=student_bn_stats(cfg),
                                      **common)
    run = lambda st, rows: step_fn(st, teacher_feats, cubes, z, to_device(rows.astype(np.int32)),
                                   to_device(train_idx[rows]), to_device(rd.train_labels[rows]))
  window: list = []
  bar = tqdm(total=epochs, initial=start, desc=stage, unit="epoch", mininterval=1.0,
             file=sys.stderr, dynamic_ncols=True, disable=log.quiet)
  try:
    for epoch in range(start, epochs):
      batches = sampler.epoch(epoch)  # (steps, B) indices into the train set
      this_epoch = []
      for rows in batches:
        state, m = run(state, rows)
        this_epoch.append(m)
      window += this_epoch
      done = epoch + 1
      log_now = done % cfg.log_every == 0 or done == epochs
      # Non-finite loss / gradient norm: stop now (nothing of it saved), naming the first bad step.
      # Both wait for the epoch's last step, so that the progress bar and its ETA follow the
      # computation: a logging epoch fetches the window anyway, any other does one tiny reduction.
      if log_now:
        ms = jax.device_get(window)
        bad = _first_non_finite(ms[len(ms) - len(this_epoch):])
      else:
        bad = int(_first_non_finite_on_device(
            [m["loss"] for m in this_epoch], [m["grad_norm"] for m in this_epoch]))
      if bad >= 0:
        _raise_non_finite(stage, done, bad, len(this_epoch), jax.device_get(this_epoch[bad]), cfg)
      bar.update(1)
      if log_now:
        mean = {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}
        mean["lr"] = float(ms[-1]["lr"])
        window = []
        entry = {"stage": stage, "epoch": done, "step": int(jax.device_get(state.step)),
                 "wall_time_s": round(wall_before + time.time() - t0, 3), **mean}
        log.record(entry)
        parts = " ".join(f"{k} {v:.4f}" for k, v in mean.items()
                         if k not in ("lr", "train_oa", "grad_norm"))
        log(f"{stage} epoch {done}/{epochs}: {parts} | lr {mean['lr']:.3e} | grad "
            f"{mean['grad_norm']:.3f} | train OA {100 * mean['train_oa']:.2f}%")
        bar.set_postfix(loss=f"{mean['loss']:.4f}", oa=f"{100 * mean['train_oa']:.1f}")
      if done % cfg.ckpt_every == 0 and done < epochs:
        _check_finite_state(state, stage, done, cfg)
        ckpts.save(done, state, {"epoch": done, "stage": stage, "next_epoch": done,
                                 "wall_time_s": wall_before + time.time() - t0})
        log(f"{stage}: checkpoint saved at epoch {done}")
    _check_finite_state(state, stage, epochs, cfg)  # also waits for the last step
  finally:
    bar.close()
    ckpts.close()
  wall = wall_before + time.time() - t0
  return nnx.merge(graphdef, state.params, state.batch_stats), wall


def _first_non_finite(ms: list[dict]) -> int:
  """Index of the first step whose loss or gradient norm is not finite (host values), or -1."""
  for i, m in enumerate(ms):
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      return i
  return -1


@jax.jit
def _first_non_finite_on_device(losses: list, norms: list) -> jax.Array:
  """`_first_non_finite` of an epoch's device scalars in one call (one int fetched, no more)."""
  ok = jnp.isfinite(jnp.stack(losses)) & jnp.isfinite(jnp.stack(norms))
  return jnp.where(ok.all(), -1, jnp.argmin(ok))


def _all_finite(tree) -> bool:
  """On the host: no compile, and a checkpoint or final save fetches the state anyway."""
  return all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(tree))
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def _raise_non_finite(stage: str, epoch: int, i: int, steps: int, m: dict, cfg) -> None:
  what = (f"the loss is {float(m['loss'])}" if not np.isfinite(m["loss"])
          else f"the gradient norm is {float(m['grad_norm'])}")
  raise errors.UserError(
      f"{stage} epoch {epoch} step {i + 1}/{steps}: {what}; nothing saved as the final model "
      f"(use a new --workdir with a lower --set lr=... than {cfg.lr:g}, or check the inputs)")


def _check_finite_state(state, stage: str, epoch: int, cfg) -> None:
  """Before a checkpoint or the final model: parameters and BatchNorm statistics all finite
  (finite losses and gradients can still make an update overflow)."""
  if not _all_finite((state.params, state.batch_stats)):
    raise errors.UserError(
        f"{stage} epoch {epoch}: the parameters are not finite after the epoch's last update; "
        f"nothing saved as the final model (use a new --workdir with a lower --set lr=... than "
        f"{cfg.lr:g}, or check the inputs)")


def run_one(cfg, spec, log: RunLog | None = None) -> dict | None:
  """One seed: pretrain and/or distill (resuming), then evaluation and maps. Returns metrics."""
  workdir = os.path.abspath(cfg.workdir)
  _make_workdir(workdir)
  _check_workdir_config(cfg, workdir)
  log = log or RunLog(workdir)
  log(f"run config ({os.path.join(workdir, 'config.json')}):\n{config_lib.describe(cfg)}")
  rd = load_run_data(cfg, spec, workdir, log)
  scan_impl = cfg.scan_impl or "auto"  # a run-time choice: restored models take this run's
  teacher_dir = os.path.join(workdir, "teacher")
  student_dir = os.path.join(workdir, "student")
  teacher = student = None
  epochs: dict = {}
  walls: dict = {}
  trained_now = False
  meta_common = {"dataset": spec.name, "seed": cfg.seed, "text_encoder": rd.text_encoder,
                 "text_sha256": rd.text_sha256}

  redo = "delete that folder to redo the {} stage".format
  if cfg.stage in ("all", "pretrain"):
    if checkpoint.has_model(teacher_dir, hint=redo("pretrain")):
      log(f"pretrain: done already, loading {teacher_dir}")
      teacher, _, tmeta = checkpoint.load_model(teacher_dir, scan_impl=scan_impl,
                                                hint=redo("pretrain"))
      epochs["pretrain"], walls["pretrain"] = tmeta.get("epochs", 0), tmeta.get("wall_time_s", 0.0)
    else:
      mcfg = config_lib.model_config(cfg, spec, rd.z.shape[1], prompts=False)
      model = network.DPMamba(mcfg, rngs=nnx.Rngs(cfg.seed))
      log(f"teacher: {network.param_count(model):,} parameters")
      teacher, wall = train_stage("pretrain", rd, model, workdir, log)
      trained_now = True
      checkpoint.save_model(teacher_dir, teacher, mcfg, dict(
          meta_common, stage="pretrain", epochs=cfg.epochs_pretrain, wall_time_s=wall),
          inputs=saved_inputs(rd))
      log(f"pretrain: {wall:.1f} s, teacher saved to {teacher_dir}")
      epochs["pretrain"], walls["pretrain"] = cfg.epochs_pretrain, wall

  if cfg.stage in ("all", "distill") and spec.num_modalities == 1:
    # One modality (HSI-Net etc.): no modality can go missing, so there is no student.
    if teacher is None:
      raise errors.UserError(f"modalities={cfg.modalities}: one modality, no distill stage; "
                             "use --stage all or pretrain")
    log("distill: skipped (one modality: no missing-modality scenario; the teacher is the net)")
  elif cfg.stage in ("all", "distill"):
    if teacher is None:
      src = cfg.teacher_ckpt or teacher_dir
      # our own teacher/ damaged: redo it; a --teacher-ckpt folder that is none: the user's path
      hint = (redo("pretrain") if not cfg.teacher_ckpt
              else "give the teacher/ dir of another finished run")
      if not (checkpoint.is_model_checkpoint(src) if cfg.teacher_ckpt
              else checkpoint.has_model(src, hint=hint)):
        raise errors.UserError(f"--teacher-ckpt {src}: no teacher checkpoint; run --stage "
                               "pretrain first or give the teacher/ dir of a finished run")
      teacher, _, tmeta = checkpoint.load_model(src, scan_impl=scan_impl, hint=hint)
      epochs["pretrain"], walls["pretrain"] = tmeta.get("epochs", 0), tmeta.get("wall_time_s", 0.0)
    if checkpoint.has_model(student_dir, hint=redo("distill")):
      log(f"distill: done already, loading {student_dir}")
      student, _, smeta = checkpoint.load_model(student_dir, scan_impl=scan_impl,
                                                hint=redo("distill"))
      wall = smeta.get("wall_time_s", 0.0)
    else:
      tcfg = teacher.cfg
      _check_teacher(tcfg, cfg, spec, rd)
      scfg = tcfg.replace(prompts=cfg.prompts)  # prompts=false: Variant-3, zero-filled
      student = network.DPMamba(scfg, rngs=nnx.Rngs(cfg.seed + 1))  # prompts ~ N(0, 1)
      nnx.update(student, _copy_tree(nnx.state(teacher)))  # everything but the prompts
      what = "teacher + prompts" if cfg.prompts else "no prompts: missing features zero-filled"
      log(f"student: {network.param_count(student):,} parameters ({what})")
      student, wall = train_stage("distill", rd, student, workdir, log, teacher=teacher)
      trained_now = True
      checkpoint.save_model(student_dir, student, scfg, dict(
          meta_common, stage="distill", epochs=cfg.epochs_distill, wall_time_s=wall),
          inputs=saved_inputs(rd))
      log(f"distill: {wall:.1f} s, student saved to {student_dir}")
    epochs["distill"], walls["distill"] = cfg.epochs_distill, wall

  metrics_path = os.path.join(workdir, "metrics.json")
  if not trained_now and os.path.isfile(metrics_path):
    log(f"evaluation: done already ({metrics_path}); `python -m dpmamba_jax.evaluate --workdir "
        f"{workdir}` recomputes it")
    metrics = _read_metrics(metrics_path, workdir)
  else:
    metrics = evaluate.evaluate_run(rd, workdir, teacher, student, epochs=epochs,
                                    wall_time_s=walls, batch=cfg.eval_batch, log=log)
    log.record({"stage": "evaluate", "epoch": 0, **{
        key: {name: {k: m[k] for k in evaluate.METRIC_KEYS} for name, m in metrics[key].items()}
        for key in ("student", "teacher")}})
  maps_dir = os.path.join(workdir, "maps")
  marker = os.path.join(maps_dir, ".complete")
  if cfg.maps and (trained_now or not os.path.isfile(marker)):
    for which, model in (("student", student), ("teacher", teacher if student is None else None)):
      if model is not None:
        maps.write_all_maps(rd, model, maps_dir, batch=cfg.eval_batch, which=which, log=log,
                            comparison=os.path.join(workdir, f"comparison_{which}.png"))
    fileio.write_text(marker, "")
  return metrics


def _check_teacher(tcfg, cfg, spec, rd) -> None:
  want = (tuple(spec.model_bands), cfg.patch_size, int(rd.z.shape[1]), cfg.backbone, cfg.fusion,
          cfg.mixer)
  got = (tuple(tcfg.bands), tcfg.patch_size, tcfg.out_dim, tcfg.backbone, tcfg.fusion,
         tcfg.mixer)
  if want != got:
    raise errors.UserError(f"teacher checkpoint: (bands, patch_size, out_dim, backbone, fusion, "
                           f"mixer) = {got}, but this "
                           f"run needs {want}; use a teacher trained on the same data and text "
                           "encoder")


def _read_metrics(path: str, workdir: str) -> dict:
  """metrics.json of a finished run; a damaged one is a UserError saying how to redo it."""
  redo = (f"delete it to re-evaluate, or run python -m dpmamba_jax.evaluate --workdir {workdir}")
  try:
    with open(path, encoding="utf-8") as f:
      metrics = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise errors.UserError(f"{path}: not valid JSON ({' '.join(str(e).split())}); {redo}") from None
  missing = ([k for k in evaluate.METRICS_FILE_KEYS if k not in metrics]
             if isinstance(metrics, dict) else None)
  if missing is None or missing:
    what = (f"a JSON {type(metrics).__name__}" if missing is None
            else f"no key {missing[0]!r}")
    raise errors.UserError(f"{path}: {what}, expected the metrics of a finished run; {redo}")
  return metrics


def _make_workdir(workdir: str) -> None:
  """Creates the workdir (and its parents); an OSError is one line naming the path and why."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f"--workdir {workdir}: {_why_no_folder(workdir, e)}") from None


def _why_no_folder(path: str, e: OSError) -> str:
  if isinstance(e, FileExistsError) and not os.path.isdir(path):
    return "is a file, expected a folder"
  if isinstance(e, NotADirectoryError):
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent) and not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
      return f"{parent} is a file, expected a folder"
  where = f" {e.filename}" if e.filename and os.fspath(e.filename) != path else ""
  return f"cannot create{where or ' it'} ({e.strerror or e})"


# What a rerun resumes from: once one of these exists, config.json binds the workdir's settings.
_RUN_OUTPUTS = ("split.npz", "teacher", "student", "ckpt", "metrics.json")


def _check_workdir_config(cfg, workdir: str) -> None:
  """Writes config.json, or checks that a rerun uses the same settings (resume). A workdir
  whose run stopped before drawing its split (a bad setting, say) holds nothing to resume:
  its config.json is replaced."""
  path = os.path.join(workdir, "config.json")
  new = cfg.to_dict()
  started = any(os.path.exists(os.path.join(workdir, n)) for n in _RUN_OUTPUTS)
  if started and os.path.isfile(path):
    old = config_lib.read_saved_config(
        path, "this workdir's settings cannot be checked: use a new --workdir or restore the file")
    defaults = config_lib.RunConfig().to_dict()  # keys added later read as their defaults
    diff = sorted(k for k in set(old) | set(new)
                  if k not in _FREE_KEYS and old.get(k, defaults.get(k)) != new.get(k))
    if diff:
      k = diff[0]
      raise errors.UserError(
          f"{path}: this workdir was run with {k}={old.get(k)!r}, now {k}={new.get(k)!r}; "
          "rerun with the same settings to resume, or use a new --workdir")
  try:
    fileio.write_json(path, new)
  except OSError as e:  # an unwritable workdir (or config.json a folder, ...)
    raise errors.UserError(f"--workdir {workdir}: cannot write {os.path.basename(path)} "
                           f"({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------
# CLI.


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(
      prog="python -m dpmamba_jax.train",
      description="Train DPMamba (teacher pretraining, then student distillation), evaluate the "
                  "last-epoch models over every modality scenario and draw the maps. Rerun the "
                  "same command to resume after an interruption.")
  p.add_argument("--dataset", default=None, choices=sorted(datasets.DATASETS),
                 help="dataset (default: the built-in synthetic scene, no files needed)")
  p.add_argument("--dataset-file", default=None, metavar="YAML",
                 help="your own dataset, defined in a YAML file (docs/own-data.md)")
  p.add_argument("--data-dir", default=None, help="folder with the dataset files")
  p.add_argument("--workdir", default=None,
                 help="output folder (default runs/<dataset>/seed<S>; with --runs N, "
                      "<workdir>/seed<S> per run)")
  p.add_argument("--config", default=None, help="YAML/JSON file of config keys")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override one config key (repeatable), e.g. --set hidden=32")
  p.add_argument("--seed", type=int, default=None, help="seed of the split and the run (0)")
  p.add_argument("--runs", type=int, default=1, help="repeat with seeds S..S+N-1, mean ± std")
  p.add_argument("--epochs", type=int, default=None,
                 help="epochs of each stage (default: the dataset's, 500 for the paper's)")
  p.add_argument("--stage", default=None, choices=config_lib.STAGES, help="stages to run (all)")
  p.add_argument("--teacher-ckpt", default=None,
                 help="distill from this teacher dir (default <workdir>/teacher)")
  p.add_argument("--text-encoder", default=None, choices=("clip", "minilm", "random"),
                 help="class-text encoder (default: clip with --clip-weights, else minilm)")
  p.add_argument("--clip-weights", default=None, help="local CLIP text-tower weights")
  p.add_argument("--split-file", default=None,
                 help="fixed split: an official_split.npz (train/test maps) or a split.npz")
  p.add_argument("--protocol", default=None, choices=config_lib.PROTOCOLS,
                 help="honest (default) or reference: the authors' protocol where it differs "
                      "(raw inputs, training pixels in the test set, their LR schedule, masked "
                      "samples in the student's BatchNorm statistics; docs/deviations.md)")
  p.add_argument("--include-train-in-test", action="store_true",
                 help="test on every labelled pixel, training pixels included (as the authors)")
  p.add_argument("--normalize", default=None, choices=config_lib.NORMALIZE,
                 help="per-band input scaling: standard (default, z-score on the training "
                      "pixels) or none (raw values, as the authors)")
  p.add_argument("--no-compile-cache", action="store_true",
                 help="disable the persistent XLA compilation cache "
                      f"({runtime.compile_cache_dir()})")
  p.add_argument("--quiet", action="store_true", help="no console log lines, no progress bars")
  g = p.add_argument_group("several hosts (docs/usage.md: Several hosts)")
  g.add_argument("--distributed", action="store_true",
                 help="join a multi-controller run (jax.distributed.initialize) first; run the "
                      "same command on every host")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="process 0's address (default: from the environment, e.g. Slurm)")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)
  return p


def resolve_args(args) -> tuple[Any, Any]:
  """RunConfig from: dataset spec < --config file < --set < flags."""
  over: dict = {}
  if args.config:
    over.update(config_lib.load_config_file(args.config))
  over.update(config_lib.parse_sets(args.set))
  if args.dataset and args.dataset_file:
    raise errors.UserError("--dataset and --dataset-file: give one of them")
  flags = {"dataset": args.dataset, "dataset_file": args.dataset_file,
           "data_dir": args.data_dir, "workdir": args.workdir,
           "seed": args.seed, "stage": args.stage, "teacher_ckpt": args.teacher_ckpt,
           "text_encoder": args.text_encoder, "clip_weights": args.clip_weights,
           "split_file": args.split_file, "normalize": args.normalize,
           "protocol": args.protocol}
  for k, v in flags.items():
    if v is not None:
      over[k] = v
  if args.epochs is not None:
    if args.epochs < 1:
      raise errors.UserError(f"--epochs {args.epochs}: expected an int >= 1")
    over["epochs_pretrain"] = over["epochs_distill"] = args.epochs
  if args.include_train_in_test:
    over["include_train_in_test"] = True
  if args.no_compile_cache:
    over["compile_cache"] = False
  return config_lib.resolve(over)


@errors.cli_entry
def main(argv=None) -> int:
  runtime.setup_cpu_flags()
  args = _parser().parse_args(argv)
  if args.runs < 1:
    raise errors.UserError(f"--runs {args.runs}: expected an int >= 1")
  if args.distributed:
    runtime.init_distributed(args.coordinator, args.num_processes, args.process_id)
  elif any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
    raise errors.UserError("--coordinator / --num-processes / --process-id need --distributed")
  cfg, spec = resolve_args(args)
  args.quiet = args.quiet or not runtime.primary_process()
  cache = runtime.setup_compile_cache(cfg.compile_cache)
  if cache and not args.quiet:
    print(f"XLA compilation cache: {cache}")
  if args.runs == 1:
    run_one(cfg, spec, _log_for(cfg, args.quiet))
    return 0
  root = os.path.abspath(args.workdir or os.path.join("runs", spec.name))
  results = []
  for s in range(cfg.seed, cfg.seed + args.runs):
    cfg_s = dataclasses.replace(cfg, seed=s, workdir=os.path.join(root, f"seed{s}"))
    results.append(run_one(cfg_s, spec, _log_for(cfg_s, args.quiet)))
  summary = evaluate.summarize_runs(results)
  fileio.write_json(os.path.join(root, "summary.json"), summary)
  table = evaluate.markdown_table(summary, spec.modalities,
                                  f"{spec.name}: mean ± std over seeds {summary['seeds']}")
  fileio.write_text(os.path.join(root, "summary.md"), table)
  if not args.quiet:
    print(table)
  return 0


def _log_for(cfg, quiet: bool) -> RunLog:
  workdir = os.path.abspath(cfg.workdir)
  _make_workdir(workdir)
  return RunLog(workdir, quiet=quiet)


if __name__ == "__main__":
  raise SystemExit(main())
