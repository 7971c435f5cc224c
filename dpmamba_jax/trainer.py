"""The one trainer of every method: its stages in order with resume, then evaluation and maps.

Each stage (method.Stage) trains one model and saves it as <workdir>/<stage.model>/; a stage
whose model is there already is loaded instead. Rerunning the same command in the same workdir
resumes from the last periodic checkpoint (<workdir>/ckpt/<stage.name>/) and finishes with the
same metrics as an uninterrupted run; a damaged periodic checkpoint is deleted with a warning
and the one before it is used (none readable: the stage starts again). A non-finite loss or
gradient norm stops training with an error naming the stage, epoch and step (checked with every
epoch's end, so no later), and nothing non-finite is saved as a checkpoint or a final model.
Then the last-epoch models the method scores are evaluated over every modality scenario
(metrics.json, metrics.md) and the classification maps are drawn (maps/).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dpmamba_jax import checkpoint
from dpmamba_jax import config as config_lib
from dpmamba_jax import errors
from dpmamba_jax import fileio
from dpmamba_jax import maps
from dpmamba_jax import method as method_lib
from dpmamba_jax import methods
from dpmamba_jax import metrics as metrics_lib
from dpmamba_jax import sharding
from dpmamba_jax import steps
from dpmamba_jax.data.patches import BalancedSampler, ShuffleSampler
from dpmamba_jax.model import network
from dpmamba_jax.run import RunData, input_problem, load_run_data, saved_inputs
from dpmamba_jax.workdir import RunLog, check_workdir_config, lock_workdir, make_workdir


def shapes_of(rd: RunData) -> method_lib.Shapes:
  """The dataset shapes a method's models are built from."""
  return method_lib.Shapes.of(rd.spec, rd.patch_size, int(rd.z.shape[1]))


def _sampler(stage: method_lib.Stage, rd: RunData, seed: int):
  if stage.sampler == "balanced":
    return BalancedSampler(rd.train_labels, rd.spec.num_classes, stage.batch_size, seed)
  return ShuffleSampler(rd.train_labels.size, stage.batch_size, seed)


def train_stage(stage: method_lib.Stage, index: int, rd: RunData, model: nnx.Module,
                workdir: str, log: RunLog, frozen: dict) -> tuple[nnx.Module, float]:
  """Trains `model` for one stage with resume. Returns (trained model, stage wall time in s).

  index: the stage's position in its method (its PRNG stream: fold_in(seed, index + 1)).
  frozen: the earlier stages' models it reads. Periodic checkpoints go to
  <workdir>/ckpt/<stage.name>/ (the step is the epoch).
  """
  cfg = rd.cfg
  epochs = stage.epochs
  sampler = _sampler(stage, rd, cfg.seed)
  oc = stage.optim(sampler.steps)
  tx, sched = steps.make_optimizer(oc)
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), index + 1)
  graphdef, state = steps.init_train_state(model, tx, rng)
  state = state.replace(params=steps.copy_tree(state.params),
                        batch_stats=steps.copy_tree(state.batch_stats))  # donation must not free `model`
  ckpts = checkpoint.TrainCheckpoints(os.path.join(workdir, "ckpt", stage.name))
  start, wall_before = 0, 0.0
  if ckpts.latest_epoch() is not None:
    # A damaged periodic checkpoint: the one before it (deleted with a warning); none readable:
    # the stage from scratch (the same numbers, only slower).
    restored = ckpts.restore_latest(state, warn=log.warn)
    if restored is None:
      log.warn(f"warning: {ckpts.directory}: no readable training checkpoint; training the "
               f"{stage.name} stage from epoch 0")
    else:
      state, meta = restored
      start, wall_before = int(meta["epoch"]), float(meta.get("wall_time_s", 0.0))
      log(f"{stage.name}: resuming from the checkpoint at epoch {start}/{epochs}")
  log.truncate(stage.name, start)
  # Several devices: the batch is sharded over them, everything else replicated (one jit).
  mesh = sharding.data_parallel_mesh(sampler.batch_size, enabled=cfg.data_parallel, log=log)
  cubes, z, to_device = rd.cubes, rd.z, jnp.asarray
  if mesh is not None:
    state = sharding.replicate(state, mesh)
    cubes, z = sharding.replicate((rd.cubes, rd.z), mesh)
    to_device = lambda a: sharding.shard_batch(a, mesh)
  log(f"{stage.name}: {epochs} epochs x {sampler.steps} steps of {sampler.batch_size} "
      f"({_describe_optim(oc)})")
  t0 = time.time()
  run = stage.step(method_lib.StepContext(
      graphdef=graphdef, tx=tx, schedule=sched, frozen=frozen, cubes=cubes, z=z,
      train_idx=rd.split.train_idx.astype(np.int32), train_labels=rd.train_labels,
      to_device=to_device, width=rd.width,
      patch_size=rd.patch_size, batch_size=sampler.batch_size,
      num_modalities=rd.spec.num_modalities, mesh=mesh, log=log))
  window: list = []
  bar = tqdm(total=epochs, initial=start, desc=stage.name, unit="epoch", mininterval=1.0,
             file=sys.stderr, dynamic_ncols=True, disable=log.quiet)
  try:
    for epoch in range(start, epochs):
      batches = sampler.epoch(epoch)  # (steps, B) indices into the train set
      this_epoch = []
      for rows in batches:
        state, m = run(state, rows, rd.train_labels[rows])
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
        _raise_non_finite(stage.name, done, bad, len(this_epoch),
                          jax.device_get(this_epoch[bad]), rd)
      bar.update(1)
      if log_now:
        mean = {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}
        mean["lr"] = float(ms[-1]["lr"])
        window = []
        entry = {"stage": stage.name, "epoch": done, "step": int(jax.device_get(state.step)),
                 "wall_time_s": round(wall_before + time.time() - t0, 3), **mean}
        log.record(entry)
        parts = " ".join(f"{k} {v:.4f}" for k, v in mean.items()
                         if k not in ("lr", "train_oa", "grad_norm"))
        log(f"{stage.name} epoch {done}/{epochs}: {parts} | lr {mean['lr']:.3e} | grad "
            f"{mean['grad_norm']:.3f} | train OA {100 * mean['train_oa']:.2f}%")
        bar.set_postfix(loss=f"{mean['loss']:.4f}", oa=f"{100 * mean['train_oa']:.1f}")
      if done % cfg.ckpt_every == 0 and done < epochs:
        _check_finite_state(state, stage.name, done, rd)
        ckpts.save(done, state, {"epoch": done, "stage": stage.name, "next_epoch": done,
                                 "wall_time_s": wall_before + time.time() - t0})
        log(f"{stage.name}: checkpoint saved at epoch {done}")
    _check_finite_state(state, stage.name, epochs, rd)  # also waits for the last step
  finally:
    bar.close()
    ckpts.close()
  wall = wall_before + time.time() - t0
  return nnx.merge(graphdef, state.params, state.batch_stats), wall


def _describe_optim(oc: steps.OptimConfig) -> str:
  clip = f"clip {oc.grad_clip}" if oc.grad_clip > 0 else "no clipping"
  if oc.schedule == "warmup_cosine":
    return (f"lr {oc.lr:g}, warmup {oc.warmup_steps} steps from {oc.warmup_init:.3g}, cosine to "
            f"{oc.lr_min:.3g}, betas ({oc.b1}, {oc.b2}), wd {oc.weight_decay}, {clip}")
  sched = {"step": f"x {oc.gamma:g} every {oc.step_epochs} epochs",
           "cosine": f"warmup {oc.warmup_epochs} epochs, cosine to {oc.lr_min:g} over "
                     f"{oc.cosine_epochs} epochs"}.get(oc.schedule, "constant")
  extra = (f"momentum {oc.momentum}{' nesterov' if oc.nesterov else ''}" if oc.optimizer == "sgd"
           else f"betas ({oc.b1}, {oc.b2})")
  return f"{oc.optimizer} lr {oc.lr:g} {sched}, {extra}, wd {oc.weight_decay}, {clip}"


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


def _raise_non_finite(stage: str, epoch: int, i: int, steps_: int, m: dict, rd: RunData) -> None:
  what = (f"the loss is {float(m['loss'])}" if not np.isfinite(m["loss"])
          else f"the gradient norm is {float(m['grad_norm'])}")
  raise errors.UserError(f"{stage} epoch {epoch} step {i + 1}/{steps_}: {what}; nothing saved as "
                         f"the final model; {_non_finite_advice(rd)}")


def _non_finite_advice(rd: RunData) -> str:
  """What to change after a non-finite loss or update: the inputs when they are the likely cause
  (run.input_problem), else the learning rate."""
  problem = input_problem(rd)
  if problem is not None:
    return f"likely cause: {problem}; then rerun in a new --workdir"
  return f"use a new --workdir with a lower --set lr=... than {rd.cfg.lr:g}"


def _check_finite_state(state, stage: str, epoch: int, rd: RunData) -> None:
  """Before a checkpoint or the final model: parameters and BatchNorm statistics all finite
  (finite losses and gradients can still make an update overflow)."""
  if not _all_finite((state.params, state.batch_stats)):
    raise errors.UserError(
        f"{stage} epoch {epoch}: the parameters are not finite after the epoch's last update; "
        f"nothing saved as the final model; {_non_finite_advice(rd)}")


# ----------------------------------------------------------------------------------------------
# A whole run.


def _param_count_line(stage: method_lib.Stage, model: nnx.Module, cfg) -> str:
  if stage.model == "student" and cfg.method == "dpmamba":
    what = ("teacher + prompts" if cfg.prompts else "no prompts: missing features zero-filled")
    return f"student: {network.param_count(model):,} parameters ({what})"
  return f"{stage.model}: {network.param_count(model):,} parameters"


def _stages_to_run(cfg, stages: tuple[method_lib.Stage, ...]) -> int:
  """The index of the last stage this run trains (`--stage`: that one, the earlier loaded)."""
  names = [s.name for s in stages]
  if cfg.stage == "all":
    return len(stages) - 1
  if cfg.stage not in names:
    if cfg.method == "dpmamba" and cfg.stage == "distill":
      raise errors.UserError(f"modalities={cfg.modalities}: one modality, no distill stage; "
                             "use --stage all or pretrain")
    raise errors.UserError(f"--stage {cfg.stage}: method {cfg.method} has the stages "
                           f"{', '.join(names)} (or all)")
  return names.index(cfg.stage)


def run_one(cfg, spec, log: RunLog | None = None) -> dict | None:
  """One seed: the method's stages (resuming), then evaluation and maps. Returns metrics."""
  meth = methods.get(cfg.method)
  why = meth.check(method_lib.Shapes.of(spec, cfg.patch_size))
  if why:  # before anything is written
    raise errors.UserError(f"--method {meth.name}: {why}")
  workdir = os.path.abspath(cfg.workdir)
  log = log or RunLog(workdir)
  with contextlib.ExitStack() as held:

    def first_write():  # once the scene, the patch size and the split are checked
      make_workdir(workdir)
      held.enter_context(lock_workdir(workdir, log.warn))
      check_workdir_config(cfg, workdir)
      log(f"run config ({os.path.join(workdir, 'config.json')}):\n{config_lib.describe(cfg)}")

    rd = load_run_data(cfg, spec, workdir, log, before_write=first_write)
    return _run_stages(cfg, meth, rd, workdir, log)


def _run_stages(cfg, meth: method_lib.Method, rd: RunData, workdir: str, log: RunLog) -> dict:
  """run_one once the workdir is locked and the data loaded."""
  spec = rd.spec
  shapes = shapes_of(rd)
  stages = meth.stages(cfg, shapes)
  last = _stages_to_run(cfg, stages)
  scan_impl = cfg.scan_impl or "auto"  # a run-time choice: restored models take this run's
  models: dict[str, nnx.Module] = {}
  epochs: dict[str, int] = {}
  walls: dict[str, float] = {}
  trained_now = False
  meta_common = {"dataset": spec.name, "seed": cfg.seed, "text_encoder": rd.text_encoder,
                 "text_sha256": rd.text_sha256, "method": meth.name}
  redo = "delete that folder to redo the {} stage".format
  for i, stage in enumerate(stages[:last + 1]):
    path = os.path.join(workdir, stage.model)
    frozen = {k: models[k] for k in stage.reads}
    src, hint = path, redo(stage.name)
    if i < last and cfg.stage != "all":  # `--stage LATER`: this one must be there already
      if stage.model == "teacher" and cfg.teacher_ckpt:
        src, hint = cfg.teacher_ckpt, "give the teacher/ dir of another finished run"
        done = checkpoint.is_model_checkpoint(src)
      else:
        done = checkpoint.has_model(src, hint=hint)
      if not done:
        what = "--teacher-ckpt " if stage.model == "teacher" else ""
        raise errors.UserError(f"{what}{src}: no {stage.model} checkpoint; run --stage "
                               f"{stage.name} first or give the {stage.model}/ dir of a "
                               "finished run")
    elif checkpoint.has_model(path, hint=hint):
      log(f"{stage.name}: done already, loading {path}")
    else:
      model, model_cfg = stage.build(frozen, shapes, cfg.seed)
      log(_param_count_line(stage, model, cfg))
      model, wall = train_stage(stage, i, rd, model, workdir, log, frozen)
      trained_now = True
      checkpoint.save_model(path, model, model_cfg, dict(
          meta_common, stage=stage.name, epochs=stage.epochs, wall_time_s=wall),
          inputs=saved_inputs(rd))
      log(f"{stage.name}: {wall:.1f} s, {stage.model} saved to {path}")
      models[stage.model], epochs[stage.name], walls[stage.name] = model, stage.epochs, wall
      continue
    models[stage.model], meta = methods.load_stage_model(stage, src, frozen,
                                                         scan_impl=scan_impl, hint=hint)
    epochs[stage.name] = meta.get("epochs", stage.epochs)
    walls[stage.name] = meta.get("wall_time_s", 0.0)
  if cfg.method == "dpmamba" and len(stages) == 1:
    log("distill: skipped (one modality: no missing-modality scenario; the teacher is the net)")

  scored = [s for s in meth.scored if all(n in models for n in s.needs)]
  metrics_path = os.path.join(workdir, "metrics.json")
  predictions: dict = {}  # the evaluation's, per scored model: the maps reuse them
  if not trained_now and os.path.isfile(metrics_path):
    log(f"evaluation: done already ({metrics_path}); `python -m dpmamba_jax.evaluate --workdir "
        f"{workdir}` recomputes it")
    metrics = metrics_lib.read_metrics(metrics_path, workdir)
  else:
    metrics = metrics_lib.evaluate_run(rd, workdir, meth, models, epochs=epochs,
                                       wall_time_s=walls, batch=cfg.eval_batch, log=log,
                                       predictions=predictions)
    log.record({"stage": "evaluate", "epoch": 0, **{
        s.key: {name: {k: m[k] for k in metrics_lib.METRIC_KEYS}
                for name, m in metrics[s.key].items()} for s in meth.scored}})
  # cfg.maps: True -> the method's model (DPMamba: the student), "all" -> every scored model.
  # The marker lists the models whose maps are complete; models trained now make them stale.
  done = set() if trained_now else maps.complete_maps(workdir, scored[0].key if scored else "")
  if trained_now:
    maps.mark_complete(workdir, ())
  drawn = [s for s in maps.maps_models(scored, cfg.maps) if s.key not in done]
  if drawn:
    log.record(maps.write_maps(rd, workdir, [(s.key, s.classifier(models)) for s in drawn],
                               batch=cfg.eval_batch, log=log, predictions=predictions))
    maps.mark_complete(workdir, sorted(done | {s.key for s in drawn}))
  return metrics


def run_many(cfg, spec, runs: int, root: str, quiet: bool) -> dict:
  """`runs` seeds S..S+runs-1 in <root>/seed<S>, then summary.json / summary.md over them."""
  results = []
  for s in range(cfg.seed, cfg.seed + runs):
    cfg_s = dataclasses.replace(cfg, seed=s, workdir=os.path.join(root, f"seed{s}"))
    results.append(run_one(cfg_s, spec, log_for(cfg_s, quiet)))
  summary = metrics_lib.summarize_runs(results)
  fileio.write_json(os.path.join(root, "summary.json"), summary)
  table = metrics_lib.markdown_table(summary, spec.modalities,
                                     f"{spec.name}: mean ± std over seeds {summary['seeds']}")
  fileio.write_text(os.path.join(root, "summary.md"), table)
  if not quiet:
    print(table)
  return summary


def log_for(cfg, quiet: bool) -> RunLog:
  """The run's log (<workdir>/log.jsonl, written once run_one has made the workdir)."""
  return RunLog(os.path.abspath(cfg.workdir), quiet=quiet)
