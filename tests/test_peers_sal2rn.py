"""Sal2RN (peers/sal2rn.py) against the golden vectors of the authors' PyTorch code
(peers/sal2rn_*.npz: eval and train-mode outputs, BatchNorm updates, losses), plus its decision
weights and the stage that fills them in."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peer_golden
from conftest import parity_dir
from peer_golden import GoldenFile, assert_close
from dpmamba_jax import config, errors, method, steps
from dpmamba_jax.data.patches import ShuffleSampler
from dpmamba_jax.model.network import param_count
from dpmamba_jax.peers import sal2rn

FILES = peer_golden.golden_files("sal2rn")
OUTPUTS = ("logits", "logits_spatial", "logits_spectral", "logits_lidar", "spatial_feature",
           "spatial_hidden", "lidar_feature")


def _shell(cfg, fill=np.zeros):
  """A Sal2RN whose variables are host arrays fill(shape, dtype), built without running the
  random initialisers (eager jax ops compile once per shape and dominate a test's time)."""
  return peer_golden.shell(lambda: sal2rn.Sal2RN(cfg, rngs=nnx.Rngs(0)), fill)


def _noisy(cfg, seed):
  """A shell with parameters 0.3 N(0, 1), BatchNorm statistics and decision weights 0.5."""
  model = _shell(cfg, lambda shape, dtype: np.full(shape, 0.5, dtype))
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  noisy = [jax.device_put((0.3 * rng.standard_normal(x.shape)).astype(np.float32))
           for x in leaves]
  nnx.update(model, jax.tree.unflatten(treedef, noisy))
  return model


class Golden(GoldenFile):
  def __init__(self, path):
    super().__init__(path)
    raw, pca = self.arrays["inputs/hsi_cl"], self.arrays["inputs/hsi_pca_cl"]
    # the pipeline's `pca: raw+N` HSI input: [raw bands, PCA components]
    self.xs = [jax.device_put(np.concatenate([raw, pca], axis=-1)),
               jax.device_put(self.arrays["inputs/lidar_cl"])]
    self.labels = jax.device_put(self.arrays["inputs/labels"].astype(np.int32))
    # dropout rates 0: the golden train forward has every dropout switched off
    self.cfg = sal2rn.Sal2RNConfig(
        bands=tuple(int(x.shape[-1]) for x in self.xs), spectral_bands=int(raw.shape[-1]),
        num_classes=int(self.meta["classes"]), patch_size=int(self.meta["patch_size"]),
        mlp_dropout=0.0, lidar_dropout=0.0)

  def model(self):
    model = _shell(self.cfg)
    sal2rn.load_torch(model, self.params, self.buffers)
    model.decision_weights[...] = jax.device_put(self["inputs/decision_weights"])
    return model


def test_golden_files_exist():
  assert FILES, f"no peers/sal2rn_*.npz under {parity_dir()}"


@pytest.fixture(scope="module", params=FILES, ids=lambda p: p.stem)
def gold(request):
  return Golden(request.param)


@pytest.fixture(scope="module")
def eval_out(gold):
  """One eval forward on the batch three times: complete, LiDAR zero-filled, HSI zero-filled."""
  model = gold.model()
  b = gold.xs[0].shape[0]
  keep = jax.device_put(np.repeat(np.asarray([[1, 1], [1, 0], [0, 1]], np.float32), b,
                                  axis=0))  # (3B, 2)
  xs = [jax.device_put(np.concatenate([np.asarray(x)] * 3)) for x in gold.xs]
  out = nnx.jit(lambda m, xs, k: m.outputs(sal2rn.zero_fill(xs, k)))(model, xs, keep)
  return out, model, b


@pytest.fixture(scope="module")
def train_run(gold):
  """The stage loss's train-mode forward (dropout rates 0, as the golden file) with complete
  inputs: (outputs, total, terms, model after it)."""
  model = gold.model()
  keep = jax.device_put(np.ones((gold.xs[0].shape[0], 2), np.float32))
  out, total, terms = nnx.jit(sal2rn.train_forward)(model, gold.xs, keep, gold.labels,
                                                    jax.random.key(0))
  return out, total, terms, model


def test_param_count(gold, eval_out):
  model = eval_out[1]
  meta = gold.meta
  assert param_count(model) == meta["param_count_used_in_forward"]
  assert param_count(model) == (meta["param_count_trainable"]
                                - meta["param_count_unused_in_forward"])
  unused = {p.rsplit(".", 1)[0] for p in meta["params_unused_in_forward"]}
  used = {k for k in gold.params if k.rsplit(".", 1)[0] not in unused}
  n_used = sum(int(np.prod(gold.params[k].shape)) for k in used)
  assert n_used == param_count(model)


def test_eval_outputs(gold, eval_out):
  out, _, b = eval_out
  for name in OUTPUTS:
    assert_close(np.asarray(getattr(out, name))[:b], gold[f"outputs/{name}"], name)
  assert_close(np.asarray(out.spectral_feature)[:b], gold["outputs/spectral_feature"][..., 0],
         "spectral_feature")


def test_zero_filled_modalities(eval_out):
  """No missing-modality rule: a zero-filled modality's branch gives one constant output, the
  other branches are unchanged."""
  out, _, b = eval_out
  full, no_lidar, no_hsi = slice(0, b), slice(b, 2 * b), slice(2 * b, 3 * b)
  for name, present, missing in (("logits_spatial", no_lidar, no_hsi),
                                 ("logits_spectral", no_lidar, no_hsi),
                                 ("logits_lidar", no_hsi, no_lidar)):
    z = np.asarray(getattr(out, name))
    np.testing.assert_array_equal(z[present], z[full])
    np.testing.assert_allclose(z[missing], np.broadcast_to(z[missing][:1], z[missing].shape),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(z[missing], z[full])


def test_train_outputs(gold, train_run):
  out = train_run[0]
  for name in ("logits_spatial", "logits_spectral", "logits_lidar"):
    assert_close(getattr(out, name), gold[f"outputs/train/{name}"], f"train/{name}")


def test_train_running_stats(gold, train_run):
  ours = sal2rn.torch_buffers(train_run[3])
  after = gold.group("outputs/train/bn_after/")
  for name, value in ours.items():
    assert_close(value, after[name], f"bn_after/{name}")
  unused = {k for k in after if k.endswith("num_batches_tracked") or k.startswith("conv4.")}
  assert set(ours) == set(after) - unused


def test_losses(gold, train_run):
  _, total, terms, _ = train_run
  golden = gold.group("losses/")
  assert set(terms) == set(golden)
  for name, ref in golden.items():
    assert_close(terms[name], ref, f"losses/{name}")
  assert_close(total, golden["total"], "total")


def _their_weights(preds, labels):
  """demo.py's loop: per class present in the training labels, right_k / (sum right + 1e-5)."""
  classes = np.unique(labels)
  w = np.empty((3, len(classes)), np.float32)
  for i, c in enumerate(classes):
    right = [sum(1 for j in range(len(labels)) if labels[j] == c and preds[j, k] == c)
             for k in range(3)]
    for k in range(3):
      w[k, i] = float(right[k]) / float(sum(right) + 0.00001)
  return w


def test_decision_weights_match_their_loop():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(5), 7)
  preds = np.where(rng.random((35, 3)) < [[0.3, 0.6, 0.9]], labels[:, None],
                   rng.integers(0, 5, (35, 3)))
  preds[labels == 4] = (labels[labels == 4, None] + 1) % 5  # no head right: all-zero weights
  w = sal2rn.decision_weights(preds, labels, 5)
  np.testing.assert_array_equal(w, _their_weights(preds, labels))
  assert w.dtype == np.float32 and not w[:, 4].any()
  np.testing.assert_allclose(w[:, :4].sum(0), 1.0, atol=1e-5)
  z = rng.standard_normal((3, 35, 5)).astype(np.float32)
  fused = sal2rn.fuse(w, *z)
  assert_close(fused, w[2] * z[2] + w[1] * z[1] + w[0] * z[0], "fuse")


TINY = sal2rn.Sal2RNConfig.tiny()


def test_dropout_is_inverted_and_keyed():
  x = jnp.ones((4000,), jnp.float32)
  assert sal2rn._dropout(x, 0.4, None) is x
  y = np.asarray(sal2rn._dropout(x, 0.4, jax.random.key(0)))
  np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.6], rtol=1e-6)
  assert abs((y == 0).mean() - 0.4) < 0.03


def test_weights_stage_fills_the_weights_from_every_training_pixel():
  """Stage `model`: a copy of the trained network (same parameters) whose decision weights
  come from its eval-mode heads on all training pixels and fuse its logits; the saved config
  restores the same structure."""
  cfg = TINY
  shapes = method.Shapes(bands=cfg.bands, num_classes=cfg.num_classes,
                         patch_size=cfg.patch_size, modalities=("HSI", "LiDAR"), text_dim=0,
                         raw_bands=(cfg.spectral_bands, cfg.bands[1]))
  run_cfg = config.RunConfig(method="sal2rn", batch_size=8, epochs_pretrain=3)
  branches, stage = sal2rn.METHOD.stages(run_cfg, shapes)
  assert (branches.name, branches.epochs, stage.name, stage.reads, stage.epochs) == (
      "branches", 3, "model", ("branches",), 1)
  net = _noisy(cfg, 3)
  frozen = {sal2rn.BRANCHES: net}
  model, saved = stage.build(frozen, shapes, 0)
  rng = np.random.default_rng(4)
  h = w = 6
  r = cfg.patch_size // 2
  cubes = [jax.device_put(rng.standard_normal((h + 2 * r, w + 2 * r, c)).astype(np.float32))
           for c in cfg.bands]
  train_idx = rng.permutation(h * w)[:21].astype(np.int32)
  labels = rng.integers(0, cfg.num_classes, train_idx.size)
  sampler = ShuffleSampler(train_idx.size, stage.batch_size, 0)
  tx, sched = steps.make_optimizer(stage.optim(sampler.steps))
  graphdef, params, rest = steps.split_model(model)
  state = steps.TrainState(params=params, batch_stats=rest, opt_state=(),
                           step=jax.device_put(np.int32(0)),
                           rng=jax.device_put(np.zeros(2, np.uint32)))
  ctx = method.StepContext(graphdef=graphdef, tx=tx, schedule=sched, frozen=frozen,
                           cubes=cubes, z=jnp.zeros((cfg.num_classes, 1)), train_idx=train_idx,
                           train_labels=labels,
                           to_device=jax.device_put, width=w, patch_size=cfg.patch_size,
                           batch_size=stage.batch_size, num_modalities=2, mesh=None,
                           log=lambda s: None)
  run = stage.step(ctx)
  for rows in sampler.epoch(0):
    state, metrics = run(state, rows, labels[rows])
  final = nnx.merge(graphdef, state.params, state.batch_stats)
  chex.assert_trees_all_equal(nnx.state(final, nnx.Param), nnx.state(net, nnx.Param))

  out = nnx.jit(lambda m, cubes, idx: m.outputs(steps.gather_batch(cubes, idx, w, r * 2 + 1)))(
      final, cubes, jax.device_put(train_idx))
  heads = np.stack([out.logits_spatial, out.logits_spectral, out.logits_lidar], 1)  # (N, 3, C)
  want = sal2rn.decision_weights(heads.argmax(-1), labels, cfg.num_classes)
  np.testing.assert_array_equal(np.asarray(final.decision_weights[...]), want)
  fused = np.einsum("kc,nkc->nc", want, heads)
  assert_close(out.logits, fused, "fused logits")
  np.testing.assert_allclose(float(metrics["train_oa"]), np.mean(fused.argmax(-1) == labels),
                             atol=1e-6)
  restored = stage.restore(saved, frozen)
  chex.assert_trees_all_equal_shapes_and_dtypes(nnx.state(restored), nnx.state(final))


def test_check_and_config_for():
  def shapes(bands=(111, 1), raw=(63, 1), patch=11):
    return method.Shapes(bands=bands, num_classes=6, patch_size=patch,
                         modalities=("HSI", "SAR", "LiDAR")[:len(bands)], text_dim=0,
                         raw_bands=raw)

  assert sal2rn.METHOD.check(shapes()) is None
  assert "two modalities" in sal2rn.METHOD.check(shapes((111, 4, 1), (63, 4, 1)))
  assert "9 to 13" in sal2rn.METHOD.check(shapes(patch=15))
  assert "raw+N" in sal2rn.METHOD.check(shapes(bands=(63, 1)))  # pca: raw
  assert "raw+N" in sal2rn.METHOD.check(shapes(bands=(48, 1)))  # pca: 48
  cfg = sal2rn.config_for(shapes())
  assert (cfg.spectral_bands, cfg.pca_bands, cfg.spatial_features) == (63, 48, 1024)
  with pytest.raises(errors.UserError, match="raw\\+N"):
    sal2rn.config_for(shapes(bands=(63, 1)))
