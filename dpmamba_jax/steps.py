"""The two jitted train steps (teacher, student), the optimiser and the LR schedule (spec §5, §6).

The model is split once (`nnx.split`) into a static graphdef and a pytree state; each step merges
it back inside `jax.jit`. The train state is a pytree (params, batch_stats, opt_state, step, rng)
that is donated to the step. The per-modality padded scene cubes live on the device and every
step gathers its batch's patches from flat pixel indices, so the host sends only (B,) indices
and (B,) labels per step (and to the student step the (B,) rows of those pixels in the frozen
teacher's features of the training set, computed and placed once per distillation by
`make_teacher_features`).

Data parallelism: with `mesh` (`sharding.data_parallel_mesh`) the steps are jitted with the
batch arguments sharded over the mesh and everything else replicated (sharding.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpmamba_jax import losses
from dpmamba_jax import masks as masks_lib
from dpmamba_jax.data.patches import gather_patches
from dpmamba_jax.sharding import batch_sharding, replicated_sharding, shard_batch


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule.


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Everything the optimiser of one stage needs (spec §6.1-6.2)."""
  lr: float                 # peak lr (3e-4)
  warmup_init: float        # w0, the lr of update 0
  lr_min: float             # cosine floor
  warmup_steps: int         # W = warmup_epochs * steps_per_epoch
  total_steps: int          # epochs * steps_per_epoch
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.05
  grad_clip: float = 1.0
  # The authors' loop steps its scheduler with the index of the update just done, so update s
  # runs at lr(s - 1) and updates 0 and 1 both at w0 (spec §7.1 item 13): `--protocol reference`.
  authors_off_by_one: bool = False
  # The comparison methods' optimisers (their public training scripts, docs/peers.md):
  # optimizer "adamw" (decoupled decay), "adam" or "sgd" (PyTorch's weight_decay: L2 added to
  # the gradient; momentum, nesterov); schedule "warmup_cosine" (above, per update), or per
  # epoch as PyTorch schedulers stepped once an epoch: "constant", "step" (lr x gamma every
  # step_epochs), "cosine" (linear warmup over warmup_epochs, then cosine annealing to lr_min
  # over cosine_epochs, PyTorch CosineAnnealingLR's T_max).
  optimizer: str = "adamw"
  schedule: str = "warmup_cosine"
  momentum: float = 0.0
  nesterov: bool = False
  steps_per_epoch: int = 1
  warmup_epochs: int = 0
  step_epochs: int = 0
  gamma: float = 1.0
  cosine_epochs: int = 0


OPTIMIZERS = ("adamw", "adam", "sgd")
EPOCH_SCHEDULES = ("constant", "step", "cosine")


def plain_optim_config(*, optimizer: str, lr: float, weight_decay: float, momentum: float,
                       nesterov: bool, betas: tuple[float, float], eps: float, grad_clip: float,
                       schedule: str, steps_per_epoch: int, epochs: int, warmup_epochs: int = 0,
                       lr_min: float = 0.0, step_epochs: int = 0, gamma: float = 1.0,
                       cosine_extra: int = 0) -> OptimConfig:
  """A comparison method's optimiser with a per-epoch schedule (EPOCH_SCHEDULES); grad_clip 0 =
  no clipping; the cosine runs over epochs + cosine_extra epochs (their T_max = epochs + 20)."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer {optimizer!r}: expected one of {OPTIMIZERS}")
  if schedule not in EPOCH_SCHEDULES:
    raise ValueError(f"schedule {schedule!r}: expected one of {EPOCH_SCHEDULES}")
  spe = int(steps_per_epoch)
  return OptimConfig(lr=float(lr), warmup_init=float(lr), lr_min=float(lr_min),
                     warmup_steps=int(warmup_epochs) * spe, total_steps=int(epochs) * spe,
                     b1=float(betas[0]), b2=float(betas[1]), eps=float(eps),
                     weight_decay=float(weight_decay), grad_clip=float(grad_clip),
                     optimizer=optimizer, schedule=schedule, momentum=float(momentum),
                     nesterov=bool(nesterov), steps_per_epoch=spe,
                     warmup_epochs=int(warmup_epochs), step_epochs=int(step_epochs),
                     gamma=float(gamma),
                     cosine_epochs=max(int(epochs) + int(cosine_extra), 1))


def stage_optim_config(stage: str, *, lr: float, batch_size: int, steps_per_epoch: int,
                       epochs: int, warmup_epochs: int, betas: tuple[float, float],
                       eps: float, weight_decay: float, grad_clip: float,
                       authors_off_by_one: bool = False) -> OptimConfig:
  """The §6.2 settings of a stage.

  Pretrain: w0 = 5e-7 * B / 512, lr_min = 5e-6 * B / 512 (the authors scale the TRAIN
  defaults by the batch); distill: w0 = 5e-7, lr_min = 5e-6 (unscaled).
  """
  if stage == "pretrain":
    w0, lr_min = 5e-7 * batch_size / 512, 5e-6 * batch_size / 512
  elif stage == "distill":
    w0, lr_min = 5e-7, 5e-6
  else:
    raise ValueError(f"stage must be 'pretrain' or 'distill', got {stage!r}")
  total = int(epochs) * int(steps_per_epoch)
  warm = min(int(warmup_epochs) * int(steps_per_epoch), total)
  return OptimConfig(lr=float(lr), warmup_init=w0, lr_min=lr_min, warmup_steps=warm,
                     total_steps=total, b1=float(betas[0]), b2=float(betas[1]), eps=float(eps),
                     weight_decay=float(weight_decay), grad_clip=float(grad_clip),
                     authors_off_by_one=bool(authors_off_by_one))


def _warmup_cosine_lr(t, lr_max, warmup_init, lr_min, warmup_steps, total_steps, xp):
  w = int(warmup_steps)
  t_cos = max(int(total_steps) - w, 1)
  warm = warmup_init + t * (lr_max - warmup_init) / max(w, 1)
  frac = xp.clip((t - w) / t_cos, 0.0, 1.0)
  cos = lr_min + 0.5 * (lr_max - lr_min) * (1.0 + xp.cos(xp.pi * frac))
  return xp.where(t < w, warm, cos)


def warmup_cosine(lr_max: float, warmup_init: float, lr_min: float, warmup_steps: int,
                  total_steps: int, *, authors_off_by_one: bool = False) -> optax.Schedule:
  """Per-update lr: linear w0 -> lr_max over W updates, then one cosine to lr_min (spec §6.2).

  lr(t) = w0 + t (lr_max - w0) / W for t < W; lr_min + (lr_max - lr_min)(1 + cos(pi (t-W)/T)) / 2
  for W <= t < W + T with T = total - W; lr_min afterwards. Update t (0-based) uses lr(t), the
  scheduler's intended convention; with authors_off_by_one, lr(max(t - 1, 0)), as the authors'
  loop runs it (updates 0 and 1 both at w0).
  """

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    if authors_off_by_one:
      t = jnp.maximum(t - 1.0, 0.0)
    return _warmup_cosine_lr(t, lr_max, warmup_init, lr_min, warmup_steps, total_steps, jnp)

  return schedule


def _step_lr(t, oc: OptimConfig, xp):
  """The per-epoch schedules (EPOCH_SCHEDULES) at update t: the lr of epoch t // steps."""
  epoch = xp.floor(t / oc.steps_per_epoch)
  if oc.schedule == "step" and oc.step_epochs > 0:
    return oc.lr * oc.gamma ** xp.floor(epoch / oc.step_epochs)
  if oc.schedule == "cosine":
    w = oc.warmup_epochs
    warm = oc.lr * (epoch + 1) / max(w, 1)
    frac = xp.clip((epoch - w) / oc.cosine_epochs, 0.0, 1.0)
    cos = oc.lr_min + 0.5 * (oc.lr - oc.lr_min) * (1.0 + xp.cos(xp.pi * frac))
    return xp.where(epoch < w, warm, cos)
  return oc.lr + 0.0 * t


def lr_at(t, oc: OptimConfig):
  """`make_optimizer(oc)`'s lr of updates t (numpy ints), in float64 numpy (for comparisons with
  the authors' schedule at double precision; training evaluates the same formula in float32)."""
  t = np.asarray(t, np.float64)
  if oc.schedule != "warmup_cosine":
    return _step_lr(t, oc, np)
  if oc.authors_off_by_one:
    t = np.maximum(t - 1.0, 0.0)
  return _warmup_cosine_lr(t, oc.lr, oc.warmup_init, oc.lr_min, oc.warmup_steps, oc.total_steps,
                           np)


def make_optimizer(oc: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW on ALL parameters (the authors decay everything, §7.1.6);
  a comparison method's Adam / SGD with its schedule (`plain_optim_config`)."""
  if oc.optimizer != "adamw" or oc.schedule != "warmup_cosine":
    return _plain_optimizer(oc)
  sched = warmup_cosine(oc.lr, oc.warmup_init, oc.lr_min, oc.warmup_steps, oc.total_steps,
                        authors_off_by_one=oc.authors_off_by_one)
  tx = optax.chain(
      *([optax.clip_by_global_norm(oc.grad_clip)] if oc.grad_clip > 0 else []),
      optax.adamw(sched, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay),
  )
  return tx, sched


def _plain_optimizer(oc: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  def sched(count):
    return _step_lr(jnp.asarray(count, jnp.float32), oc, jnp)

  parts = [optax.clip_by_global_norm(oc.grad_clip)] if oc.grad_clip > 0 else []
  if oc.optimizer == "adamw":
    parts.append(optax.adamw(sched, b1=oc.b1, b2=oc.b2, eps=oc.eps,
                             weight_decay=oc.weight_decay))
  else:  # PyTorch Adam / SGD weight_decay: L2 added to the gradient before the update
    if oc.weight_decay:
      parts.append(optax.add_decayed_weights(oc.weight_decay))
    parts.append(optax.adam(sched, b1=oc.b1, b2=oc.b2, eps=oc.eps) if oc.optimizer == "adam"
                 else optax.sgd(sched, momentum=oc.momentum or None, nesterov=oc.nesterov))
  return optax.chain(*parts), sched


# ----------------------------------------------------------------------------------------------
# Train state.


@flax.struct.dataclass
class TrainState:
  params: Any            # nnx.State of nnx.Param
  batch_stats: Any       # nnx.State of every other variable (BatchNorm running stats)
  opt_state: Any
  step: jax.Array        # () int32, number of updates done
  rng: jax.Array         # (2,) uint32 raw PRNG key


def copy_tree(tree):
  """A copy of every array of `tree` (so that donating one does not free the other)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def split_model(model: nnx.Module):
  """model -> (graphdef, params, rest); rest holds every non-Param variable."""
  return nnx.split(model, nnx.Param, ...)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                     rng: jax.Array) -> tuple[Any, TrainState]:
  """Splits the model once and builds the initial TrainState. Returns (graphdef, state)."""
  graphdef, params, rest = split_model(model)
  state = TrainState(params=params, batch_stats=rest, opt_state=tx.init(params),
                     step=jnp.zeros((), jnp.int32), rng=jnp.asarray(rng, jnp.uint32))
  return graphdef, state


def gather_batch(cubes: Sequence[jax.Array], idx: jax.Array, width: int,
                 patch_size: int) -> list[jax.Array]:
  """Per-modality (B, P, P, C_m) patches around flat pixel indices `idx` (B,)."""
  return [gather_patches(c, idx, width, patch_size) for c in cubes]


def _fresh(tree):
  """New Variable objects at the current trace level, so the model may update them in place."""
  return jax.tree.map(lambda x: x, tree)


def _accuracy(v, labels, z):
  return jnp.mean((losses.predict(v, z) == labels).astype(jnp.float32))


def teacher_grads(graphdef, params, batch_stats, xs: Sequence[jax.Array], labels: jax.Array,
                  z: jax.Array, dropout_key: jax.Array | None):
  """Gradient of the teacher loss L_CA in train mode, on complete inputs (spec §5.1).

  xs: M arrays (B, P, P, C_m); labels: (B,) 0-based, class-sorted; z: (C, D) text features.
  Returns (grads, (loss, loss parts, new running stats, V (B, D))), grads shaped like params.
  """
  def loss_fn(params):
    model = nnx.merge(graphdef, params, _fresh(batch_stats))
    v = model(xs, None, train=True, dropout_key=dropout_key)  # (B, D)
    loss, parts = losses.teacher_loss(v, labels, z)
    _, _, new_rest = split_model(model)
    return loss, (loss, parts, new_rest, v)

  return jax.grad(loss_fn, has_aux=True)(params)


def student_grads(graphdef, params, batch_stats, xs: Sequence[jax.Array], mask: jax.Array,
                  v_teacher: jax.Array, labels: jax.Array, z: jax.Array,
                  dropout_key: jax.Array | None, *, distill: str = "tbd",
                  bn_stats: str = "present"):
  """Gradient of the student loss L_CA + L_TBD (or the KL ablation) in train mode (spec §5.2).

  mask: (B, M), 1 = present (missing modalities get the student's prompts); v_teacher: (B, D)
  the frozen teacher's features of the batch; bn_stats: "present" (masked samples' real input is
  left out of the embedding BatchNorm's batch statistics) or "all" (the authors', spec §7.1
  item 12). Returns (grads, (loss, loss parts, new running stats, V_s (B, D))).
  """
  def loss_fn(params):
    model = nnx.merge(graphdef, params, _fresh(batch_stats))
    v_s = model(xs, mask, train=True, dropout_key=dropout_key, bn_stats=bn_stats)  # (B, D)
    loss, parts = losses.student_loss(v_s, v_teacher, labels, z, distill=distill)
    _, _, new_rest = split_model(model)
    return loss, (loss, parts, new_rest, v_s)

  return jax.grad(loss_fn, has_aux=True)(params)


def apply_gradients(state: TrainState, tx, schedule, grads, aux, labels, z, rng):
  """The optimiser update of both steps: (new state, metrics). aux = (loss, loss parts, new
  running stats, V), as `teacher_grads` / `student_grads` return it."""
  loss, parts, new_rest, v = aux
  return _update(state, tx, schedule, grads, loss, parts, new_rest, _accuracy(v, labels, z), rng)


def _update(state: TrainState, tx, schedule, grads, loss, parts, new_rest, train_oa, rng):
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(parts)
  metrics.update(loss=loss, train_oa=train_oa, lr=schedule(state.step),
                 grad_norm=optax.global_norm(grads))
  new_state = state.replace(params=params, batch_stats=new_rest, opt_state=opt_state,
                            step=state.step + 1, rng=rng)
  return new_state, metrics


# ----------------------------------------------------------------------------------------------
# Steps.


def make_teacher_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                      width: int, patch_size: int, mesh: jax.sharding.Mesh | None = None
                      ) -> Callable:
  """Jitted pretraining step.

  step(state, cubes, z, idx, labels) -> (state, metrics)
    cubes: per-modality padded scene cubes (H+2r, W+2r, C_m); z: (C, D) text features;
    idx: (B,) int32 flat pixel indices; labels: (B,) int32 0-based, class-sorted batch.
  The state argument is donated. With `mesh`, idx and labels are sharded over its "data" axis
  and the other arguments must be replicated on it (`replicate`, `shard_batch`).
  """
  def step(state: TrainState, cubes, z, idx, labels):
    rng, drop_key = jax.random.split(state.rng)
    xs = gather_batch(cubes, idx, width, patch_size)
    grads, aux = teacher_grads(graphdef, state.params, state.batch_stats, xs, labels, z, drop_key)
    return apply_gradients(state, tx, schedule, grads, aux, labels, z, rng)

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  rep, dat = replicated_sharding(mesh), batch_sharding(mesh)
  return jax.jit(step, donate_argnums=0, in_shardings=(rep, rep, rep, dat, dat),
                 out_shardings=(rep, rep))


def make_teacher_features(teacher_graphdef, *, width: int, patch_size: int, batch_size: int,
                          mesh: jax.sharding.Mesh | None = None) -> "TeacherFeatures":
  """The frozen teacher's features of given pixels, computed once before distillation.

  features(teacher, cubes, idx) -> (N, D) float32 numpy
    teacher: (params, rest) of the teacher, run in eval mode on the complete inputs; cubes: the
    per-modality padded scene cubes; idx: (N,) flat pixel indices (the training pixels).
  The batches are `batch_size` pixels (the last one padded with repeats of its last pixel), so
  the program is the student step's batch shape. In eval mode every sample's features are its
  own (running BatchNorm statistics, no dropout), so row i equals what the teacher gives pixel
  idx[i] inside any batch, up to float rounding: the student step gathers its batch's rows
  instead of running the teacher forward on every step. With `mesh` the batches are sharded
  over its "data" axis and the teacher and cubes must be replicated on it.
  """
  def forward(teacher, cubes, idx):
    model = nnx.merge(teacher_graphdef, *teacher)
    return model(gather_batch(cubes, idx, width, patch_size), None, train=False)  # (b, D)

  if mesh is None:
    return TeacherFeatures(jax.jit(forward), batch_size, jnp.asarray)
  rep, dat = replicated_sharding(mesh), batch_sharding(mesh)
  return TeacherFeatures(jax.jit(forward, in_shardings=(rep, rep, dat), out_shardings=rep),
                         batch_size, lambda a: shard_batch(a, mesh))


@dataclasses.dataclass(frozen=True)
class TeacherFeatures:
  """`make_teacher_features`' callable: features(teacher, cubes, idx) -> (N, D) float32 numpy.

  program: the jitted forward of one batch; place: puts a (batch,) index array on its devices.
  """
  program: Callable
  batch_size: int
  place: Callable

  def __call__(self, teacher, cubes, idx) -> np.ndarray:
    idx = np.asarray(idx, np.int32).reshape(-1)
    if idx.size == 0:
      raise ValueError("teacher features: no pixel indices given")
    b = self.batch_size
    padded = np.concatenate([idx, np.repeat(idx[-1:], -idx.size % b)])
    out = [self.program(teacher, cubes, self.place(padded[i:i + b]))
           for i in range(0, padded.size, b)]
    return np.concatenate(jax.device_get(out))[:idx.size].astype(np.float32)


def make_student_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                      width: int, patch_size: int, num_modalities: int, batch_size: int,
                      distill: str = "tbd", bn_stats: str = "present",
                      mesh: jax.sharding.Mesh | None = None) -> Callable:
  """Jitted distillation step (`student_grads`: distill and bn_stats as there).

  step(state, teacher_feats, cubes, z, rows, idx, labels) -> (state, metrics)
    teacher_feats: (N, D) the frozen teacher's eval-mode features of the training pixels, from
    `make_teacher_features` (computed once per stage and left on the device: the teacher never
    changes and sees complete inputs); rows: (B,) int32 the batch's rows in it (idx = the
    training pixels at rows). The student runs in train mode with masks from `sample_masks`
    (every non-empty subset, tiled and shuffled). All student params (backbone, head, prompts)
    are updated. The state argument is donated. With `mesh`, rows, idx and labels are sharded
    over its "data" axis and the rest replicated (teacher_feats included).
  """
  def step(state: TrainState, teacher_feats, cubes, z, rows, idx, labels):
    rng, drop_key, mask_key = jax.random.split(state.rng, 3)
    xs = gather_batch(cubes, idx, width, patch_size)
    v_t = jax.lax.stop_gradient(jnp.take(teacher_feats, rows, axis=0))  # (B, D)
    mask = masks_lib.sample_masks(mask_key, batch_size, num_modalities)  # (B, M)
    grads, aux = student_grads(graphdef, state.params, state.batch_stats, xs, mask, v_t, labels,
                               z, drop_key, distill=distill, bn_stats=bn_stats)
    return apply_gradients(state, tx, schedule, grads, aux, labels, z, rng)

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  rep, dat = replicated_sharding(mesh), batch_sharding(mesh)
  return jax.jit(step, donate_argnums=0, in_shardings=(rep, rep, rep, rep, dat, dat, dat),
                 out_shardings=(rep, rep))


def supervised_grads(graphdef, params, batch_stats, loss_fn: Callable, frozen: dict,
                     xs: Sequence[jax.Array], keep: jax.Array, labels: jax.Array,
                     rng: jax.Array):
  """Gradient of a comparison method's stage loss (method.LossFn) in train mode.

  frozen: earlier stages' models (eval mode); keep: (B, M) 1 = present. Returns
  (grads, (loss, loss parts, new running stats, logits (B, C))).
  """
  def f(params):
    model = nnx.merge(graphdef, params, _fresh(batch_stats))
    loss, parts, logits = loss_fn(model, frozen, xs, keep, labels, rng)
    _, _, new_rest = split_model(model)
    return loss, (loss, parts, new_rest, logits)

  return jax.grad(f, has_aux=True)(params)


def make_supervised_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                         loss_fn: Callable, keep_rule: Callable, *, frozen_graphdefs: dict,
                         width: int, patch_size: int, num_modalities: int, batch_size: int,
                         mesh: jax.sharding.Mesh | None = None) -> Callable:
  """Jitted step of a stage with a plain loss (a comparison method's stages).

  step(state, frozen, cubes, idx, labels) -> (state, metrics)
    frozen: {name: (params, rest)} of the earlier stages' models (graphdefs in
    `frozen_graphdefs`); cubes: the padded scene cubes; idx: (B,) int32 flat pixel indices;
    labels: (B,) int32 0-based. keep_rule(rng, B, M) draws the batch's (B, M) keep masks.
  The state argument is donated. With `mesh`, idx and labels are sharded over its "data" axis
  and the rest replicated.
  """
  def step(state: TrainState, frozen, cubes, idx, labels):
    rng, loss_key, keep_key = jax.random.split(state.rng, 3)
    xs = gather_batch(cubes, idx, width, patch_size)
    keep = keep_rule(keep_key, batch_size, num_modalities)  # (B, M)
    models = {k: nnx.merge(frozen_graphdefs[k], *frozen[k]) for k in frozen_graphdefs}
    grads, (loss, parts, new_rest, logits) = supervised_grads(
        graphdef, state.params, state.batch_stats, loss_fn, models, xs, keep, labels, loss_key)
    train_oa = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return _update(state, tx, schedule, grads, loss, parts, new_rest, train_oa, rng)

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  rep, dat = replicated_sharding(mesh), batch_sharding(mesh)
  return jax.jit(step, donate_argnums=0, in_shardings=(rep, rep, rep, dat, dat),
                 out_shardings=(rep, rep))
