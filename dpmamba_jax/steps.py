"""The jitted train steps (teacher, student), the optimiser and the LR schedule (spec §5, §6).

The model is split once (`nnx.split`) into a static graphdef and a pytree state; each step merges
it back inside `jax.jit`. The train state is a pytree (params, batch_stats, opt_state, step, rng)
that is donated to the step. The per-modality padded scene cubes live on the device and every
step gathers its batch's patches from flat pixel indices, so the host sends only (B,) indices
and (B,) labels per step (and to the student step the (B,) rows of those pixels in the frozen
teacher's features of the training set, computed and placed once per distillation by
`make_teacher_features`).

Data parallelism: with `mesh` (a 1-D `("data",)` mesh from `data_parallel_mesh`) the steps are
jitted with the batch arguments sharded over the mesh and everything else (parameters, optimiser
state, scene cubes, text features) replicated. It is still one jit per step and the same global
computation: BatchNorm statistics and the class-grouped losses reduce over the whole global batch
(XLA inserts the collectives), so a sharded step equals the single-device step up to float
summation order.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpmamba_jax import masks as masks_lib


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


def stage_optim_config(stage: str, *, lr: float, batch_size: int, steps_per_epoch: int,
                       epochs: int, warmup_epochs: int, betas: tuple[float, float],
                       eps: float, weight_decay: float, grad_clip: float) -> OptimConfig:
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
                     weight_decay=float(weight_decay), grad_clip=float(grad_clip))


def warmup_cosine(lr_max: float, warmup_init: float, lr_min: float, warmup_steps: int,
                  total_steps: int) -> optax.Schedule:
  """Per-update lr: linear w0 -> lr_max over W updates, then one cosine to lr_min (spec §6.2).

  lr(t) = w0 + t (lr_max - w0) / W for t < W; lr_min + (lr_max - lr_min)(1 + cos(pi (t-W)/T)) / 2
  for W <= t < W + T with T = total - W; lr_min afterwards. Update t (0-based) uses lr(t): the
  authors' off-by-one (updates 0 and 1 both at w0) is not copied.
  """
  w = int(warmup_steps)
  t_cos = max(int(total_steps) - w, 1)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    warm = warmup_init + t * (lr_max - warmup_init) / max(w, 1)
    frac = jnp.clip((t - w) / t_cos, 0.0, 1.0)
    cos = lr_min + 0.5 * (lr_max - lr_min) * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(t < w, warm, cos)

  return schedule


def make_optimizer(oc: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW on ALL parameters (the authors decay everything, §7.1.6)."""
  sched = warmup_cosine(oc.lr, oc.warmup_init, oc.lr_min, oc.warmup_steps, oc.total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(oc.grad_clip),
      optax.adamw(sched, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay),
  )
  return tx, sched


# ----------------------------------------------------------------------------------------------
# Train state.


@flax.struct.dataclass
class TrainState:
  params: Any            # nnx.State of nnx.Param
  batch_stats: Any       # nnx.State of every other variable (BatchNorm running stats)
  opt_state: Any
  step: jax.Array        # () int32, number of updates done
  rng: jax.Array         # (2,) uint32 raw PRNG key


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
  from dpmamba_jax import data  # late import: keeps masks/optimiser importable on their own
  return [data.gather_patches(c, idx, width, patch_size) for c in cubes]


def _fresh(tree):
  """New Variable objects at the current trace level, so the model may update them in place."""
  return jax.tree.map(lambda x: x, tree)


def _accuracy(v, labels, z):
  from dpmamba_jax import losses
  return jnp.mean((losses.predict(v, z) == labels).astype(jnp.float32))


def _apply_gradients(state: TrainState, tx, schedule, grads, aux, labels, z, rng):
  """Optimiser update shared by both steps. aux = (loss, loss parts, new running stats, V)."""
  loss, parts, new_rest, v = aux
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(parts)
  metrics.update(loss=loss, train_oa=_accuracy(v, labels, z), lr=schedule(state.step),
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
  from dpmamba_jax import losses

  def step(state: TrainState, cubes, z, idx, labels):
    rng, drop_key = jax.random.split(state.rng)
    xs = gather_batch(cubes, idx, width, patch_size)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, _fresh(state.batch_stats))
      v = model(xs, None, train=True, dropout_key=drop_key)  # (B, D)
      loss, parts = losses.teacher_loss(v, labels, z)
      _, _, new_rest = split_model(model)
      return loss, (loss, parts, new_rest, v)

    grads, aux = jax.grad(loss_fn, has_aux=True)(state.params)
    return _apply_gradients(state, tx, schedule, grads, aux, labels, z, rng)

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  rep, dat = replicated_sharding(mesh), batch_sharding(mesh)
  return jax.jit(step, donate_argnums=0, in_shardings=(rep, rep, rep, dat, dat),
                 out_shardings=(rep, rep))


def make_teacher_features(teacher_graphdef, *, width: int, patch_size: int, batch_size: int,
                          mesh: jax.sharding.Mesh | None = None) -> Callable:
  """The frozen teacher's features of given pixels, computed once before distillation.

  features(teacher, cubes, idx) -> (N, D) float32 numpy
    teacher: (params, rest) of the teacher, run in eval mode on the complete inputs; cubes: the
    per-modality padded scene cubes; idx: (N,) flat pixel indices (the training pixels).
  The batches are `batch_size` pixels (the last one padded with repeats of its last pixel), so
  the program is the student step's batch shape. In eval mode every sample's features are its
  own (running BatchNorm statistics, no dropout), so row i equals what the teacher gives pixel
  idx[i] inside any batch, up to float rounding: the student step gathers its batch's rows
  instead of running the teacher forward on every step (on a 2-core CPU that forward is ~17 %
  of an Augsburg or Houston student step). With `mesh` the batches are sharded over its "data"
  axis and the teacher and cubes must be replicated on it.
  """
  def forward(teacher, cubes, idx):
    model = nnx.merge(teacher_graphdef, *teacher)
    return model(gather_batch(cubes, idx, width, patch_size), None, train=False)  # (b, D)

  if mesh is None:
    jitted, place = jax.jit(forward), jnp.asarray
  else:
    rep, dat = replicated_sharding(mesh), batch_sharding(mesh)
    jitted = jax.jit(forward, in_shardings=(rep, rep, dat), out_shardings=rep)
    place = lambda a: shard_batch(a, mesh)

  def features(teacher, cubes, idx) -> np.ndarray:
    idx = np.asarray(idx, np.int32).reshape(-1)
    if idx.size == 0:
      raise ValueError("teacher features: no pixel indices given")
    padded = np.concatenate([idx, np.repeat(idx[-1:], -idx.size % batch_size)])
    out = [jitted(teacher, cubes, place(padded[i:i + batch_size]))
           for i in range(0, padded.size, batch_size)]
    return np.concatenate(jax.device_get(out))[:idx.size].astype(np.float32)

  features.jitted = jitted
  return features


def make_student_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                      width: int, patch_size: int, num_modalities: int, batch_size: int,
                      distill: str = "tbd", mesh: jax.sharding.Mesh | None = None) -> Callable:
  """Jitted distillation step.

  step(state, teacher_feats, cubes, z, rows, idx, labels) -> (state, metrics)
    teacher_feats: (N, D) the frozen teacher's eval-mode features of the training pixels, from
    `make_teacher_features` (computed once per stage and left on the device: the teacher never
    changes and sees complete inputs); rows: (B,) int32 the batch's rows in it (idx = the
    training pixels at rows). The student runs in train mode with masks from `sample_masks`
    (every non-empty subset, tiled and shuffled). All student params (backbone, head, prompts)
    are updated. The state argument is donated. With `mesh`, rows, idx and labels are sharded
    over its "data" axis and the rest replicated (teacher_feats included).
  """
  from dpmamba_jax import losses

  def step(state: TrainState, teacher_feats, cubes, z, rows, idx, labels):
    rng, drop_key, mask_key = jax.random.split(state.rng, 3)
    xs = gather_batch(cubes, idx, width, patch_size)
    v_t = jax.lax.stop_gradient(jnp.take(teacher_feats, rows, axis=0))  # (B, D)
    mask = masks_lib.sample_masks(mask_key, batch_size, num_modalities)  # (B, M)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, _fresh(state.batch_stats))
      v_s = model(xs, mask, train=True, dropout_key=drop_key)  # (B, D)
      loss, parts = losses.student_loss(v_s, v_t, labels, z, distill=distill)
      _, _, new_rest = split_model(model)
      return loss, (loss, parts, new_rest, v_s)

    grads, aux = jax.grad(loss_fn, has_aux=True)(state.params)
    return _apply_gradients(state, tx, schedule, grads, aux, labels, z, rng)

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  rep, dat = replicated_sharding(mesh), batch_sharding(mesh)
  return jax.jit(step, donate_argnums=0, in_shardings=(rep, rep, rep, rep, dat, dat, dat),
                 out_shardings=(rep, rep))


# Backends where the predict step runs the embedding conv of a wide modality once over the whole
# scene (`prepare`) and each batch gathers its patches of that conv, corrected on the patch border
# (`Conv3x3.patch_conv_from_scene`): on a 2-core CPU the Trento HSI conv is ~1/6 of an inference
# pass, and the whole scene's conv costs about one batch's. On a GPU that conv is one matmul.
SCENE_CONV_BACKENDS = ("cpu",)
# ... for modalities with at least this many bands (a 1-band LiDAR patch conv costs less than
# gathering its (P, P, hidden) output).
SCENE_CONV_MIN_BANDS = 8
# Rows of the scene per conv call (bounds the conv's temporary memory on large scenes).
SCENE_CONV_TILE_ROWS = 32
# On a CPU (one device, no mesh) a predict batch runs as up to this many concurrent calls of
# equal sub-batches of at least CPU_PREDICT_MIN_SUB_BATCH patches. XLA:CPU runs the selective
# scan's loop (a third of a pass) on one core and one program's ops one after another; several
# calls in flight keep both cores busy (Trento, 2 cores, batch 512: ~1,000 -> ~1,400
# patches/s; README "Speed").
CPU_PREDICT_CALLS = 16
CPU_PREDICT_MIN_SUB_BATCH = 32


def _scene_conv_applies(bands: int) -> bool:
  return jax.default_backend() in SCENE_CONV_BACKENDS and bands >= SCENE_CONV_MIN_BANDS


def predict_calls(batch: int, max_calls: int, min_sub_batch: int | None = None) -> int:
  """How many equal sub-batches a predict batch runs as: the largest divisor of `batch` that is
  at most `max_calls` and leaves at least `min_sub_batch` (None: CPU_PREDICT_MIN_SUB_BATCH)
  patches per call (1 = one call)."""
  min_sub_batch = CPU_PREDICT_MIN_SUB_BATCH if min_sub_batch is None else min_sub_batch
  most = min(max_calls, batch // max(min_sub_batch, 1))
  return max([d for d in range(1, most + 1) if batch % d == 0], default=1)


def make_predict_step(graphdef, *, width: int, patch_size: int,
                      mesh: jax.sharding.Mesh | None = None,
                      max_calls: int | None = None) -> Callable:
  """Jitted eval-mode inference on a fixed-size batch.

  predict(params, rest, scene, z, idx, mask) -> (b,) int32 class ids
    scene: the per-modality padded cubes, or (faster, for many batches of one model)
    ``predict.prepare(params, rest, cubes)``, where a wide modality's embedding conv has run
    once over the whole cube (SCENE_CONV_BACKENDS, SCENE_CONV_MIN_BANDS; prepare passes a
    prepared scene through); both give the same predictions up to float rounding. idx: (b,) flat pixel indices; mask: (b, M) float32
    (all ones = complete). Missing modalities get zero-filled raw input (no effect in eval
    mode; the model puts the prompt, or zeros for the teacher, in their feature slot). The mask
    is an input, not a static, so there is one compile per batch shape for all scenarios.
  With `mesh`, the returned function (attribute `.mesh`) shards idx and mask over the "data"
  axis itself (b must be a multiple of the mesh size); params, rest, cubes and z should be
  placed once with `replicate`. The predictions come back replicated (readable on every host).
  Without a mesh, a batch runs as `predict_calls(b, max_calls)` concurrent calls of the jitted
  step on equal sub-batches (host threads; each sub-batch shape compiles once) and the
  predictions are concatenated; max_calls None = CPU_PREDICT_CALLS on a CPU, 1 (one call)
  elsewhere. Every sample's computation is its own in eval mode, so the split changes no
  prediction beyond float rounding. `.jitted` is the jitted step (for `.lower` and the cache).
  """
  from dpmamba_jax import data, losses

  def scene_conv(params, rest, cube, m):
    conv = nnx.merge(graphdef, params, rest).embed[m].conv
    # one zero pixel around the cube: the conv's padding, and the outer pixel of the rings
    padded = jnp.pad(cube, ((1, 1), (1, 1), (0, 0)))
    rows, tile = cube.shape[0], min(SCENE_CONV_TILE_ROWS, cube.shape[0])

    def conv_tile(t, out):  # row tiles into the output in place: no scene-sized temporaries
      start = jnp.minimum(t * tile, rows - tile)  # the last tile overlaps the one before
      x = jax.lax.dynamic_slice_in_dim(padded, start, tile + 2, axis=0)
      return jax.lax.dynamic_update_slice_in_dim(out, conv.conv_valid(x[None])[0], start, 0)

    out = jnp.zeros(cube.shape[:2] + (conv.kernel.shape[-1],), cube.dtype)  # (H', W', hidden)
    return {"conv": jax.lax.fori_loop(0, -(-rows // tile), conv_tile, out), "ring": padded}

  def prepare(params, rest, cubes):  # entries prepared already (dicts) pass through
    return [jitted_scene_conv(params, rest, c, m)
            if not isinstance(c, dict) and _scene_conv_applies(c.shape[-1]) else c
            for m, c in enumerate(cubes)]

  def predict(params, rest, scene, z, idx, mask):
    model = nnx.merge(graphdef, params, rest)
    xs, convs = [], []
    for m, entry in enumerate(scene):
      if isinstance(entry, dict):
        ring = data.gather_patch_rings(entry["ring"], idx, width, patch_size)
        conv_patches = data.gather_patches(entry["conv"], idx, width, patch_size)
        xs.append(None)
        convs.append(model.embed[m].conv.patch_conv_from_scene(conv_patches, ring))
      else:
        x = data.gather_patches(entry, idx, width, patch_size)
        xs.append(x * mask[:, m, None, None, None].astype(x.dtype))
        convs.append(None)
    v = model(xs, mask, train=False, embed_conv=convs)
    return losses.predict(v, z)

  if mesh is None:
    jitted_scene_conv = jax.jit(scene_conv, static_argnums=3)
    jitted = jax.jit(predict)
    if max_calls is None:
      max_calls = CPU_PREDICT_CALLS if jax.default_backend() == "cpu" else 1
    pool = ThreadPoolExecutor(max_workers=max_calls, thread_name_prefix="predict") \
        if max_calls > 1 else None

    def concurrent_predict(params, rest, scene, z, idx, mask):
      n = predict_calls(idx.shape[0], max_calls) if pool is not None else 1
      if n == 1:
        return jitted(params, rest, scene, z, idx, mask)
      size = idx.shape[0] // n
      idx, mask = np.asarray(idx), np.asarray(mask)  # host slices: no device op per slice
      parts = [(idx[i * size:(i + 1) * size], mask[i * size:(i + 1) * size]) for i in range(n)]

      def run(part):  # blocks in its own thread, so that the calls overlap
        return jax.block_until_ready(jitted(params, rest, scene, z, *part))

      # a new sub-batch shape compiles once: jit's cache makes the other threads wait for it
      return jnp.concatenate(list(pool.map(run, parts)))

    concurrent_predict.jitted = jitted
    concurrent_predict.prepare = prepare
    concurrent_predict.mesh = None
    concurrent_predict.max_calls = max_calls
    return concurrent_predict
  rep, dat = replicated_sharding(mesh), batch_sharding(mesh)
  jitted_scene_conv = jax.jit(scene_conv, static_argnums=3, in_shardings=(rep, rep, rep),
                              out_shardings=rep)
  jitted = jax.jit(predict, in_shardings=(rep, rep, rep, rep, dat, dat), out_shardings=rep)

  def sharded_predict(params, rest, scene, z, idx, mask):
    return jitted(params, rest, scene, z, shard_batch(idx, mesh), shard_batch(mask, mesh))

  sharded_predict.mesh = mesh
  sharded_predict.jitted = jitted
  sharded_predict.max_calls = 1  # one sharded call per batch
  sharded_predict.prepare = prepare
  return sharded_predict


# ----------------------------------------------------------------------------------------------
# Data parallelism over a 1-D "data" mesh.

DATA_AXIS = "data"


def data_parallel_mesh(batch_size: int, *, enabled: bool = True, what: str = "batch",
                       log: Callable[[str], None] | None = print) -> jax.sharding.Mesh | None:
  """The `("data",)` mesh over every device (all hosts') when data parallelism applies.

  None (one device) when there is a single device, when `enabled` is False, or when
  `batch_size` is not a multiple of jax.device_count() (then `log` says why).
  """
  n = jax.device_count()
  if n <= 1:
    return None
  if not enabled:
    if log:
      log(f"data parallel: off (data_parallel=false); using 1 of {n} devices for the {what}")
    return None
  if batch_size % n:
    if log:
      log(f"data parallel: {what} {batch_size} is not a multiple of the {n} devices; running "
          f"on one device (make it a multiple of {n}, or --set data_parallel=false)")
    return None
  if log:
    log(f"data parallel: {what} {batch_size} sharded over {n} devices "
        f"({batch_size // n} per device), parameters replicated")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the "data" axis, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def _put(x, sharding: NamedSharding):
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  # Several hosts: every process holds the same global value (same seed, same sampler), and
  # builds its addressable shards from it.
  a = np.asarray(x)
  return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])


def replicate(tree, mesh: jax.sharding.Mesh):
  """Every array leaf of `tree` replicated on every device of `mesh` (no copy if already)."""
  s = replicated_sharding(mesh)
  return jax.tree.map(lambda x: _put(x, s), tree)


def shard_batch(x, mesh: jax.sharding.Mesh) -> jax.Array:
  """(B, ...) array split along B over the mesh's "data" axis (B divisible by its size)."""
  return _put(x, batch_sharding(mesh))
