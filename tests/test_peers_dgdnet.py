"""DGDNet (peers/dgdnet.py) against the golden vectors of the authors' PyTorch code
(peers/dgdnet_*.npz: eval, missing-modality and train-mode outputs, BatchNorm updates, losses)."""
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import peer_golden
from conftest import parity_dir
from peer_golden import GoldenFile, KeyRecorder
from flax import nnx

from dpmamba_jax import method
from dpmamba_jax.model.network import param_count
from dpmamba_jax.peers import dgdnet

_FILES = peer_golden.golden_files("dgdnet")
_IDS = [p.stem for p in _FILES] or ["missing"]


def _close(actual, ref, rel=1e-4):
  """Equal up to rel * max|ref| (plus rel relative)."""
  ref = np.asarray(ref, np.float32)
  atol = rel * max(float(np.abs(ref).max()), 1e-6)
  chex.assert_trees_all_close(np.asarray(actual), ref, rtol=rel, atol=atol)


def _cl(x):
  """(B, C, H, W) -> (B, H, W, C); (B, C, 1, 1) -> (B, C)."""
  x = np.asarray(x)
  return x[:, :, 0, 0] if x.shape[2:] == (1, 1) else x.transpose(0, 2, 3, 1)


class Golden(GoldenFile):
  """One golden file, with a fresh student (weights loaded, nothing random) on demand."""

  def __init__(self, path):
    super().__init__(path)
    self.xs = [jnp.asarray(self["inputs/hsi_cl"]), jnp.asarray(self["inputs/lidar_cl"])]
    self.bands = tuple(int(x.shape[-1]) for x in self.xs)
    self.batch = int(self.xs[0].shape[0])
    self.labels = jnp.asarray(self["inputs/labels"], jnp.int32)

  def abstract(self):
    shapes = method.Shapes(bands=tuple(self.bands), num_classes=int(self.meta["classes"]),
                           patch_size=int(self.meta["patch_size"]), modalities=("HSI", "LiDAR"),
                           text_dim=0)
    return nnx.eval_shape(lambda: dgdnet.build_student(shapes, {}, nnx.Rngs(0)))

  def student(self, params=None):
    """All variables NaN, then the file's weights: a variable the importer missed shows."""
    graphdef, state = nnx.split(self.abstract())
    state = jax.tree.map(lambda v: np.full(v.shape, np.nan, v.dtype), state)
    model = nnx.merge(graphdef, state)
    dgdnet.load_torch(model, self.params if params is None else params, self.buffers)
    return model

  def keep(self, row):
    return jnp.tile(jnp.asarray(row, jnp.float32)[None], (self.batch, 1))


@pytest.fixture(scope="module", params=_FILES or [None], ids=_IDS)
def golden(request):
  if request.param is None:
    pytest.fail(f"no peers/dgdnet_*.npz under {parity_dir()}")
  return Golden(request.param)


@pytest.fixture(scope="module")
def eval_run(golden):
  model = golden.student()
  out = {name: model.outputs(golden.xs, golden.keep(row))
         for name, row in (("full", (1, 1)), ("missing_lidar", (1, 0)),
                           ("missing_hsi", (0, 1)))}
  return model, out


@pytest.fixture(scope="module")
def train_run(golden):
  model = golden.student()
  keep = jnp.asarray(golden["inputs/train_drop_mask"], jnp.float32)
  outs = model.outputs(golden.xs, keep, train=True)
  return model, outs


def test_param_count_and_importer(golden):
  meta = golden.meta
  assert param_count(golden.abstract()) == (meta["param_count_trainable"]
                                            - meta["param_count_unused_in_forward"])
  params = KeyRecorder(golden.params)
  golden.student(params)
  assert set(golden.params) - params.read == set(meta["params_unused_in_forward"])


@pytest.mark.slow
def test_eval_outputs(golden, eval_run):
  _, out = eval_run
  o, d = out["full"], golden.arrays
  _close(o.logits, d["outputs/logits"])
  _close(o.fused_feature, _cl(d["outputs/fused_feature"]))
  _close(o.unimodal_logits[0], d["outputs/logits_hsi_head"])
  _close(o.unimodal_logits[1], d["outputs/logits_lidar_head"])
  _close(o.features[0], _cl(d["outputs/hsi_feature"]))
  _close(o.features[1], _cl(d["outputs/lidar_feature"]))


@pytest.mark.parametrize("scenario", ["missing_lidar", "missing_hsi"])
def test_missing_modality_outputs(golden, eval_run, scenario):
  _, out = eval_run
  _close(out[scenario].logits, golden[f"outputs/{scenario}/logits"])
  _close(out[scenario].fused_feature, _cl(golden[f"outputs/{scenario}/fused_feature"]))


def test_classify_selects_each_samples_scenario(golden, eval_run):
  model, _ = eval_run
  rows = [(1, 1), (1, 0), (0, 1)]
  keep = jnp.asarray([rows[i % 3] for i in range(golden.batch)], jnp.float32)
  logits = dgdnet.classify({dgdnet.STUDENT: model}, golden.xs, keep)
  refs = [golden["outputs/logits"], golden["outputs/missing_lidar/logits"],
          golden["outputs/missing_hsi/logits"]]
  _close(logits, np.stack([refs[i % 3][i] for i in range(golden.batch)]))
  _close(model(golden.xs, keep), logits)


@pytest.mark.slow
def test_train_outputs(golden, train_run):
  _, outs = train_run
  d = golden.arrays
  _close(outs.logits, d["outputs/train/logits"])
  _close(outs.fused_feature, _cl(d["outputs/train/fused_feature"]))
  _close(outs.unimodal_logits[0], d["outputs/train/logits_hsi_head"])
  _close(outs.unimodal_logits[1], d["outputs/train/logits_lidar_head"])
  teacher = jnp.asarray(_cl(d["inputs/teacher_feature"]))
  _close(dgdnet.dad_matrix(outs.fused_feature, teacher), d["outputs/train/dad_matrix"])


def _batch_norms(model):
  """{PyTorch BatchNorm name: MaskedBatchNorm} of a two-modality DGDNet."""
  bns = {}
  for enc, name in zip(model.encoders, dgdnet.torch_encoder_names(len(model.encoders))):
    for i, block in enumerate((enc.block1, enc.block2, enc.block3), start=1):
      bns[f"{name}.block{i}.1"] = block.bn
  bns["share_bone.block_5_1.1"] = model.head.block_5_1.bn
  bns["share_bone.block_5_2.1"] = model.head.block_5_2.bn
  return bns


def test_train_batchnorm_updates(golden, train_run):
  model, _ = train_run
  bns = _batch_norms(model)
  names = {k[len("outputs/train/bn_after/"):].rsplit(".", 1)[0] for k in golden.arrays
           if k.startswith("outputs/train/bn_after/")}
  assert names == set(bns)
  for name, bn in bns.items():
    _close(bn.mean[...], golden[f"outputs/train/bn_after/{name}.running_mean"])
    _close(bn.var[...], golden[f"outputs/train/bn_after/{name}.running_var"])


def test_loss_terms(golden, train_run):
  model, outs = train_run
  d = golden.arrays
  teacher = jnp.asarray(_cl(d["inputs/teacher_feature"]))
  total, terms = dgdnet.student_objective(outs, teacher, golden.labels, model.cfg)
  for name in ("ce", "dad", "unimodal_ce_hsi", "unimodal_ce_lidar"):
    _close(terms[name], d[f"losses/{name}"])
  _close(total, d["losses/total"])


class _FixedTeacher:
  """Stands in for the frozen teacher: its stored eval-mode fused feature and logits."""

  def __init__(self, golden):
    self.logits = jnp.asarray(golden["inputs/teacher_logits"])
    self.feature = jnp.asarray(_cl(golden["inputs/teacher_feature"]))
    self.calls = []

  def forward_fused(self, xs, keep, *, train=False):
    self.calls.append((np.asarray(keep), train))
    return self.logits, self.feature


def test_student_loss_end_to_end(golden):
  model = golden.student()
  teacher = _FixedTeacher(golden)
  keep = jnp.asarray(golden["inputs/train_drop_mask"], jnp.float32)
  total, terms, logits = dgdnet.student_loss(model, {dgdnet.TEACHER: teacher}, golden.xs, keep,
                                             golden.labels, jax.random.key(0))
  _close(total, golden["losses/total"])
  _close(terms["dad"], golden["losses/dad"])
  _close(logits, golden["outputs/train/logits"])
  ((t_keep, t_train),) = teacher.calls
  assert not t_train and np.all(t_keep == 1)
  bn = model.head.block_5_2.bn
  _close(bn.var[...], golden["outputs/train/bn_after/share_bone.block_5_2.1.running_var"])


def test_teacher_objective_matches_numpy():
  rng = np.random.default_rng(0)
  b, c = 6, 4
  logits, lh, ll = (rng.normal(size=(b, c)).astype(np.float32) for _ in range(3))
  labels = np.arange(b) % c
  outs = dgdnet.DGDNetOutputs(jnp.asarray(logits), jnp.zeros((b, 3)),
                              (jnp.asarray(lh), jnp.asarray(ll)), ())
  cfg = dgdnet.DGDNetConfig.tiny(num_classes=c)
  total, terms = dgdnet.teacher_objective(outs, jnp.asarray(labels), cfg)

  def ce(x):
    x = x.astype(np.float64)
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    return float(np.mean(lse - x[np.arange(b), labels]))

  want = {"ce": ce(logits), "unimodal_mse": float(np.mean((lh - ll) ** 2)),
          "unimodal_ce_hsi": ce(lh), "unimodal_ce_lidar": ce(ll)}
  for k, v in want.items():
    np.testing.assert_allclose(float(terms[k]), v, rtol=1e-5)
  np.testing.assert_allclose(
      float(total), want["ce"] + 3.0 * (want["unimodal_mse"] + want["unimodal_ce_hsi"]
                                        + want["unimodal_ce_lidar"]), rtol=1e-5)


def test_dad_gradient_finite_with_constant_row():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(5, 8)).astype(np.float32)
  s[2] = 0.0  # an all-zero pooled feature (every channel dead after the ReLU)
  t = jnp.asarray(rng.normal(size=(5, 8)).astype(np.float32))
  loss, g = jax.jit(jax.value_and_grad(dgdnet.dad_loss))(jnp.asarray(s), t)
  chex.assert_tree_all_finite((loss, g))
  # the zero row's cosines are all 0, so its DAD row is the teacher's cosines squared
  _close(dgdnet.dad_matrix(jnp.asarray(s), t)[2], np.square(dgdnet._centred_cosine(t)[2]))


@pytest.mark.slow
def test_draw_keep_rule():
  keep = np.asarray(dgdnet.draw_keep(jax.random.key(3), 6000, 2))
  chex.assert_shape(keep, (6000, 2))
  assert keep.dtype == np.float32
  patterns, counts = np.unique(keep, axis=0, return_counts=True)
  assert [tuple(p) for p in patterns] == [(0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
  assert np.all(np.abs(counts / 6000 - 1 / 3) < 0.03)
  keep3 = np.asarray(dgdnet.draw_keep(jax.random.key(4), 7000, 3))
  assert len(np.unique(keep3, axis=0)) == 7 and np.all(keep3.sum(1) >= 1)


def test_tiny_config_round_trip_and_shapes():
  cfg = dgdnet.DGDNetConfig.tiny()
  assert dgdnet.DGDNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  model = nnx.eval_shape(lambda: dgdnet.DGDNet(cfg, rngs=nnx.Rngs(0)))
  xs = [jax.ShapeDtypeStruct((2, cfg.patch_size, cfg.patch_size, b), jnp.float32)
        for b in cfg.bands]
  keep = jax.ShapeDtypeStruct((2, cfg.num_modalities), jnp.float32)
  outs = nnx.eval_shape(lambda m, x, k: m.outputs(x, k), model, xs, keep)
  chex.assert_shape(outs.logits, (2, cfg.num_classes))
  chex.assert_shape(outs.fused_feature, (2, cfg.head_widths[1]))
  assert len(outs.unimodal_logits) == cfg.num_modalities
  with pytest.raises(ValueError, match="modalities"):
    model.outputs(xs[:1], keep)



@pytest.mark.parametrize("stage", dgdnet.STAGES)
def test_tiny_loss_traces_under_grad(stage):
  """Each stage's loss traces under nnx.value_and_grad (shapes only, nothing compiled)."""
  cfg = dgdnet.DGDNetConfig.tiny()
  b = 6
  teacher, student = (nnx.eval_shape(lambda: dgdnet.DGDNet(cfg, rngs=nnx.Rngs(0)))
                      for _ in range(2))
  xs = [jax.ShapeDtypeStruct((b, cfg.patch_size, cfg.patch_size, c), jnp.float32)
        for c in cfg.bands]
  keep = jax.ShapeDtypeStruct((b, cfg.num_modalities), jnp.float32)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32)
  loss_fn = {dgdnet.TEACHER: dgdnet.teacher_loss, dgdnet.STUDENT: dgdnet.student_loss}[stage]

  def step(student, teacher, xs, keep, labels):
    def loss(m):
      total, terms, logits = loss_fn(m, {dgdnet.TEACHER: teacher}, xs, keep, labels,
                                     jax.random.key(0))
      return total, (terms, logits)
    return nnx.value_and_grad(loss, has_aux=True)(student)

  (total, (terms, logits)), grads = nnx.eval_shape(step, student, teacher, xs, keep, labels)
  chex.assert_shape(total, ())
  chex.assert_shape(logits, (b, cfg.num_classes))
  assert {"ce", "unimodal_ce_hsi", "unimodal_ce_lidar"} <= set(terms)
  assert ("dad" in terms) == (stage == dgdnet.STUDENT)
  assert (jax.tree.structure(grads)
          == jax.tree.structure(nnx.state(student, nnx.Param)))
