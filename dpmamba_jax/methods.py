"""The registry of training methods, and DPMamba's own two stages.

`get(name)` returns a method.Method; `python -m dpmamba_jax.train --method NAME`. DPMamba
(spec §5): stage "pretrain" trains the teacher (teacher/) on complete inputs with L_CA; stage
"distill" initialises the student (student/) from the frozen teacher with new N(0, 1) prompts and
trains it with L_CA + L_TBD on randomly masked inputs. The comparison methods are in peers/.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from dpmamba_jax import checkpoint
from dpmamba_jax import config as config_lib
from dpmamba_jax import errors
from dpmamba_jax import method
from dpmamba_jax import sharding
from dpmamba_jax import steps
from dpmamba_jax.model import network
from dpmamba_jax.peers import crosshl
from dpmamba_jax.peers import dgdnet
from dpmamba_jax.peers import hct
from dpmamba_jax.peers import mshnet
from dpmamba_jax.peers import sal2rn
from dpmamba_jax.peers import shaspec


def dpmamba_optim_config(cfg: config_lib.RunConfig, stage: str,
                         steps_per_epoch: int) -> steps.OptimConfig:
  """The optimiser settings of DPMamba's `stage` ("pretrain" | "distill") in run `cfg`."""
  return steps.stage_optim_config(
      stage, lr=cfg.lr, batch_size=cfg.batch_size, steps_per_epoch=steps_per_epoch,
      epochs=cfg.epochs_pretrain if stage == "pretrain" else cfg.epochs_distill,
      warmup_epochs=cfg.warmup_epochs,
      betas=cfg.betas_pretrain if stage == "pretrain" else cfg.betas_distill, eps=cfg.eps,
      weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
      authors_off_by_one=cfg.authors_lr_off_by_one)


def _model_config(cfg: config_lib.RunConfig, shapes: method.Shapes,
                  prompts: bool) -> network.ModelConfig:
  return config_lib.model_config_for(cfg, shapes.bands, shapes.text_dim, prompts=prompts)


def _teacher_step(ctx: method.StepContext) -> Callable:
  step = steps.make_teacher_step(ctx.graphdef, ctx.tx, ctx.schedule, width=ctx.width,
                                 patch_size=ctx.patch_size, mesh=ctx.mesh)
  return lambda state, rows, labels: step(state, ctx.cubes, ctx.z,
                                          ctx.to_device(ctx.train_idx[rows]),
                                          ctx.to_device(labels))


def _student_step(cfg: config_lib.RunConfig) -> method.StepFactory:
  def factory(ctx: method.StepContext) -> Callable:
    t0 = time.time()
    t_graphdef, t_params, t_rest = steps.split_model(ctx.frozen["teacher"])
    if ctx.mesh is not None:
      t_params, t_rest = sharding.replicate((t_params, t_rest), ctx.mesh)
    # The frozen teacher sees complete inputs in eval mode, so its features of the training
    # pixels are the same on every step: computed once (inside the stage's wall time) instead
    # of a teacher forward per step, and left on the device: a step sends only its (B,) rows.
    features = steps.make_teacher_features(t_graphdef, width=ctx.width, patch_size=ctx.patch_size,
                                           batch_size=ctx.batch_size, mesh=ctx.mesh)
    feats = features((t_params, t_rest), ctx.cubes, ctx.train_idx)  # (N_train, D), host
    feats = jnp.asarray(feats) if ctx.mesh is None else sharding.replicate(feats, ctx.mesh)
    ctx.log(f"distill: the frozen teacher's features of the {ctx.train_idx.size} training "
            f"pixels computed once ({time.time() - t0:.1f} s)")
    step = steps.make_student_step(ctx.graphdef, ctx.tx, ctx.schedule,
                                   num_modalities=ctx.num_modalities, batch_size=ctx.batch_size,
                                   distill=cfg.distill, bn_stats=cfg.student_bn_stats,
                                   width=ctx.width, patch_size=ctx.patch_size, mesh=ctx.mesh)
    return lambda state, rows, labels: step(state, feats, ctx.cubes, ctx.z,
                                            ctx.to_device(rows.astype("int32")),
                                            ctx.to_device(ctx.train_idx[rows]),
                                            ctx.to_device(labels))

  return factory


def _check_teacher(tcfg: network.ModelConfig, want: network.ModelConfig) -> None:
  keys = ("bands", "patch_size", "out_dim", "backbone", "fusion", "mixer")
  got_v, want_v = (tuple(getattr(c, k) for k in keys) for c in (tcfg, want))
  if got_v != want_v:
    raise errors.UserError(f"teacher checkpoint: ({', '.join(keys)}) = {got_v}, but this run "
                           f"needs {want_v}; use a teacher trained on the same data and text "
                           "encoder")


def _dpmamba_stages(cfg: config_lib.RunConfig,
                    shapes: method.Shapes) -> tuple[method.Stage, ...]:
  def build_teacher(frozen, shapes_, seed):
    mcfg = _model_config(cfg, shapes_, prompts=False)
    return network.DPMamba(mcfg, rngs=nnx.Rngs(seed)), mcfg

  def build_student(frozen, shapes_, seed):
    teacher = frozen["teacher"]
    _check_teacher(teacher.cfg, _model_config(cfg, shapes_, prompts=False))
    scfg = teacher.cfg.replace(prompts=cfg.prompts)  # prompts=false: Variant-3, zero-filled
    student = network.DPMamba(scfg, rngs=nnx.Rngs(seed + 1))  # prompts ~ N(0, 1)
    nnx.update(student, steps.copy_tree(nnx.state(teacher)))  # everything but the prompts
    return student, scfg

  pretrain = method.Stage(
      name="pretrain", model="teacher", reads=(), epochs=cfg.epochs_pretrain,
      batch_size=cfg.batch_size, build=build_teacher, restore=None,
      optim=lambda n: dpmamba_optim_config(cfg, "pretrain", n), step=_teacher_step)
  if shapes.num_modalities == 1:
    # One modality (HSI-Net etc.): no modality can go missing, so there is no student.
    return (pretrain,)
  distill = method.Stage(
      name="distill", model="student", reads=("teacher",), epochs=cfg.epochs_distill,
      batch_size=cfg.batch_size, build=build_student, restore=None,
      optim=lambda n: dpmamba_optim_config(cfg, "distill", n), step=_student_step(cfg))
  return pretrain, distill


DPMAMBA = method.Method(
    name="dpmamba", title="DPMamba",
    stages=_dpmamba_stages,
    scored=(method.Scored("student", "DPMamba (student)", ("student",),
                          lambda models: models["student"]),
            method.Scored("teacher", "Baseline (teacher, zero-filled)", ("teacher",),
                          lambda models: models["teacher"], zero_filled=True)))

METHODS: dict[str, method.Method] = {m.name: m for m in (
    DPMAMBA, shaspec.METHOD, dgdnet.METHOD, mshnet.METHOD, hct.METHOD, sal2rn.METHOD,
    crosshl.METHOD)}


def get(name: str) -> method.Method:
  """The method called `name`; a UserError listing the methods for any other name."""
  if name not in METHODS:
    raise errors.UserError(f"--method {name}: unknown; expected one of {', '.join(METHODS)}")
  return METHODS[name]


def defaults(name: str, dataset: str) -> dict:
  """The RunConfig keys method `name` sets for `dataset` before the user's (config.resolve)."""
  m = get(name)
  d = dict(m.defaults.get("*", {}))
  d.update(m.defaults.get(dataset, {}))
  return d


# ----------------------------------------------------------------------------------------------
# Trained models.


def load_stage_model(stage: method.Stage, path: str, frozen: Mapping[str, nnx.Module], *,
                     scan_impl: str = "auto", hint: str | None = None
                     ) -> tuple[nnx.Module, dict]:
  """A stage's saved model and its meta from `path` (frozen: the earlier models it reads)."""
  rebuild = None if stage.restore is None else (lambda saved: stage.restore(saved, frozen))
  model, _, meta = checkpoint.load_model(path, scan_impl=scan_impl, hint=hint, rebuild=rebuild)
  return model, meta


def load_for_prediction(model_dir: str, *, hint: str | None = None
                        ) -> tuple[nnx.Module, dict, str]:
  """The classifier of a trained model folder: (module for inference.Predictor, its meta, what
  replaces a missing modality).

  A DPMamba folder (RUN/student, RUN/teacher) is its model. A comparison method's model folder
  classifies with the method's scored classifier, which may use several of the run's stage
  models (MSH-Net's ensembles): those are read from the same run folder.
  """
  meta = checkpoint.load_meta(model_dir, hint=hint)
  name = meta.get("method", "dpmamba")
  if name == "dpmamba":
    model, mcfg, meta = checkpoint.load_model(model_dir, hint=hint)
    return model, meta, ("its prompts" if mcfg.prompts else "zeros (a teacher has no prompts)")
  meth = get(name)
  workdir = os.path.dirname(os.path.abspath(model_dir))
  saved = config_lib.read_saved_config(
      os.path.join(workdir, "config.json"),
      f"{name} models are read with their run's settings: restore the file")
  cfg = config_lib.RunConfig(**{k: config_lib.coerce(k, v, where="config.json")
                                for k, v in saved.items() if k in config_lib.field_names()})
  shapes = method.Shapes.from_json(checkpoint.load_config(model_dir, hint=hint)["shapes"])
  models: dict[str, nnx.Module] = {}
  for stage in meth.stages(cfg, shapes):
    path = os.path.join(workdir, stage.model)
    if checkpoint.is_model_checkpoint(path):
      frozen = {k: models[k] for k in stage.reads if k in models}
      models[stage.model], _ = load_stage_model(stage, path, frozen, hint=hint)
  scored = next((s for s in meth.scored if all(n in models for n in s.needs)), None)
  if scored is None:
    raise errors.UserError(f"{workdir}: the {meth.title} run is not finished (its models "
                           f"{', '.join(meth.scored[0].needs)} are needed)")
  how = "zeros" if scored.zero_filled else f"{meth.title}'s own missing-modality rule"
  return scored.classifier(models), meta, how
