"""HCT (peers/hct.py) against the golden vectors of the authors' PyTorch code
(peers/hct_*.npz: eval and train-mode outputs, BatchNorm updates, the CE loss)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import peer_golden
from conftest import parity_dir
from peer_golden import GoldenFile, KeyRecorder, assert_close
from flax import nnx
from jax.extend import core as jex_core

from dpmamba_jax import method
from dpmamba_jax.model.network import param_count
from dpmamba_jax.peers import hct

_FILES = peer_golden.golden_files("hct")
_IDS = [p.stem for p in _FILES] or ["missing"]


def _shell(cfg, fill=np.nan):
  """An HCT built without running its random initialisers, every variable `fill`."""
  return peer_golden.shell(lambda: hct.HCT(cfg, rngs=nnx.Rngs(0)),
                           lambda shape, dtype: np.full(shape, fill, dtype))


class Golden(GoldenFile):
  def __init__(self, path):
    super().__init__(path)
    self.xs = [jnp.asarray(self[f"inputs/{m}_cl"]) for m in hct.MODALITY_NAMES]
    self.batch = int(self.xs[0].shape[0])
    self.labels = jnp.asarray(self["inputs/labels"], jnp.int32)
    self.cfg = hct.HCTConfig(bands=tuple(int(x.shape[-1]) for x in self.xs),
                             num_classes=int(self.meta["classes"]),
                             patch_size=int(self.meta["patch_size"]))

  def model(self, params=None):
    """NaN everywhere, then the file's weights: a variable the importer missed shows."""
    model = _shell(self.cfg)
    hct.load_torch(model, self.params if params is None else params, self.buffers)
    return model


@pytest.fixture(scope="module", params=_FILES or [None], ids=_IDS)
def gold(request):
  if request.param is None:
    pytest.fail(f"no peers/hct_*.npz under {parity_dir()}")
  return Golden(request.param)


@pytest.fixture(scope="module")
def eval_run(gold):
  """One eval forward on five copies of the batch: both present; LiDAR dropped by keep; LiDAR
  zeroed, keep all; HSI dropped by keep; HSI zeroed, keep all."""
  b = gold.batch
  keep = jnp.repeat(jnp.asarray([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1]], jnp.float32), b,
                    axis=0)  # (5B, 2)
  zero = np.repeat(np.asarray([[1, 1], [1, 1], [1, 0], [1, 1], [0, 1]], np.float32), b, axis=0)
  xs = [jnp.concatenate([x] * 5) * zero[:, m, None, None, None] for m, x in enumerate(gold.xs)]
  model = gold.model()
  return nnx.jit(lambda m, xs, keep: m.outputs(xs, keep))(model, xs, keep)


@pytest.fixture(scope="module")
def train_run(gold):
  """A train-mode forward without a dropout key (the golden forward has every Dropout off) and
  its loss terms. (model_loss is this plus the keep mask and the key: traced in
  test_tiny_shapes_and_dropout_sites; the keep mask is the eval path's, tested on eval_run.)"""
  model = gold.model()

  def run(m):
    out = m.outputs(gold.xs, train=True)
    return out, hct.loss_terms(out, gold.labels)

  out, (total, terms) = nnx.jit(run)(model)
  return out, total, terms, model


def test_param_count_and_importer(gold):
  meta = gold.meta
  model = nnx.eval_shape(lambda: hct.HCT(gold.cfg, rngs=nnx.Rngs(0)))
  assert param_count(model) == (meta["param_count_trainable"]
                                - meta["param_count_unused_in_forward"])
  params = KeyRecorder(gold.params)
  gold.model(params=params)
  assert set(gold.params) - params.read == set(meta["params_unused_in_forward"])


def test_eval_outputs(gold, eval_run):
  full = slice(0, gold.batch)
  assert_close(eval_run.logits[full], gold["outputs/logits"], "logits")
  for i, name in enumerate(hct.MODALITY_NAMES):
    assert_close(eval_run.cls[i][full], gold[f"outputs/cls_{name}"], f"cls_{name}")
    assert_close(eval_run.head_logits[i][full], gold[f"outputs/logits_{name}_head"],
           f"logits_{name}_head")


def test_missing_modality_is_zero_filled(gold, eval_run):
  b = gold.batch
  logits = np.asarray(eval_run.logits).reshape(5, b, -1)
  np.testing.assert_allclose(logits[1], logits[2], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logits[3], logits[4], rtol=1e-6, atol=1e-6)
  assert not np.allclose(logits[0], logits[1])


def test_train_outputs(gold, train_run):
  out = train_run[0]
  assert_close(out.logits, gold["outputs/train/logits"], "train/logits")
  for i, name in enumerate(hct.MODALITY_NAMES):
    assert_close(out.cls[i], gold[f"outputs/train/cls_{name}"], f"train/cls_{name}")


def test_train_running_stats(gold, train_run):
  after = gold.group("outputs/train/bn_after/")
  ours = hct.torch_buffers(train_run[3])
  assert set(ours) == {k for k in after if not k.endswith("num_batches_tracked")}
  for name, value in ours.items():
    assert_close(value, after[name], f"bn_after/{name}")


def test_losses(gold, train_run):
  _, total, terms, *_ = train_run
  golden = gold.group("losses/")
  assert set(terms) - {"total"} == set(golden) - {"total"}
  for name, ref in golden.items():
    assert_close(terms[name], ref, f"losses/{name}")
  assert_close(total, golden["ce"], "total")


def _count_primitive(jaxpr, name):
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        if isinstance(sub, jex_core.ClosedJaxpr):
          n += _count_primitive(sub.jaxpr, name)
        elif isinstance(sub, jex_core.Jaxpr):
          n += _count_primitive(sub, name)
  return n


def test_tiny_shapes_and_dropout_sites():
  """A tiny model, traced only: band counts come from the config (their code hard-codes 8 x 28
  and 1 input channels), and a train step with a key draws one dropout mask per site: 2
  embeddings + per branch 3 per transformer layer + per branch 2 per cross-token layer."""
  cfg = hct.HCTConfig.tiny(bands=(7, 2), num_classes=4)
  model = nnx.eval_shape(lambda: hct.HCT(cfg, rngs=nnx.Rngs(0)))
  assert model.conv2d.kernel.shape == (3, 3, cfg.filters * 5, cfg.dim)
  assert model.lidar_conv.kernel.shape == (3, 3, 2, cfg.dim)
  b, p = 3, cfg.patch_size
  xs = [jax.ShapeDtypeStruct((b, p, p, c), jnp.float32) for c in cfg.bands]
  keep = jax.ShapeDtypeStruct((b, 2), jnp.float32)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32)
  graphdef, state = nnx.split(model)

  def loss(state, xs, keep, labels, key):
    return hct.model_loss(nnx.merge(graphdef, state), {}, xs, keep, labels, key)[2]

  def forward(state, xs, key):
    return nnx.merge(graphdef, state).outputs(xs, dropout_key=key).logits

  key = jax.random.key(0)
  sites = cfg.depth * (2 * 3 * cfg.enc_depth + 2 * 2 * cfg.ct_depth) + 2
  jaxpr = jax.make_jaxpr(loss)(state, xs, keep, labels, key)
  assert _count_primitive(jaxpr.jaxpr, "random_bits") == sites
  chex.assert_shape(jaxpr.out_avals[0], (b, cfg.num_classes))
  assert _count_primitive(jax.make_jaxpr(forward)(state, xs, key).jaxpr, "random_bits") == 0


def test_dropout_masks_and_rescales():
  x = jnp.ones((200, 50), jnp.float32)
  y = np.asarray(hct._dropout(x, 0.1, jax.random.key(0, impl="rbg")))  # rbg: fast to compile
  np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.9], rtol=1e-6)
  assert abs((y == 0).mean() - 0.1) < 0.02
  assert hct._dropout(x, 0.1, None) is x


def test_config_and_check_refuse_what_the_model_cannot_take():
  with pytest.raises(ValueError, match="two modalities"):
    hct.HCTConfig(bands=(30, 1, 1), num_classes=3)
  with pytest.raises(ValueError, match="3 HSI bands"):
    hct.HCTConfig(bands=(2, 1), num_classes=3)
  with pytest.raises(ValueError, match="at least 5"):
    hct.HCTConfig(bands=(30, 1), num_classes=3, patch_size=3)

  def shapes(bands, patch=11):
    names = ("HSI", "LiDAR", "SAR")[:len(bands)]
    return method.Shapes(bands=bands, num_classes=6, patch_size=patch, modalities=names,
                         text_dim=8)

  assert hct.METHOD.check(shapes((30, 1))) is None
  assert "two modalities" in hct.METHOD.check(shapes((30, 4, 1)))
  assert "patches of at least 5" in hct.METHOD.check(shapes((30, 1), patch=3))
  assert [s.zero_filled for s in hct.METHOD.scored] == [True]
