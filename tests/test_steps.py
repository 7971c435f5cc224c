"""Tests for steps.py and predict.py: LR schedule, optimiser, the jitted teacher / student steps
and the Predictor."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpmamba_jax import data, inference, losses, steps
from dpmamba_jax import model as model_lib


def ref_lr(t, lr_max, w0, lr_min, w, total):
  """Numpy reference of spec §6.2 (without the authors' off-by-one)."""
  if t < w:
    return w0 + t * (lr_max - w0) / w
  tt = t - w
  t_cos = total - w
  if tt >= t_cos:
    return lr_min
  return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * tt / t_cos))


def test_schedule_matches_reference_trento():
  oc = steps.stage_optim_config("pretrain", lr=3e-4, batch_size=120, steps_per_epoch=2,
                                epochs=500, warmup_epochs=30, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.05, grad_clip=1.0)
  assert oc.warmup_steps == 60 and oc.total_steps == 1000
  assert oc.warmup_init == pytest.approx(1.171875e-7) and oc.lr_min == pytest.approx(1.171875e-6)
  sched = steps.warmup_cosine(oc.lr, oc.warmup_init, oc.lr_min, oc.warmup_steps, oc.total_steps)
  for t in [0, 1, 2, 30, 59, 60, 61, 500, 999, 1000, 1500]:
    want = ref_lr(t, 3e-4, oc.warmup_init, oc.lr_min, 60, 1000)
    assert float(sched(t)) == pytest.approx(want, rel=1e-5, abs=1e-12), t
  assert float(sched(0)) != pytest.approx(float(sched(1)))  # no off-by-one copy


def test_distill_schedule_unscaled():
  oc = steps.stage_optim_config("distill", lr=3e-4, batch_size=150, steps_per_epoch=4,
                                epochs=500, warmup_epochs=30, betas=(0.85, 0.999), eps=1e-8,
                                weight_decay=0.05, grad_clip=2.0)
  assert (oc.warmup_init, oc.lr_min, oc.b1, oc.warmup_steps) == (5e-7, 5e-6, 0.85, 120)
  with pytest.raises(ValueError):
    steps.stage_optim_config("other", lr=1, batch_size=1, steps_per_epoch=1, epochs=1,
                             warmup_epochs=0, betas=(0.9, 0.9), eps=1e-8, weight_decay=0,
                             grad_clip=1)


@pytest.mark.slow
def test_optimizer_clip_then_adamw_matches_numpy():
  oc = steps.OptimConfig(lr=1e-2, warmup_init=1e-2, lr_min=1e-2, warmup_steps=0, total_steps=10,
                         b1=0.8, b2=0.9, eps=1e-8, weight_decay=0.05, grad_clip=1.0)
  tx, _ = steps.make_optimizer(oc)
  p = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}  # global norm 13 -> scaled by 1/13
  st = tx.init(p)
  upd, st = tx.update(g, st, p)
  new = optax.apply_updates(p, upd)
  for k in p:
    gk = np.asarray(g[k]) / 13.0
    m = (1 - 0.8) * gk / (1 - 0.8)
    v = (1 - 0.9) * gk**2 / (1 - 0.9)
    want = np.asarray(p[k]) - 1e-2 * (m / (np.sqrt(v) + 1e-8) + 0.05 * np.asarray(p[k]))
    np.testing.assert_allclose(np.asarray(new[k]), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Steps on a tiny model and scene.

H, W, P, C, K = 8, 8, 3, 3, 4  # scene, patch, classes, samples per class


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  cubes = [rng.normal(size=(H, W, 4)).astype(np.float32),
           rng.normal(size=(H, W, 2)).astype(np.float32)]
  padded = [jnp.asarray(c) for c in data.pad_cubes(cubes, P)]
  z = jnp.asarray(rng.normal(size=(C, 8)).astype(np.float32))
  idx = jnp.asarray(rng.choice(H * W, C * K, replace=False).astype(np.int32))
  labels = jnp.asarray(np.repeat(np.arange(C), K).astype(np.int32))  # class-sorted
  # depth 0 (no Mamba blocks) keeps the compile short; the steps' plumbing is the same.
  cfg = model_lib.ModelConfig.tiny(bands=(4, 2), patch_size=P, depth=0, hidden=8, out_dim=8)
  oc = steps.OptimConfig(lr=3e-3, warmup_init=3e-3, lr_min=3e-3, warmup_steps=0, total_steps=100,
                         weight_decay=0.0, grad_clip=1.0)
  return dict(padded=padded, z=z, idx=idx, labels=labels, cfg=cfg, oc=oc)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_teacher_step_learns_and_updates_batch_stats(setup):
  s = setup
  model = model_lib.DPMamba(s["cfg"], rngs=nnx.Rngs(0))
  tx, sched = steps.make_optimizer(s["oc"])
  graphdef, state = steps.init_train_state(model, tx, jax.random.PRNGKey(0))
  bs0 = _leaves(state.batch_stats)
  state = state.replace(params=jax.tree.map(jnp.copy, state.params),
                        batch_stats=jax.tree.map(jnp.copy, state.batch_stats))
  step = steps.make_teacher_step(graphdef, tx, sched, width=W, patch_size=P)
  losses = []
  for _ in range(6):
    state, m = step(state, s["padded"], s["z"], s["idx"], s["labels"])
    losses.append(float(m["loss"]))
  assert step._cache_size() == 1  # one compile
  assert int(state.step) == 6
  assert losses[-1] < losses[0]
  assert set(m) >= {"loss", "clip", "train_oa", "lr", "grad_norm"}
  assert float(m["lr"]) == pytest.approx(3e-3)
  assert any(not np.allclose(a, b) for a, b in zip(bs0, _leaves(state.batch_stats)))


@pytest.mark.slow
def test_student_step_trains_prompts_not_teacher(setup):
  s = setup
  teacher = model_lib.DPMamba(s["cfg"], rngs=nnx.Rngs(0))
  student = model_lib.DPMamba(s["cfg"].replace(prompts=True), rngs=nnx.Rngs(1))
  nnx.update(student, jax.tree.map(jnp.copy, nnx.state(teacher)))
  prompts0 = _leaves(nnx.state(student, nnx.Param)["prompts"])
  t_graphdef, t_params, t_rest = steps.split_model(teacher)
  t_before = _leaves((t_params, t_rest))
  tx, sched = steps.make_optimizer(s["oc"])
  graphdef, state = steps.init_train_state(student, tx, jax.random.PRNGKey(0))
  step = steps.make_student_step(graphdef, tx, sched, width=W, patch_size=P,
                                 num_modalities=2, batch_size=C * K)
  features = steps.make_teacher_features(t_graphdef, width=W, patch_size=P, batch_size=C * K)
  # the table in reverse pixel order: the step must take its rows, not its first B entries
  feats = jnp.asarray(features((t_params, t_rest), s["padded"], np.asarray(s["idx"])[::-1]))
  rows = jnp.arange(C * K - 1, -1, -1, dtype=jnp.int32)
  for _ in range(2):
    state, m = step(state, feats, s["padded"], s["z"], rows, s["idx"], s["labels"])
  assert step._cache_size() == 1
  assert set(m) >= {"clip", "relation", "feature", "tbd", "loss", "train_oa"}
  for a, b in zip(t_before, _leaves((t_params, t_rest))):
    np.testing.assert_array_equal(a, b)  # frozen teacher untouched
  prompts1 = _leaves(state.params["prompts"])
  assert all(not np.allclose(a, b) for a, b in zip(prompts0, prompts1))  # wd = 0: gradients


@pytest.mark.slow
def test_teacher_features_are_its_eval_forward_row_by_row(setup):
  s = setup
  teacher = model_lib.DPMamba(s["cfg"], rngs=nnx.Rngs(0))
  xs = steps.gather_batch(s["padded"], s["idx"], W, P)
  teacher(xs, None, train=True)  # running BatchNorm statistics away from their init
  want = np.asarray(teacher(xs, None, train=False))  # (12, D): all pixels in one batch
  t_graphdef, t_params, t_rest = steps.split_model(teacher)
  features = steps.make_teacher_features(t_graphdef, width=W, patch_size=P, batch_size=5)
  feats = features((t_params, t_rest), s["padded"], s["idx"])  # batches of 5, the last padded
  chex.assert_shape(feats, (C * K, s["cfg"].out_dim))
  chex.assert_trees_all_close(feats, want, atol=1e-5, rtol=1e-5)
  reordered = features((t_params, t_rest), s["padded"], np.asarray(s["idx"])[::-1])
  chex.assert_trees_all_close(reordered, want[::-1], atol=1e-5, rtol=1e-5)
  assert features.program._cache_size() == 1  # one batch shape, the padded last batch included
  # eval mode: the train-mode forward (batch statistics) gives other features
  assert not np.allclose(np.asarray(teacher(xs, None, train=True)), want, atol=1e-3)
  with pytest.raises(ValueError, match="no pixel"):
    features((t_params, t_rest), s["padded"], np.zeros((0,), np.int32))


def test_predict_step_masks_are_an_input(setup):
  s = setup
  model = model_lib.DPMamba(s["cfg"].replace(prompts=True), rngs=nnx.Rngs(2))
  inference._programs.cache_clear()  # Predictors of equal model graphs share programs
  b = s["idx"].shape[0]
  pred = inference.Predictor(model, width=W, patch_size=P, batch=b)
  outs = []
  for row in ([1, 1], [0, 1], [1, 0]):
    mask = jnp.asarray(np.tile(np.array(row, np.float32), (b, 1)))
    out = pred.predict_batch(s["padded"], s["z"], s["idx"], mask)
    chex.assert_shape(out, (b,))
    outs.append(np.asarray(out))
  assert pred.program._cache_size() == 1
  # Complete == the model's own eval forward with mask None.
  xs = steps.gather_batch(s["padded"], s["idx"], W, P)
  want = np.asarray(losses.predict(model(xs, None), s["z"]))
  np.testing.assert_array_equal(outs[0], want)


def _tiny_student_scene(seed: int):
  """(rng, padded cubes of a 6-band + 2-band scene, z, model) of a tiny student."""
  rng = np.random.default_rng(seed)
  cubes = [jnp.asarray(c) for c in data.pad_cubes(
      [rng.normal(size=(H, W, b)).astype(np.float32) for b in (6, 2)], P)]
  z = jnp.asarray(rng.normal(size=(C, 8)).astype(np.float32))
  cfg = model_lib.ModelConfig.tiny(bands=(6, 2), patch_size=P, hidden=8, out_dim=8,
                                   prompts=True)
  return rng, cubes, z, model_lib.DPMamba(cfg, rngs=nnx.Rngs(seed + 1))


@pytest.mark.parametrize("batch,max_calls,min_sub,want", [
    (512, 16, 32, 16), (500, 16, 32, 10), (120, 16, 32, 3), (31, 16, 32, 1), (24, 4, 4, 4),
    (7, 4, 1, 1), (512, 1, 32, 1)])
def test_predict_calls(batch, max_calls, min_sub, want):
  n = inference.predict_calls(batch, max_calls, min_sub)
  assert n == want and batch % n == 0 and (n == 1 or batch // n >= min_sub)


@pytest.mark.slow
def test_predict_concurrent_calls_equal_one_call(monkeypatch):
  """A batch split into concurrent sub-batch calls gives the one call's predictions; the
  concurrent first calls trace the step once, at the sub-batch's shape."""
  monkeypatch.setattr(inference, "CPU_PREDICT_MIN_SUB_BATCH", 4)
  inference._programs.cache_clear()  # Predictors of equal model graphs share programs
  traced = []
  real_predict = losses.predict

  def recording_predict(v, z):
    traced.append(v.shape[0])
    return real_predict(v, z)

  monkeypatch.setattr(losses, "predict", recording_predict)
  rng, cubes, z, model = _tiny_student_scene(seed=6)
  split = inference.Predictor(model, width=W, patch_size=P, batch=24, max_calls=4)
  whole = inference.Predictor(model, width=W, patch_size=P, batch=24, max_calls=1)
  idx = jnp.asarray(rng.choice(H * W, 24, replace=False).astype(np.int32))
  masks = [jnp.asarray(np.tile(np.array(row, np.float32), (24, 1)))
           for row in ([1, 1], [0, 1], [1, 0])]
  got = [split.predict_batch(cubes, z, idx, mask) for mask in masks]
  # (the two Predictors of one model share the program: its one compile is counted before
  # `whole` adds the 24-pixel shape)
  assert split.program._cache_size() == 1
  for g, mask in zip(got, masks):
    chex.assert_shape(g, (24,))
    np.testing.assert_array_equal(g, whole.predict_batch(cubes, z, idx, mask))
  assert traced == [6, 24]  # four calls of 6 traced once; then the one call of 24


@pytest.mark.slow
def test_predict_scene_input_equals_cubes(monkeypatch):
  """Predictor.prepare_scene's scene input (the wide modality's embedding conv run once over
  the cube) gives the predictions of the plain cubes, complete and with either modality missing."""
  monkeypatch.setattr(inference, "SCENE_CONV_MIN_BANDS", 6)  # modality 0 (6 bands) only
  _, cubes, z, model = _tiny_student_scene(seed=4)
  pred = inference.Predictor(model, width=W, patch_size=P, batch=H * W)
  scene = pred.prepare_scene(cubes)
  assert isinstance(scene[0], dict) and set(scene[0]) == {"conv", "ring"}
  chex.assert_shape(scene[0]["conv"], cubes[0].shape[:2] + (8,))
  assert scene[1] is cubes[1]  # 2 bands: patches as before
  assert all(a is b for a, b in zip(pred.prepare_scene(scene), scene))  # pass-through
  idx = jnp.arange(H * W, dtype=jnp.int32)
  for row in ([1, 1], [0, 1], [1, 0]):
    mask = jnp.asarray(np.tile(np.array(row, np.float32), (H * W, 1)))
    np.testing.assert_array_equal(pred.predict_batch(scene, z, idx, mask),
                                  pred.predict_batch(cubes, z, idx, mask))
  monkeypatch.setattr(inference, "SCENE_CONV_BACKENDS", ())  # e.g. a GPU: the cubes as they are
  plain = inference.Predictor(model, width=W, patch_size=P, batch=H * W).prepare_scene(cubes)
  assert not any(isinstance(entry, dict) for entry in plain)


@pytest.mark.slow
def test_student_step_three_modalities():
  rng = np.random.default_rng(1)
  cubes = [jnp.asarray(c) for c in data.pad_cubes(
      [rng.normal(size=(H, W, b)).astype(np.float32) for b in (4, 2, 1)], P)]
  z = jnp.asarray(rng.normal(size=(C, 8)).astype(np.float32))
  idx = jnp.asarray(rng.choice(H * W, 7 * C, replace=False).astype(np.int32))
  labels = jnp.asarray(np.repeat(np.arange(C), 7).astype(np.int32))
  cfg = model_lib.ModelConfig.tiny(bands=(4, 2, 1), patch_size=P, depth=0, hidden=8, out_dim=8)
  teacher = model_lib.DPMamba(cfg, rngs=nnx.Rngs(0))
  student = model_lib.DPMamba(cfg.replace(prompts=True), rngs=nnx.Rngs(1))
  t_graphdef, t_params, t_rest = steps.split_model(teacher)
  tx, sched = steps.make_optimizer(steps.OptimConfig(lr=1e-3, warmup_init=1e-3, lr_min=1e-3,
                                                     warmup_steps=0, total_steps=10))
  graphdef, state = steps.init_train_state(student, tx, jax.random.PRNGKey(0))
  step = steps.make_student_step(graphdef, tx, sched, width=W, patch_size=P,
                                 num_modalities=3, batch_size=7 * C)
  features = steps.make_teacher_features(t_graphdef, width=W, patch_size=P, batch_size=7 * C)
  feats = jnp.asarray(features((t_params, t_rest), cubes, idx))
  state, m = step(state, feats, cubes, z, jnp.arange(7 * C, dtype=jnp.int32), idx, labels)
  assert np.isfinite(float(m["loss"])) and int(state.step) == 1
  assert len(state.params["prompts"]) == 3
