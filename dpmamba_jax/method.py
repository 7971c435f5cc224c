"""The method interface: what a training method (DPMamba or a comparison method) declares.

A method is a list of training stages and a way to classify a batch in any modality scenario.
Everything else (data, split, normalisation, the sampler, the jitted steps with donated state,
periodic checkpoints and resume, evaluation of every scenario, maps, prediction on a new scene)
is shared and lives in trainer.py, inference.py, metrics.py and maps.py. The registry of methods
is methods.py; each comparison method is one file in peers/.

A stage trains one model (saved as <workdir>/<stage.model>/) and may read the models of earlier
stages, frozen (`Stage.reads`): DPMamba's student starts from its teacher and is distilled from
it; MSH-Net's students hallucinate its teacher; its ensembles combine students and single nets.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpmamba_jax import config
from dpmamba_jax import masks as masks_lib
from dpmamba_jax import sharding
from dpmamba_jax import steps

SAMPLERS = ("balanced", "shuffle")


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What a method's models are built from: the dataset's model inputs and classes."""
  bands: tuple[int, ...]        # per modality, after PCA
  num_classes: int
  patch_size: int
  modalities: tuple[str, ...]   # names, in the dataset's order (HSI first)
  text_dim: int                 # D of the class-text features (DPMamba's output width)
  # per modality, the bands in the files; where the `pca` key keeps them (raw+N), a modality's
  # channels are its raw_bands[m] bands, then bands[m] - raw_bands[m] PCA components
  raw_bands: tuple[int, ...] = ()

  @property
  def num_modalities(self) -> int:
    return len(self.bands)

  @classmethod
  def from_json(cls, d: dict) -> "Shapes":
    """Inverse of dataclasses.asdict (lists back to tuples; raw_bands absent in older runs)."""
    return cls(bands=tuple(int(b) for b in d["bands"]), num_classes=int(d["num_classes"]),
               patch_size=int(d["patch_size"]), modalities=tuple(d["modalities"]),
               text_dim=int(d["text_dim"]), raw_bands=tuple(int(b) for b in d.get("raw_bands", ())))

  @classmethod
  def of(cls, spec, patch_size: int, text_dim: int = 0) -> "Shapes":
    """The shapes of a dataset spec (data.DatasetSpec) at a patch size."""
    return cls(bands=tuple(spec.model_bands), num_classes=spec.num_classes,
               patch_size=int(patch_size), modalities=tuple(spec.modalities),
               text_dim=int(text_dim), raw_bands=tuple(spec.bands))


# loss(model, frozen models by stage model name, xs [(B, P, P, C_m)], keep (B, M), labels (B,),
#      rng) -> (loss (), {term: ()}, logits (B, C)); model in train mode, frozen in eval mode.
LossFn = Callable[[nnx.Module, Mapping[str, nnx.Module], Sequence[jax.Array], jax.Array,
                   jax.Array, jax.Array], tuple[jax.Array, dict, jax.Array]]
# draw_keep(rng, batch, num_modalities) -> (B, M) float32 keep masks of one training batch.
KeepRule = Callable[[jax.Array, int, int], jax.Array]


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a stage's step factory gets from the trainer (the run's data placed on the mesh)."""
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: Callable
  frozen: Mapping[str, nnx.Module]           # earlier stages' models (Stage.reads)
  cubes: Sequence[jax.Array]                 # padded scene cubes, replicated on the mesh
  z: jax.Array                               # (C, D) class-text features, replicated
  train_idx: np.ndarray                      # (N_train,) int32 flat pixel indices, host
  train_labels: np.ndarray                   # (N_train,) int32 their classes, host
  to_device: Callable                        # host (B,) array -> the step's batch placement
  width: int
  patch_size: int
  batch_size: int
  num_modalities: int
  mesh: jax.sharding.Mesh | None
  log: Callable[[str], None]


# step factory: context -> run(state, rows (B,) int32 into the training set, labels (B,) int32)
#   -> (state, metrics)
StepFactory = Callable[[StepContext], Callable]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage of a method.

  name: its name in the log, in ckpt/<name>/ and in metrics.json's epochs / wall times.
  model: the folder of its trained model in the workdir.
  reads: the `model` names of earlier stages it reads (frozen, eval mode).
  build(frozen, shapes, seed) -> (model, config saved with it); restore(saved config, frozen)
    rebuilds the same structure (checkpoint loading; None: a DPMamba from its ModelConfig).
  optim(steps_per_epoch) -> the stage's steps.OptimConfig.
  step: the step factory (`supervised_step(loss)` for a plain loss).
  sampler: "balanced" (k = B // C per class, class-sorted; DPMamba) or "shuffle" (a permutation
    of the training set per epoch, the last partial batch dropped).
  """
  name: str
  model: str
  reads: tuple[str, ...]
  epochs: int
  batch_size: int
  build: Callable[[Mapping[str, nnx.Module], Shapes, int], tuple[nnx.Module, object]]
  restore: Callable[[dict, Mapping[str, nnx.Module]], nnx.Module] | None
  optim: Callable[[int], steps.OptimConfig]
  step: StepFactory
  sampler: str = "balanced"

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise ValueError(f"sampler {self.sampler!r}: expected one of {SAMPLERS}")


@dataclasses.dataclass(frozen=True)
class Scored:
  """One model that evaluation scores (a metrics.json entry): its key and how it classifies.

  classifier(models by stage model name) -> the module whose eval-mode forward gives class
  scores: a DPMamba (cosine logits against the text features) or a `Classifier`.
  """
  key: str
  label: str                                         # its row label in metrics.md
  needs: tuple[str, ...]                             # the stage models it uses
  classifier: Callable[[Mapping[str, nnx.Module]], nnx.Module]
  zero_filled: bool = False                          # missing modalities filled with zeros


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: its stages (in order) and the models evaluation scores.

  defaults: {dataset name or "*" (any dataset): {RunConfig key: value}}: what the method sets
    before the config file, --set and flags (its patch size, optimiser, batch size, epochs, ...
    from its public training scripts; the dataset's entry wins over "*").
  stages(cfg, shapes) -> the stages (cfg: the resolved config.RunConfig).
  check(shapes) -> why the method cannot take this dataset (one line), or None.
  """
  name: str
  title: str
  stages: Callable[[config.RunConfig, Shapes], tuple[Stage, ...]]
  scored: tuple[Scored, ...]
  defaults: Mapping[str, Mapping[str, object]] = dataclasses.field(default_factory=dict)
  check: Callable[[Shapes], str | None] = lambda shapes: None


class Classifier(nnx.Module):
  """A method's eval-mode classifier over its stage models: classify(models, xs, keep) ->
  logits (B, C). Holds the models (as attributes named by stage) for nnx.split / jit."""

  def __init__(self, models: Mapping[str, nnx.Module], classify: Callable,
               num_modalities: int):
    self.models = nnx.Dict({k: v for k, v in models.items()})
    self.classify = classify
    self.num_modalities = int(num_modalities)

  def __call__(self, xs: Sequence[jax.Array], keep: jax.Array) -> jax.Array:
    """xs: M arrays (B, P, P, C_m); keep: (B, M) 1 = present -> logits (B, C)."""
    return self.classify(dict(self.models), xs, keep)


def all_present(rng: jax.Array, batch: int, num_modalities: int) -> jax.Array:
  """The keep rule of a complete-input stage: (B, M) ones."""
  del rng
  return jnp.ones((batch, num_modalities), jnp.float32)


def supervised_step(loss: LossFn, keep_rule: KeepRule = all_present) -> StepFactory:
  """The step factory of a stage with a plain loss: `steps.make_supervised_step` on the run's
  cubes, the frozen earlier models passed as arguments (not baked into the program)."""

  def factory(ctx: StepContext) -> Callable:
    graphdefs, frozen = {}, {}
    for name, model in ctx.frozen.items():
      gd, params, rest = steps.split_model(model)
      graphdefs[name], frozen[name] = gd, (params, rest)
    if ctx.mesh is not None:
      frozen = sharding.replicate(frozen, ctx.mesh)
    step = steps.make_supervised_step(
        ctx.graphdef, ctx.tx, ctx.schedule, loss, keep_rule, frozen_graphdefs=graphdefs,
        width=ctx.width, patch_size=ctx.patch_size, num_modalities=ctx.num_modalities,
        batch_size=ctx.batch_size, mesh=ctx.mesh)
    train_idx = ctx.train_idx
    return lambda state, rows, labels: step(state, frozen, ctx.cubes,
                                            ctx.to_device(train_idx[rows]),
                                            ctx.to_device(labels))

  return factory


# build(shapes, frozen, rngs) -> a comparison method's model
PeerBuilder = Callable[[Shapes, Mapping[str, nnx.Module], nnx.Rngs], nnx.Module]


def uniform_subsets(rng: jax.Array, batch: int, num_modalities: int) -> jax.Array:
  """`modality_dropout`: per-sample keep masks, stratified over every non-empty modality subset
  and shuffled (masks.sample_masks, the rule DPMamba's student trains with)."""
  return masks_lib.sample_masks(rng, batch, num_modalities)


def peer_stage(cfg: config.RunConfig, *, name: str, reads: tuple[str, ...] = (),
               build: PeerBuilder, loss: LossFn, keep_rule: KeepRule = all_present,
               epochs: int, index: int, weight_decay: float | None = None) -> Stage:
  """A comparison method's stage trained with `cfg`'s plain optimiser (optimizer, lr,
  lr_schedule and its keys, momentum, nesterov, weight_decay, betas_pretrain, eps, grad_clip) on
  shuffled batches. Its model folder is `name`; it is saved with the dataset shapes it was built
  from.
  `--set modality_dropout=true` replaces a complete-input stage's keep rule by
  `uniform_subsets`. index: the stage's position (its initialisation seed is seed + index);
  weight_decay: the stage's own, where the method's scripts give stages different ones."""
  if cfg.modality_dropout and keep_rule is all_present:
    keep_rule = uniform_subsets

  def build_stage(frozen, shapes: Shapes, seed: int):
    model = build(shapes, frozen, nnx.Rngs(seed + index))
    return model, {"shapes": dataclasses.asdict(shapes)}

  def restore(saved: dict, frozen):
    return build(Shapes.from_json(saved["shapes"]), frozen, nnx.Rngs(0))

  def optim(steps_per_epoch: int) -> steps.OptimConfig:
    return steps.plain_optim_config(
        optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay if weight_decay is None else weight_decay,
        nesterov=cfg.nesterov, betas=cfg.betas_pretrain, eps=cfg.eps, grad_clip=cfg.grad_clip,
        schedule=cfg.lr_schedule, steps_per_epoch=steps_per_epoch, epochs=epochs,
        warmup_epochs=cfg.warmup_epochs, lr_min=cfg.lr_min, step_epochs=cfg.lr_step_epochs,
        gamma=cfg.lr_gamma, cosine_extra=cfg.lr_cosine_extra)

  return Stage(name=name, model=name, reads=reads, epochs=int(epochs),
               batch_size=cfg.batch_size, build=build_stage, restore=restore, optim=optim,
               step=supervised_step(loss, keep_rule), sampler="shuffle")
