"""Numerical parity with the authors' PyTorch DPMamba (golden vectors, see <parity dir>/README.md).

Runs over every forward file ``*.npz`` in $DPMAMBA_PARITY_DIR (default <repo>/../shared/parity)
that has ``meta/json`` and ``input/x0`` keys and, where it has one, its training-step companion
``<stem>_train.npz`` (loss, gradients, BatchNorm statistics, AdamW updates, LR schedules). All
shapes and settings come from the files: nothing is hard-coded to one patch size, batch, band
count, class count, clip norm or schedule. Skips when the directory is absent.
"""
import dataclasses
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpmamba_jax import steps
from dpmamba_jax.model import scan, torch_import
from dpmamba_jax.model.network import capture_intermediates

REPO = pathlib.Path(__file__).resolve().parents[1]
PARITY_DIR = pathlib.Path(os.environ.get("DPMAMBA_PARITY_DIR", REPO.parent / "shared" / "parity"))

# Tolerances: README §6 suggests atol 2e-5 (or rtol 1e-5 + atol 1e-5) for per-pixel
# intermediates and atol 1e-5 for head_pooled; the issue asks <= 1e-5 on the standalone SSM and
# <= 1e-4 on V. The measured errors are printed (pytest -s).
TOL_PIXEL = dict(atol=2e-5, rtol=1e-5)
TOL_SSM = dict(atol=1e-5, rtol=0.0)  # the bound for the standalone SSM module
TOL_POOLED = dict(atol=1e-5, rtol=0.0)
TOL_V = dict(atol=1e-4, rtol=0.0)
TOL_LOGITS = dict(atol=1e-4, rtol=0.0)


def _golden_files():
  if not PARITY_DIR.is_dir():
    return []
  out = []
  for f in sorted(PARITY_DIR.glob("*.npz")):
    with np.load(f, allow_pickle=False) as z:
      if "meta/json" in z.files and "input/x0" in z.files:  # forward files, not the _train ones
        out.append(f)
  return out


FILES = _golden_files()
if FILES:
  PARAMS = [pytest.param(f, id=f.stem) for f in FILES]
else:
  PARAMS = [pytest.param(None, marks=pytest.mark.skip(
      reason=f"no golden parity files (*.npz with meta/json) in {PARITY_DIR}; "
             "set DPMAMBA_PARITY_DIR"))]


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1) if np.ndim(a) == 4 else np.asarray(a)


def _check(name, got, want, tol):
  """Asserts closeness; returns and prints the max abs error."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape} vs golden {want.shape}"
  err = float(np.abs(got - want).max())
  print(f"parity {name}: max abs err {err:.3g} (|golden| max {np.abs(want).max():.3g})")
  ok = np.abs(got - want) <= tol["atol"] + tol["rtol"] * np.abs(want)
  assert ok.all(), f"{name}: max abs err {err:.3g} exceeds atol {tol['atol']} rtol {tol['rtol']}"
  return err


def _forward_fn(model):
  graphdef = nnx.graphdef(model)

  @jax.jit
  def forward(state, xs, mask):
    return capture_intermediates(nnx.merge(graphdef, state), xs, mask)

  return lambda xs, mask: forward(nnx.state(model), xs, mask)


class Golden:
  """One golden file, its imported teacher/student and their outputs (computed once)."""

  def __init__(self, path):
    with np.load(path, allow_pickle=False) as z:
      self.d = {k: z[k] for k in z.files}
    self.meta = json.loads(str(self.d["meta/json"]))
    self.num_modalities = sum(1 for k in self.d if re.fullmatch(r"input/x\d+", k))
    self.xs = [jnp.asarray(_nhwc(self.d[f"input/x{m}"])) for m in range(self.num_modalities)]
    self.scenarios = sorted(k[len("input/"):] for k in self.d if k.startswith("input/mask_"))
    p = int(self.meta["patch"])
    with jax.default_matmul_precision("highest"):
      self.teacher, self.t_cfg = torch_import.import_state_dict(
          self.d, prefix="teacher/", patch_size=p, source=f"{path}[teacher/]")
      self.student, self.s_cfg = torch_import.import_state_dict(
          self.d, prefix="student/", source=f"{path}[student/]")
      self.v_teacher, self.det_teacher = _forward_fn(self.teacher)(self.xs, None)
      run_s = _forward_fn(self.student)
      self.v_student = {"complete": run_s(self.xs, None)[0]}
      self.det_student = {}
      for sc in self.scenarios:
        mask = jnp.asarray(self.d[f"input/{sc}"])
        self.v_student[sc], self.det_student[sc] = run_s(self.xs, mask)


@pytest.fixture(scope="module", params=PARAMS)
def golden(request):
  return Golden(request.param)


def test_config_from_arrays_matches_meta(golden):
  meta, cfg = golden.meta, golden.t_cfg
  assert cfg.bands == tuple(meta["bands"])
  assert cfg.patch_size == meta["patch"] == golden.s_cfg.patch_size
  assert (cfg.hidden, cfg.depth, cfg.d_state) == (meta["hidden"], meta["depth"], meta["d_state"])
  assert cfg.num_modalities == meta["modalities"] == golden.num_modalities
  assert not cfg.prompts and golden.s_cfg.prompts


def test_zigzag_paths_exact(golden):
  sizes = sorted({int(m.group(1)) for k in golden.d for m in [re.match(r"zigzag/P(\d+)/", k)] if m})
  assert golden.meta["patch"] in sizes
  for p in sizes:
    paths = scan.zigzag_paths(p)
    inv = scan.inverse_paths(paths)
    for k in range(4):
      np.testing.assert_array_equal(paths[k], golden.d[f"zigzag/P{p}/path{k}"], err_msg=f"P{p} {k}")
      np.testing.assert_array_equal(inv[k], golden.d[f"zigzag/P{p}/inv{k}"], err_msg=f"P{p} {k}")


def test_standalone_ssm(golden):
  d = golden.d
  module = golden.meta.get("ssm_module", "Modality_Aware_Mamba.0.IMSM.0")
  pre = f"teacher/{module}."
  x_proj = d[pre + "x_proj_weight"].transpose(0, 2, 1)  # (K, D, R+2N)
  a_log, dt_bias = d[pre + "A_logs"], d[pre + "dt_projs_bias"]
  d_skip = d[pre + "Ds"].reshape(a_log.shape[0], -1)  # (K, D)
  assert not np.any(d[pre + "initial_state"])
  u = _nhwc(d["input/ssm_u"])
  b, p, _, c = u.shape
  with jax.default_matmul_precision("highest"):
    y = jax.jit(lambda u: scan.selective_scan(u, x_proj, dt_bias, a_log, d_skip,
                                              scan.zigzag_paths(p)))(u.reshape(b, p * p, c))
  _check("ssm_y", np.asarray(y).reshape(b, p, p, c), _nhwc(d["output/ssm_y"]), TOL_SSM)


def test_teacher_intermediates(golden):
  pre = "intermediate/teacher/"
  keys = [k for k in golden.d if k.startswith(pre)]
  assert any("block0_detail" in k for k in keys) and any("head_pooled" in k for k in keys)
  for key in sorted(keys):
    name = key[len(pre):]
    tol = TOL_POOLED if name == "head_pooled" else TOL_PIXEL
    _check(f"teacher/{name}", golden.det_teacher[name], _nhwc(golden.d[key]), tol)


def test_student_intermediates(golden):
  for sc in golden.scenarios:
    pre = f"intermediate/student_{sc}/"
    for key in sorted(k for k in golden.d if k.startswith(pre)):
      name = key[len(pre):]
      tol = TOL_POOLED if name == "head_pooled" else TOL_PIXEL
      _check(f"student_{sc}/{name}", golden.det_student[sc][name], _nhwc(golden.d[key]), tol)


def test_head_outputs(golden):
  d = golden.d
  _check("V_teacher", golden.v_teacher, d["output/V_teacher"], TOL_V)
  _check("V_student_complete", golden.v_student["complete"], d["output/V_student_complete"], TOL_V)
  assert golden.scenarios, "no input/mask_* scenarios in the golden file"
  for sc in golden.scenarios:
    _check(f"V_student_{sc}", golden.v_student[sc], d[f"output/V_student_{sc}"], TOL_V)


def _logits(v, z, scale):
  v = np.asarray(v, np.float64)
  z = np.asarray(z, np.float64)
  v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
  z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)
  return scale * v @ z.T


def test_logits_and_predictions_exact(golden):
  d = golden.d
  z, scale = d["input/Z_text"], float(d["loss/logit_scale"])
  outs = {"teacher": golden.v_teacher,
          **{f"student_{k}": v for k, v in golden.v_student.items()}}
  for name in ("teacher", "student_mask_cycle"):
    if f"output/logits_{name}" in d:
      _check(f"logits_{name}", _logits(outs[name], z, scale), d[f"output/logits_{name}"],
             TOL_LOGITS)
  checked = 0
  for name, v in outs.items():
    key = f"output/pred_{name}"
    if key in d:
      pred = _logits(v, z, scale).argmax(axis=1)
      np.testing.assert_array_equal(pred, d[key], err_msg=name)
      checked += 1
  assert checked == len(outs)


def test_export_reproduces_state_dict(golden):
  """torch_import's inverse maps the imported teacher/student back to the file's arrays."""
  for who, model in (("teacher", golden.teacher), ("student", golden.student)):
    ref = torch_import.strip_prefix(golden.d, f"{who}/")
    out = torch_import.export_state_dict(model)
    assert sorted(out) == sorted(ref), who
    for k in ref:
      np.testing.assert_array_equal(out[k], ref[k], err_msg=f"{who}/{k}")


# ----------------------------------------------------------------------------------------------
# Training-step parity: <stem>_train.npz beside a forward file (parity README, "Training-step
# golden files"): loss, every gradient, BatchNorm running statistics, AdamW updates, schedules.

# Gradients: the bound, relative to each parameter's gradient norm; the measured maxima
# are printed (pytest -s) and written in docs/parity.md.
GRAD_REL_TOL = 1e-4
TRAIN_FILES = [f for f in FILES if f.with_name(f.stem + "_train.npz").is_file()]
TRAIN_PARAMS = ([pytest.param(f, id=f.stem) for f in TRAIN_FILES] if TRAIN_FILES else [
    pytest.param(None, marks=pytest.mark.skip(
        reason=f"no training-step golden files (<forward>_train.npz) in {PARITY_DIR}"))])


def _patch_scene(xs):
  """Per-modality (P, B*P, C) cubes holding the B patches side by side, and the flat indices
  whose `gather_patches` are exactly those patches: the train steps gather their batch from a
  padded scene, so the golden batch goes in through the real steps."""
  b, p = xs[0].shape[:2]
  width = b * p - 2 * (p // 2)  # of the unpadded scene (one row)
  cubes = [jnp.concatenate(list(x), axis=1) for x in xs]  # (P, B*P, C)
  return cubes, jnp.arange(b, dtype=jnp.int32) * p, width


class TrainGolden:
  """A training-step golden file with its forward file's weights and batch."""

  def __init__(self, path):
    with np.load(path.with_name(path.stem + "_train.npz"), allow_pickle=False) as z:
      self.d = {k: z[k] for k in z.files}
    self.meta = json.loads(str(self.d["meta/json"]))
    with np.load(path, allow_pickle=False) as z:
      self.fwd = {k: z[k] for k in z.files}
    m_count = sum(1 for k in self.fwd if re.fullmatch(r"input/x\d+", k))
    self.xs = [jnp.asarray(_nhwc(self.fwd[f"input/x{m}"])) for m in range(m_count)]
    self.labels = jnp.asarray(self.fwd["input/labels"], jnp.int32)
    self.z = jnp.asarray(self.fwd["input/Z_text"], jnp.float32)
    self.p = int(self.meta["patch"])
    self.zero_grad = set(self.meta["grad_zero_in_exact_arithmetic"]["params"])
    opt = self.meta["optimizer"]
    self.lr, self.wd = float(opt["lr"]), float(opt["weight_decay"])
    self.cubes, self.idx, self.width = _patch_scene(self.xs)

  def model(self, who):
    """The imported teacher or student with the file's AF dropout (0: dropout is random)."""
    model, cfg = torch_import.import_state_dict(
        self.fwd, prefix=f"{who}/", patch_size=self.p, source=f"{who}/",
        af_dropout=float(self.meta["attention_fusion_dropout_p"]))
    return model, cfg

  def optimizer(self, run, betas_key="betas", eps_key="eps", wd_key="weight_decay"):
    """AdamW at the file's fixed lr after the file's global-norm clip, as training builds it."""
    opt = self.meta["optimizer"]
    lr = self.lr
    oc = steps.OptimConfig(lr=lr, warmup_init=lr, lr_min=lr, warmup_steps=1, total_steps=10,
                           b1=float(opt[betas_key][0]), b2=float(opt[betas_key][1]),
                           eps=float(opt[eps_key]), weight_decay=float(opt[wd_key]),
                           grad_clip=float(self.meta[run]["clip_grad"]))
    return steps.make_optimizer(oc)


@pytest.fixture(scope="module", params=TRAIN_PARAMS)
def train_golden(request):
  return TrainGolden(request.param)


def _as_torch(model, *trees):
  """`model`'s state, with `trees` (nnx.State of some of its variables: gradients, new
  parameters or statistics) in place of those, in the authors' names and layouts."""
  clone = nnx.clone(model)
  if trees:
    nnx.update(clone, *trees)
  return torch_import.export_state_dict(clone)


def _check_grads(tg, run, grads_torch):
  worst = 0.0
  names = [k[len(f"{run}/grad/"):] for k in tg.d if k.startswith(f"{run}/grad/")]
  assert names, f"{run}: no grad/ keys"
  for name in names:
    want = tg.d[f"{run}/grad/{name}"].astype(np.float64)
    got = np.asarray(grads_torch[name], np.float64)
    assert got.shape == want.shape, name
    if name in tg.zero_grad:  # float32 noise of a true zero (parity README)
      assert np.abs(got).max() < 1e-5 and np.abs(want).max() < 1e-5, name
      continue
    rel = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    worst = max(worst, rel)
    assert rel <= GRAD_REL_TOL, f"{run} grad {name}: relative error {rel:.3g}"
  print(f"parity {run} grads: max relative error {worst:.3g} over {len(names)} parameters")
  return worst


def _check_bn(tg, key, model_state_torch, mean_atol=1e-5, var_atol=1e-5):
  pre = f"{key}/"
  found = 0
  for k in tg.d:
    if k.startswith(pre) and k.endswith(("running_mean", "running_var")):
      name = k[len(pre):]
      tol = mean_atol if name.endswith("running_mean") else var_atol
      _check(k, model_state_torch[name], tg.d[k], dict(atol=tol, rtol=0.0))
      found += 1
  assert found, f"no {pre}*running_* keys"


def _check_params_after(tg, run, after, torch_before, torch_after, skip=()):
  """params_after_1: entries with a real gradient within 2e-6 (the README's float32 bound, below
  1e-5 of each parameter); the others (|grad| <= 1e-6: a noise-driven first Adam step) within
  2 lr of the golden."""
  worst = 0.0
  for k in [k for k in tg.d if k.startswith(f"{run}/{after}/")]:
    name = k[len(f"{run}/{after}/"):]
    if name in skip:
      continue
    want = tg.d[k].astype(np.float64)
    got = np.asarray(torch_after[name], np.float64)
    g = np.abs(tg.d[f"{run}/grad/{name}"])
    real = (g > 1e-6) & (name not in tg.zero_grad)
    err = np.abs(got - want)
    worst = max(worst, float(err[real].max(initial=0.0)))
    assert (err[real] <= 2e-6).all(), f"{run} {name}: max error {err[real].max():.3g}"
    assert (err[~real] <= 2 * tg.lr).all(), f"{run} {name} (tiny gradients)"
  print(f"parity {run} {after}: max error {worst:.3g} on entries with |grad| > 1e-6")


@pytest.mark.slow
def test_teacher_train_step(train_golden):
  """Loss, V, gradients and BN statistics of one train-mode forward, then 1 and 3 AdamW steps
  of the real jitted teacher step (the golden batch every step, lr fixed)."""
  tg, run = train_golden, "teacher_train"
  model, _ = tg.model("teacher")
  tx, sched = tg.optimizer(run)
  graphdef, state = steps.init_train_state(model, tx, jax.random.PRNGKey(0))
  with jax.default_matmul_precision("highest"):
    grads, (loss, _, new_rest, v) = jax.jit(steps.teacher_grads, static_argnums=0)(
        graphdef, state.params, state.batch_stats, tg.xs, tg.labels, tg.z, None)
    _check(f"{run}/loss", loss, tg.d[f"{run}/loss"],
           dict(atol=0.0, rtol=1e-6))
    _check(f"{run}/V", v, tg.d[f"{run}/V"], dict(atol=1e-5, rtol=0.0))
    _check_grads(tg, run, _as_torch(model, grads))
    _check(f"{run}/grad_global_norm", optax.global_norm(grads), tg.d[f"{run}/grad_global_norm"],
           dict(atol=0.0, rtol=1e-5))
    _check_bn(tg, f"{run}/bn_after", _as_torch(model, new_rest))
    step = steps.make_teacher_step(graphdef, tx, sched, width=tg.width, patch_size=tg.p)
    np.testing.assert_array_equal(steps.gather_batch(tg.cubes, tg.idx, tg.width, tg.p)[0],
                                  tg.xs[0])
    before = _as_torch(model)
    losses_, norms = [], []
    for i in range(3):
      state, metrics = step(state, tg.cubes, tg.z, tg.idx, tg.labels)
      losses_.append(float(metrics["loss"]))
      norms.append(float(metrics["grad_norm"]))
      if i == 0:
        after1 = _as_torch(model, state.params, state.batch_stats)
        _check_params_after(tg, run, "params_after_1", before, after1)
  _check(f"{run}/losses_3", losses_, tg.d[f"{run}/losses_3"], dict(atol=1e-5, rtol=0.0))
  _check(f"{run}/grad_global_norms_3", norms, tg.d[f"{run}/grad_global_norms_3"],
         dict(atol=0.0, rtol=1e-4))
  after3 = _as_torch(model, state.params, state.batch_stats)
  close, total = 0, 0
  for k in [k for k in tg.d if k.startswith(f"{run}/params_after_3/")]:
    name = k[len(f"{run}/params_after_3/"):]
    if name in tg.zero_grad:
      continue
    err = np.abs(np.asarray(after3[name], np.float64) - tg.d[k])
    assert err.max() <= 1e-3, f"{run} params_after_3 {name}: {err.max():.3g}"
    close, total = close + int((err <= 1e-5).sum()), total + err.size
  print(f"parity {run} params_after_3: {close} of {total} entries within 1e-5")
  assert close >= 0.99 * total
  # running stats after 3 steps follow the parameters' float32 drift: the variance is 1e-6 off
  # with XLA's default CPU flags and 1.01e-5 with the CLIs' (runtime.cpu_xla_flags)
  _check_bn(tg, f"{run}/bn_after_3", after3, mean_atol=5e-4, var_atol=3e-5)


def _student_setup(tg, run):
  """The imported student and the frozen teacher's eval features V_t of the batch (computed once
  per file), checked against the run's V_teacher."""
  if not hasattr(tg, "v_teacher"):
    teacher, _ = tg.model("teacher")
    with jax.default_matmul_precision("highest"):
      tg.v_teacher = jax.jit(lambda s, xs: nnx.merge(nnx.graphdef(teacher), s)(xs))(
          nnx.state(teacher), tg.xs)
  _check(f"{run}/V_teacher", tg.v_teacher, tg.d[f"{run}/V_teacher"], dict(atol=1e-5, rtol=0.0))
  return tg.model("student")[0], tg.v_teacher


@pytest.mark.slow
@pytest.mark.parametrize("run,bn_stats", [("student_train_complete", "present"),
                                          ("student_train", "all")])
def test_student_train_step(train_golden, run, bn_stats):
  """The student step's loss parts, gradients, BN statistics and one AdamW update.

  student_train_complete (all modalities present) is the exact target of the default
  semantics; student_train (mask cycle) is the authors' BatchNorm, whose batch statistics
  include the masked samples' real input: our `--protocol reference` (bn_stats "all").
  """
  tg = train_golden
  student, v_t = _student_setup(tg, run)
  tx, _ = tg.optimizer(run, betas_key="betas_finetune", eps_key="eps_finetune",
                       wd_key="weight_decay_finetune")
  graphdef, state = steps.init_train_state(student, tx, jax.random.PRNGKey(0))
  mask = jnp.asarray(tg.d[f"{run}/mask"], jnp.float32)
  with jax.default_matmul_precision("highest"):
    grads, (loss, parts, new_rest, v) = jax.jit(
        steps.student_grads, static_argnums=0, static_argnames=("distill", "bn_stats"))(
            graphdef, state.params, state.batch_stats, tg.xs, mask, v_t, tg.labels, tg.z, None,
            bn_stats=bn_stats)
    _check(f"{run}/loss", loss, tg.d[f"{run}/loss"], dict(atol=0.0, rtol=1e-6))
    for ours, theirs in (("clip", "clip_all"), ("relation", "class_relation_kd"),
                         ("feature", "features_kd")):
      _check(f"{run}/{theirs}", parts[ours], tg.d[f"{run}/loss_parts/{theirs}"],
             dict(atol=1e-6, rtol=1e-6))
    _check(f"{run}/V", v, tg.d[f"{run}/V"], dict(atol=1e-5, rtol=0.0))
    grads_torch = _as_torch(student, grads)
    unused = set(tg.meta["params_without_grad"][f"{run}_grad_none"])
    for name in unused:  # never used in the graph: no gradient at all
      assert not np.any(grads_torch[name]), name
    _check_grads(tg, run, grads_torch)
    _check(f"{run}/grad_global_norm", optax.global_norm(grads), tg.d[f"{run}/grad_global_norm"],
           dict(atol=0.0, rtol=1e-5))
    _check_bn(tg, f"{run}/bn_after", _as_torch(student, new_rest))
    new_state, _ = steps.apply_gradients(state, tx, lambda _: tg.lr, grads,
                                         (loss, parts, new_rest, v), tg.labels, tg.z, state.rng)
  before = _as_torch(student)
  after = _as_torch(student, new_state.params, new_state.batch_stats)
  _check_params_after(tg, run, "params_after_1", before, after, skip=unused)
  for name in unused:
    # PyTorch's AdamW skips a parameter without a gradient; optax decays it (docs/deviations.md)
    np.testing.assert_allclose(after[name], before[name] * (1 - tg.lr * tg.wd), rtol=1e-6)
    np.testing.assert_array_equal(before[name], tg.d[f"{run}/params_after_1/{name}"])


@pytest.mark.slow
def test_student_masked_batchnorm_differs_as_documented(train_golden):
  """The default student BatchNorm leaves masked samples out of the batch statistics, so the
  mask-cycle target differs from it by more than float noise (measured in docs/parity.md)."""
  tg, run = train_golden, "student_train"
  student, v_t = _student_setup(tg, run)
  graphdef, params, rest = steps.split_model(student)
  mask = jnp.asarray(tg.d[f"{run}/mask"], jnp.float32)
  with jax.default_matmul_precision("highest"):
    _, (loss, _, _, v) = jax.jit(steps.student_grads, static_argnums=0)(
        graphdef, params, rest, tg.xs, mask, v_t, tg.labels, tg.z, None)
  d_loss = abs(float(loss) - float(tg.d[f"{run}/loss"]))
  d_v = float(np.abs(np.asarray(v) - tg.d[f"{run}/V"]).max())
  print(f"parity {run} with masked samples left out of BN: |d loss| {d_loss:.3g}, "
        f"max |d V| {d_v:.3g}")
  assert d_v > 1e-3


@pytest.mark.parametrize("stage,prefix", [("pretrain", "schedule/lr_per_step"),
                                          ("distill", "schedule/finetune_lr_per_step")])
def test_lr_schedules(train_golden, stage, prefix):
  """Our schedule is the authors' intended one; `--protocol reference` reproduces the one their
  loop actually uses (update s at lr(s - 1), update 0 at w0). float64 numpy, rtol 1e-12; the
  float32 optax schedule of training within 1e-6."""
  tg = train_golden
  s = tg.meta["schedule"]["pretrain" if stage == "pretrain" else "finetune"]
  oc = steps.stage_optim_config(stage, lr=s["lr_max"], batch_size=s["yaml_batch"],
                                steps_per_epoch=s["steps_per_epoch"], epochs=s["epochs_total"],
                                warmup_epochs=s["warmup_epochs"], betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.05, grad_clip=1.0)
  assert (oc.warmup_steps, oc.total_steps - oc.warmup_steps) == (s["warmup_steps"],
                                                                  s["t_initial"])
  np.testing.assert_allclose([oc.warmup_init, oc.lr_min], [s["warmup_lr_init"], s["lr_min"]],
                             rtol=1e-12)
  t = np.arange(tg.d[prefix].shape[0])
  for off_by_one, key in ((False, prefix + "_intended"), (True, prefix)):
    ocp_ = dataclasses.replace(oc, authors_off_by_one=off_by_one)
    np.testing.assert_allclose(steps.lr_at(t, ocp_), tg.d[key], rtol=1e-12, atol=0.0,
                               err_msg=key)
    sched = steps.make_optimizer(ocp_)[1]
    np.testing.assert_allclose(np.asarray(jax.vmap(sched)(jnp.asarray(t))), tg.d[key],
                               rtol=1e-6, err_msg=key)
