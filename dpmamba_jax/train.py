"""The main job: `python -m dpmamba_jax.train [--dataset NAME] ...`.

Stage 1 (pretrain) trains the teacher on complete inputs with L_CA and writes <workdir>/teacher/.
Stage 2 (distill) restores it as the frozen teacher, initialises the student from it (new N(0,1)
prompts) and trains the whole student with L_CA + L_TBD on randomly masked inputs; it writes
<workdir>/student/. Then the last-epoch models are evaluated over every modality scenario
(metrics.json, metrics.md) and the classification maps are drawn (maps/).

Rerunning the same command in the same workdir resumes from the last periodic checkpoint
(<workdir>/ckpt/<stage>/) and finishes with the same metrics as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from dpmamba_jax import config as config_lib
from dpmamba_jax import errors

# Keys that do not change the numbers; a rerun may change them without a new workdir.
_FREE_KEYS = ("stage", "log_every", "ckpt_every", "eval_batch", "maps", "compile_cache",
              "data_parallel",
              "workdir", "data_dir", "teacher_ckpt")


def compile_cache_dir() -> str:
  """$DPMAMBA_XLA_CACHE_DIR, else $DPMAMBA_CACHE_DIR/xla, else ~/.cache/dpmamba_jax/xla."""
  d = os.environ.get("DPMAMBA_XLA_CACHE_DIR")
  if not d:
    root = os.environ.get("DPMAMBA_CACHE_DIR") or os.path.join("~", ".cache", "dpmamba_jax")
    d = os.path.join(root, "xla")
  return os.path.abspath(os.path.expanduser(d))


# XLA:CPU's YNNPACK reduce fusions are several times slower than XLA's own reductions for this
# model (teacher step 1.9 s -> 1.3 s on a 2-core CPU; tools/bench.py measures both).
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def accelerator_plugin() -> str | None:
  """The installed JAX accelerator plugin (e.g. 'xla_cuda13') that JAX will use, else None.

  Looked up without starting a backend (XLA reads $XLA_FLAGS once, when the first backend
  starts). None when $JAX_PLATFORMS puts cpu first.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms.split(",")[0].strip() == "cpu":
    return None
  try:
    import jax_plugins  # namespace package of the CUDA / ROCm / TPU plugin wheels
  except ImportError:
    return None
  import pkgutil
  names = sorted(m.name for m in pkgutil.iter_modules(jax_plugins.__path__))
  return names[0] if names else None


def cpu_xla_flags() -> str:
  """CPU_XLA_FLAGS where the CPU is the backend, "" where an accelerator plugin is installed
  (the flag means nothing there, and an XLA that no longer knows it refuses to start)."""
  return "" if accelerator_plugin() else CPU_XLA_FLAGS


def setup_cpu_flags() -> None:
  """Host-side settings for the CLIs; call before any jax work.

  Adds `cpu_xla_flags()` to $XLA_FLAGS unless the user set that flag, and returns the
  compiler's freed memory to the OS after every XLA compile (`release_memory_after_compiles`).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  extra = cpu_xla_flags()
  if extra and "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
  release_memory_after_compiles()


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """Joins a multi-controller run (`jax.distributed.initialize`); call before any JAX work.

  With no arguments JAX finds the coordinator in the environment (Slurm, Open MPI, TPU pods);
  otherwise all three are needed. On CPU-only hosts the cross-process collectives go through
  gloo (XLA:CPU has no other built-in implementation).
  """
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise errors.UserError("--coordinator, --num-processes and --process-id: give all three "
                           "or none (none: found in the environment, e.g. Slurm)")
  if all(given) and not 0 <= process_id < num_processes:
    raise errors.UserError(f"--process-id {process_id}: expected 0 <= id < --num-processes "
                           f"{num_processes}")
  import jax
  if accelerator_plugin() is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)


def primary_process() -> bool:
  """True on process 0 of a multi-controller run (and in a single-process run): the one that
  prints and appends to log.jsonl. The other processes run the same computation silently."""
  import jax
  return jax.process_index() == 0


# glibc serves every allocation over 32 MB with a fresh mmap and unmaps it when it is freed, so
# XLA:CPU's temporary buffer of each call (~340 MB for a Trento predict batch of 512) is faulted
# in again, 4 KB at a time, on every call: ~90,000 page faults and ~0.2 s of kernel time per
# call. With this tunable glibc asks for transparent huge pages on those mappings (512x fewer
# faults): the Trento steps and inference ~15-25 % faster on 2 cores, peak RSS unchanged
# (README "CPU speed"). glibc reads $GLIBC_TUNABLES only when a process starts.
HUGEPAGE_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def hugepage_malloc_env(environ: dict | None = None) -> dict | None:
  """`environ` (default os.environ) plus HUGEPAGE_MALLOC_TUNABLE in $GLIBC_TUNABLES.

  None where it does not apply: not glibc >= 2.35 (the tunable's first release), transparent
  huge pages set to "never", an accelerator plugin installed (host memory is not the step's
  memory there), the tunable already set, or $DPMAMBA_HUGEPAGE_MALLOC=0.
  """
  import platform
  env = dict(os.environ if environ is None else environ)
  tunables = env.get("GLIBC_TUNABLES", "")
  if env.get("DPMAMBA_HUGEPAGE_MALLOC", "1") == "0" or "glibc.malloc.hugetlb" in tunables:
    return None
  libc, version = platform.libc_ver()
  try:
    if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
      return None
    with open(_THP_ENABLED) as f:
      if "[never]" in f.read():
        return None
  except (OSError, ValueError):
    return None
  if accelerator_plugin():
    return None
  env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGEPAGE_MALLOC_TUNABLE) if t)
  return env


def reexec_with_hugepage_malloc() -> None:
  """For a CLI's `__main__`, before any work: restart the same command line once with
  `hugepage_malloc_env()` (same process id; the restarted process finds the tunable set and
  goes on). Does nothing where that env does not apply or the command cannot be replayed."""
  env = hugepage_malloc_env()
  argv = list(getattr(sys, "orig_argv", []))
  if env is None or len(argv) < 2 or argv[1] == "-":
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
  except OSError:
    return


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# libc.malloc_trim once the listener is installed (looked up per event, so tests can swap it)
_malloc_trim = None


def release_memory_after_compiles() -> bool:
  """After each XLA compile, glibc's malloc_trim(0) hands the compiler's freed heap back.

  Compiling a train step leaves ~300-600 MB of freed-but-held heap in the process; without the
  trim the step's own buffers come on top of it (Trento teacher step: peak RSS 1.7 GB -> 1.3 GB).
  Runs once per compile (a few ms). No-op (False) where libc has no malloc_trim.
  """
  global _malloc_trim
  if _malloc_trim is not None:  # installed already
    return True
  import ctypes
  import ctypes.util
  try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return False
  import jax.monitoring

  def on_event(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT and _malloc_trim is not None:
      _malloc_trim(0)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  return True


def setup_compile_cache(enabled: bool = True) -> str | None:
  """Turns on JAX's persistent compilation cache (compiled steps are reused across runs)."""
  if not enabled:
    return None
  import jax
  d = compile_cache_dir()
  try:
    os.makedirs(d, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return d


# ----------------------------------------------------------------------------------------------
# Data of one run.


@dataclasses.dataclass
class RunData:
  """What the steps, the evaluation and the maps need, with the scene cubes on the device."""
  cfg: Any                    # RunConfig
  spec: Any                   # DatasetSpec
  labels: np.ndarray          # (H, W) int32, 0 = unlabelled
  split: Any                  # data.Split
  cubes: list                 # per modality (H + 2r, W + 2r, C_m) jax arrays (padded)
  z: Any                      # (C, D) jax array, text features
  text_encoder: str
  text_sha256: str | None
  train_labels: np.ndarray    # (N_train,) int32 0-based, aligned with split.train_idx

  @property
  def height(self) -> int:
    return int(self.labels.shape[0])

  @property
  def width(self) -> int:
    return int(self.labels.shape[1])

  @property
  def patch_size(self) -> int:
    return int(self.cfg.patch_size)


def _load_scene(cfg, spec):
  from dpmamba_jax import data
  if cfg.modalities:  # a subset of the modalities (variants.py): load them all, keep those
    from dpmamba_jax import variants
    subset, spec = spec, variants.full_spec(spec)
    return variants.restrict_scene(_load_scene(dataclasses.replace(cfg, modalities=None), spec),
                                   subset)
  if spec.synthetic is not None and cfg.data_dir is None and (cfg.synthetic_height or
                                                              cfg.synthetic_width):
    syn = dataclasses.replace(spec.synthetic, height=cfg.synthetic_height or spec.synthetic.height,
                              width=cfg.synthetic_width or spec.synthetic.width)
    spec = dataclasses.replace(spec, synthetic=syn)
  return data.load_scene(spec, cfg.data_dir)


def _split(cfg, spec, labels, workdir: str, log):
  """The run's split: <workdir>/split.npz if present (resume, evaluate), else drawn/read once."""
  from dpmamba_jax import data
  path = os.path.join(workdir, "split.npz")
  if os.path.isfile(path):
    return data.load_split(path, labels)
  if cfg.split_file:
    keys = ()
    try:
      with np.load(cfg.split_file, allow_pickle=False) as f:
        keys = tuple(f.files)
    except Exception:  # noqa: BLE001 - .mat maps are read by split_from_maps
      pass
    if "train_idx" in keys:
      split = data.load_split(cfg.split_file, labels)
    else:
      split = data.split_from_maps(cfg.split_file, labels=labels,
                                   include_train_in_test=cfg.include_train_in_test)
    log(f"split: from {cfg.split_file}")
  else:
    split = data.make_split(labels, cfg.train_per_class, cfg.seed,
                            include_train_in_test=cfg.include_train_in_test,
                            num_classes=spec.num_classes, class_names=spec.class_names)
  data.save_split(path, split)
  return split


def prepare(cfg, spec, workdir: str, log: Callable[[str], None] = print) -> RunData:
  """Loads the scene, the split, the preprocessed padded cubes (on device) and the text features."""
  import jax
  import jax.numpy as jnp
  from dpmamba_jax import data, text
  scene = _load_scene(cfg, spec)
  labels = np.asarray(scene.labels, np.int32)
  split = _split(cfg, spec, labels, workdir, log)
  cubes = data.preprocess(scene, split, normalize=cfg.normalize, pca_fit=cfg.pca_fit)
  padded = data.pad_cubes(cubes, cfg.patch_size)
  dev_cubes = [jax.device_put(jnp.asarray(c, jnp.float32)) for c in padded]
  feats = text.encode_texts(text.class_texts(spec), cfg.text_encoder,
                            clip_weights=cfg.clip_weights)
  z = jax.device_put(jnp.asarray(feats.features, jnp.float32))
  train_labels = data.labels_at(labels, split.train_idx)
  h, w = labels.shape
  mods = ", ".join(f"{m}:{c.shape[-1]}" for m, c in zip(spec.modalities, cubes))
  log(f"data: {spec.name} {h}x{w}, modalities {mods}, "
      f"{split.train_idx.size} train / {split.test_idx.size} test pixels, text {feats.encoder} "
      f"(D={z.shape[1]})")
  return RunData(cfg=cfg, spec=spec, labels=labels, split=split, cubes=dev_cubes, z=z,
                 text_encoder=feats.encoder, text_sha256=feats.weights_sha256,
                 train_labels=train_labels)


# ----------------------------------------------------------------------------------------------
# Logging.


class RunLog:
  """Console lines (through tqdm.write) plus <workdir>/log.jsonl."""

  def __init__(self, workdir: str, quiet: bool = False):
    self.path = os.path.join(workdir, "log.jsonl")
    self.primary = primary_process()
    self.quiet = quiet or not self.primary

  def __call__(self, msg: str) -> None:
    if not self.quiet:
      from tqdm import tqdm
      tqdm.write(msg, file=sys.stdout)
      sys.stdout.flush()

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
    config_lib.save_text(self.path, "".join(keep))


# ----------------------------------------------------------------------------------------------
# Stages.


def _copy_tree(tree):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def train_stage(stage: str, rd: RunData, model, workdir: str, log: RunLog, *,
                teacher=None) -> tuple[Any, float]:
  """Trains `model` for one stage with resume. Returns (trained model, stage wall time in s).

  stage "pretrain": teacher step on complete inputs. stage "distill": student step against the
  frozen `teacher`. Periodic checkpoints go to <workdir>/ckpt/<stage>/ (the step is the epoch).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tqdm import tqdm
  from dpmamba_jax import checkpoint, data, steps
  cfg, spec = rd.cfg, rd.spec
  epochs = cfg.epochs_pretrain if stage == "pretrain" else cfg.epochs_distill
  sampler = data.BalancedSampler(rd.train_labels, spec.num_classes, cfg.batch_size, cfg.seed)
  oc = steps.stage_optim_config(
      stage, lr=cfg.lr, batch_size=cfg.batch_size, steps_per_epoch=sampler.steps, epochs=epochs,
      warmup_epochs=cfg.warmup_epochs,
      betas=cfg.betas_pretrain if stage == "pretrain" else cfg.betas_distill, eps=cfg.eps,
      weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
  tx, sched = steps.make_optimizer(oc)
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1 if stage == "pretrain" else 2)
  graphdef, state = steps.init_train_state(model, tx, rng)
  state = state.replace(params=_copy_tree(state.params),
                        batch_stats=_copy_tree(state.batch_stats))  # donation must not free `model`
  ckpts = checkpoint.TrainCheckpoints(os.path.join(workdir, "ckpt", stage))
  start, wall_before = 0, 0.0
  if ckpts.latest_epoch() is not None:
    state, meta = ckpts.restore(state)
    start, wall_before = int(meta["epoch"]), float(meta.get("wall_time_s", 0.0))
    log(f"{stage}: resuming from the checkpoint at epoch {start}/{epochs}")
  log.truncate(stage, start)
  # Several devices: the batch is sharded over them, everything else replicated (one jit).
  mesh = steps.data_parallel_mesh(sampler.batch_size,
                                  enabled=bool(getattr(cfg, "data_parallel", True)), log=log)
  common = dict(width=rd.width, patch_size=rd.patch_size, mesh=mesh)
  cubes, z, to_device = rd.cubes, rd.z, jnp.asarray
  if mesh is not None:
    state = steps.replicate(state, mesh)
    cubes, z = steps.replicate((rd.cubes, rd.z), mesh)
    to_device = lambda a: steps.shard_batch(a, mesh)
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
      t_params, t_rest = steps.replicate((t_params, t_rest), mesh)
    # The frozen teacher sees complete inputs in eval mode, so its features of the training
    # pixels are the same on every step: computed once here (inside the stage's wall time)
    # instead of a teacher forward per step.
    features = steps.make_teacher_features(t_graphdef, batch_size=sampler.batch_size, **common)
    teacher_feats = features((t_params, t_rest), cubes, train_idx)  # (N_train, D), host
    # on the device once, like the cubes: a step sends only its (B,) rows into it
    teacher_feats = (jnp.asarray(teacher_feats) if mesh is None
                     else steps.replicate(teacher_feats, mesh))
    log(f"{stage}: the frozen teacher's features of the {train_idx.size} training pixels "
        f"computed once ({time.time() - t0:.1f} s)")
    step_fn = steps.make_student_step(graphdef, tx, sched, num_modalities=spec.num_modalities,
                                      batch_size=sampler.batch_size, distill=cfg.distill, **common)
    run = lambda st, rows: step_fn(st, teacher_feats, cubes, z, to_device(rows.astype(np.int32)),
                                   to_device(train_idx[rows]), to_device(rd.train_labels[rows]))
  window: list = []
  bar = tqdm(total=epochs, initial=start, desc=stage, unit="epoch", mininterval=1.0,
             file=sys.stderr, dynamic_ncols=True, disable=log.quiet)
  for epoch in range(start, epochs):
    batches = sampler.epoch(epoch)  # (steps, B) indices into the train set
    for rows in batches:
      state, m = run(state, rows)
      window.append(m)
    jax.block_until_ready(m)  # so that the progress bar and its ETA follow the computation
    bar.update(1)
    done = epoch + 1
    if done % cfg.log_every == 0 or done == epochs:
      ms = jax.device_get(window)
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
      jax.block_until_ready(state)
      ckpts.save(done, state, {"epoch": done, "stage": stage, "next_epoch": done,
                               "wall_time_s": wall_before + time.time() - t0})
      log(f"{stage}: checkpoint saved at epoch {done}")
  bar.close()
  jax.block_until_ready(state)
  ckpts.close()
  wall = wall_before + time.time() - t0
  return nnx.merge(graphdef, state.params, state.batch_stats), wall


def run_one(cfg, spec, log: RunLog | None = None) -> dict | None:
  """One seed: pretrain and/or distill (resuming), then evaluation and maps. Returns metrics."""
  from flax import nnx
  from dpmamba_jax import checkpoint, evaluate, maps
  from dpmamba_jax import model as model_lib
  workdir = os.path.abspath(cfg.workdir)
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(cfg, workdir)
  log = log or RunLog(workdir)
  log(f"run config ({os.path.join(workdir, 'config.json')}):\n{config_lib.describe(cfg)}")
  rd = prepare(cfg, spec, workdir, log)
  teacher_dir = os.path.join(workdir, "teacher")
  student_dir = os.path.join(workdir, "student")
  teacher = student = None
  epochs: dict = {}
  walls: dict = {}
  trained_now = False
  meta_common = {"dataset": spec.name, "seed": cfg.seed, "text_encoder": rd.text_encoder,
                 "text_sha256": rd.text_sha256}

  if cfg.stage in ("all", "pretrain"):
    if checkpoint.is_model_checkpoint(teacher_dir):
      log(f"pretrain: done already, loading {teacher_dir}")
      teacher, _, tmeta = checkpoint.load_model(teacher_dir)
      epochs["pretrain"], walls["pretrain"] = tmeta.get("epochs", 0), tmeta.get("wall_time_s", 0.0)
    else:
      mcfg = config_lib.model_config(cfg, spec, rd.z.shape[1], prompts=False)
      model = model_lib.DPMamba(mcfg, rngs=nnx.Rngs(cfg.seed))
      log(f"teacher: {model_lib.param_count(model):,} parameters")
      teacher, wall = train_stage("pretrain", rd, model, workdir, log)
      trained_now = True
      checkpoint.save_model(teacher_dir, teacher, mcfg, dict(
          meta_common, stage="pretrain", epochs=cfg.epochs_pretrain, wall_time_s=wall))
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
      if not checkpoint.is_model_checkpoint(src):
        raise errors.UserError(f"--teacher-ckpt {src}: no teacher checkpoint; run --stage "
                               "pretrain first or give the teacher/ dir of a finished run")
      teacher, _, tmeta = checkpoint.load_model(src)
      epochs["pretrain"], walls["pretrain"] = tmeta.get("epochs", 0), tmeta.get("wall_time_s", 0.0)
    if checkpoint.is_model_checkpoint(student_dir):
      log(f"distill: done already, loading {student_dir}")
      student, _, smeta = checkpoint.load_model(student_dir)
      wall = smeta.get("wall_time_s", 0.0)
    else:
      tcfg = teacher.cfg
      _check_teacher(tcfg, cfg, spec, rd)
      scfg = tcfg.replace(prompts=cfg.prompts)  # prompts=false: Variant-3, zero-filled
      student = model_lib.DPMamba(scfg, rngs=nnx.Rngs(cfg.seed + 1))  # prompts ~ N(0, 1)
      nnx.update(student, _copy_tree(nnx.state(teacher)))  # everything but the prompts
      what = "teacher + prompts" if cfg.prompts else "no prompts: missing features zero-filled"
      log(f"student: {model_lib.param_count(student):,} parameters ({what})")
      student, wall = train_stage("distill", rd, student, workdir, log, teacher=teacher)
      trained_now = True
      checkpoint.save_model(student_dir, student, scfg, dict(
          meta_common, stage="distill", epochs=cfg.epochs_distill, wall_time_s=wall))
      log(f"distill: {wall:.1f} s, student saved to {student_dir}")
    epochs["distill"], walls["distill"] = cfg.epochs_distill, wall

  metrics_path = os.path.join(workdir, "metrics.json")
  if not trained_now and os.path.isfile(metrics_path):
    log(f"evaluation: done already ({metrics_path}); `python -m dpmamba_jax.evaluate --workdir "
        f"{workdir}` recomputes it")
    with open(metrics_path) as f:
      metrics = json.load(f)
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
        maps.write_all_maps(rd, model, maps_dir, batch=cfg.eval_batch, which=which, log=log)
    config_lib.save_text(marker, "")
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


def _check_workdir_config(cfg, workdir: str) -> None:
  """Writes config.json, or checks that a rerun uses the same settings (resume)."""
  path = os.path.join(workdir, "config.json")
  new = cfg.to_dict()
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    defaults = config_lib.RunConfig().to_dict()  # keys added later read as their defaults
    diff = sorted(k for k in set(old) | set(new)
                  if k not in _FREE_KEYS and old.get(k, defaults.get(k)) != new.get(k))
    if diff:
      k = diff[0]
      raise errors.UserError(
          f"{path}: this workdir was run with {k}={old.get(k)!r}, now {k}={new.get(k)!r}; "
          "rerun with the same settings to resume, or use a new --workdir")
  config_lib.save_json(path, new)


# ----------------------------------------------------------------------------------------------
# CLI.


def _parser() -> argparse.ArgumentParser:
  from dpmamba_jax import datasets
  p = argparse.ArgumentParser(
      prog="python -m dpmamba_jax.train",
      description="Train DPMamba (teacher pretraining, then student distillation), evaluate the "
                  "last-epoch models over every modality scenario and draw the maps. Rerun the "
                  "same command to resume after an interruption.")
  p.add_argument("--dataset", default=None, choices=sorted(datasets.DATASETS),
                 help="dataset (default: the built-in synthetic scene, no files needed)")
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
  p.add_argument("--include-train-in-test", action="store_true",
                 help="test on every labelled pixel, training pixels included (as the authors)")
  p.add_argument("--normalize", default=None, choices=config_lib.NORMALIZE,
                 help="per-band input scaling: standard (default, z-score on the training "
                      "pixels) or none (raw values, as the authors)")
  p.add_argument("--no-compile-cache", action="store_true",
                 help=f"disable the persistent XLA compilation cache ({compile_cache_dir()})")
  p.add_argument("--quiet", action="store_true", help="no console log lines, no progress bars")
  g = p.add_argument_group("several hosts (README: Several hosts)")
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
  flags = {"dataset": args.dataset, "data_dir": args.data_dir, "workdir": args.workdir,
           "seed": args.seed, "stage": args.stage, "teacher_ckpt": args.teacher_ckpt,
           "text_encoder": args.text_encoder, "clip_weights": args.clip_weights,
           "split_file": args.split_file, "normalize": args.normalize}
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
  setup_cpu_flags()
  args = _parser().parse_args(argv)
  if args.runs < 1:
    raise errors.UserError(f"--runs {args.runs}: expected an int >= 1")
  if args.distributed:
    init_distributed(args.coordinator, args.num_processes, args.process_id)
  elif any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
    raise errors.UserError("--coordinator / --num-processes / --process-id need --distributed")
  cfg, spec = resolve_args(args)
  args.quiet = args.quiet or not primary_process()
  cache = setup_compile_cache(cfg.compile_cache)
  if cache and not args.quiet:
    print(f"XLA compilation cache: {cache}")
  if args.runs == 1:
    run_one(cfg, spec, _log_for(cfg, args.quiet))
    return 0
  from dpmamba_jax import evaluate
  root = os.path.abspath(args.workdir or os.path.join("runs", spec.name))
  results = []
  for s in range(cfg.seed, cfg.seed + args.runs):
    cfg_s = dataclasses.replace(cfg, seed=s, workdir=os.path.join(root, f"seed{s}"))
    results.append(run_one(cfg_s, spec, _log_for(cfg_s, args.quiet)))
  summary = evaluate.summarize_runs(results)
  config_lib.save_json(os.path.join(root, "summary.json"), summary)
  table = evaluate.markdown_table(summary, spec.modalities,
                                  f"{spec.name}: mean ± std over seeds {summary['seeds']}")
  config_lib.save_text(os.path.join(root, "summary.md"), table)
  if not args.quiet:
    print(table)
  return 0


def _log_for(cfg, quiet: bool) -> RunLog:
  workdir = os.path.abspath(cfg.workdir)
  os.makedirs(workdir, exist_ok=True)
  return RunLog(workdir, quiet=quiet)


if __name__ == "__main__":
  reexec_with_hugepage_malloc()
  raise SystemExit(main())
