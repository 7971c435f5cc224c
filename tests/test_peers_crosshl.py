"""Cross-HL against the golden vectors of the authors' PyTorch code (peers/crosshl_*.npz: eval
and train-mode outputs, BatchNorm updates, the loss)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import peer_golden
from conftest import parity_dir
from peer_golden import GoldenFile, KeyRecorder, assert_close
from flax import nnx

from dpmamba_jax import method
from dpmamba_jax.model.network import param_count
from dpmamba_jax.peers import crosshl

FILES = peer_golden.golden_files("crosshl")


def _abstract(cfg):
  """(graphdef, state of ShapeDtypeStructs) of a Cross-HL, without running the random
  initialisers (their first compilation dominates a test's time)."""
  return nnx.split(nnx.eval_shape(lambda: crosshl.CrossHL(cfg, rngs=nnx.Rngs(0))))


def _shell(abstract):
  """A Cross-HL with zero-filled variables."""
  graphdef, state = abstract
  return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


class Golden(GoldenFile):
  def __init__(self, path):
    super().__init__(path)
    self.xs = [jnp.asarray(self.arrays[f"inputs/{m}_cl"]) for m in crosshl.MODALITY_NAMES]
    self.labels = jnp.asarray(self.arrays["inputs/labels"], jnp.int32)
    self.batch = int(self.xs[0].shape[0])
    self.cfg = crosshl.CrossHLConfig(
        bands=tuple(int(x.shape[-1]) for x in self.xs), num_classes=int(self.meta["classes"]),
        patch_size=int(self.meta["patch_size"]))
    self.abstract = _abstract(self.cfg)

  def model(self, params=None):
    model = _shell(self.abstract)
    crosshl.load_torch(model, self.params if params is None else params, self.buffers)
    return model

  def keep(self, row):
    return jnp.tile(jnp.asarray(row, jnp.float32)[None], (self.batch, 1))


def test_golden_files_exist():
  assert FILES, f"no peers/crosshl_*.npz under {parity_dir()}"


@pytest.fixture(scope="module", params=FILES, ids=lambda p: p.stem)
def gold(request):
  return Golden(request.param)


@nnx.jit
def _eval(model, xs, keep):
  return model.outputs(xs, keep), crosshl.classify({"model": model}, xs, keep)


@pytest.fixture(scope="module")
def eval_run(gold):
  """(model, (outputs, classify logits) of the complete batch, the parameter names read)."""
  params = KeyRecorder(gold.params)
  model = gold.model(params)
  return model, _eval(model, gold.xs, gold.keep((1, 1))), params.read


@pytest.fixture(scope="module")
def train_run(gold):
  """In one program: model_loss on one model (dropout on, from its key) and a train-mode
  forward without a key (dropout off, as in the golden forward) on another.
  -> (total, terms, logits of model_loss, outputs without dropout, model, other model)."""
  model, other = gold.model(), gold.model()
  total, terms, logits, out = nnx.jit(_train)(model, other, gold.xs, gold.keep((1, 1)),
                                              gold.labels)
  return total, terms, logits, out, model, other


def _train(model, other, xs, keep, labels):
  total, terms, logits = crosshl.model_loss(model, {}, xs, keep, labels, jax.random.key(0))
  return total, terms, logits, other.outputs(xs, keep, train=True)


def test_param_count_and_importer(gold, eval_run):
  meta = gold.meta
  model, _, read = eval_run
  assert param_count(model) == (meta["param_count_trainable"]
                                - meta["param_count_unused_in_forward"])
  assert set(gold.params) - read == set(meta["params_unused_in_forward"])
  back = crosshl.torch_params(model)
  assert set(back) == set(gold.params)
  for name, ref in gold.params.items():
    np.testing.assert_array_equal(back[name], ref, err_msg=name)


def test_groups_and_sizes_derived(gold):
  cfg, meta = gold.cfg, gold.meta
  het = meta["hetconv_groups"]
  assert (cfg.merged, cfg.groups) == (het["in_channels"], het["groupwise_conv_groups"])
  p = gold.params
  assert p["ca.layer.0.cross_hl_attention.Wq.weight"].shape[1] == cfg.pixels
  assert p["ca.layer.0.cross_hl_attention.Wv.weight"].shape[1] == cfg.tokens


def test_eval_outputs(gold, eval_run):
  _, (out, logits), _ = eval_run
  assert_close(out.logits, gold["outputs/logits"], "logits")
  assert_close(out.fused_feature, gold["outputs/fused_feature"], "fused_feature")
  assert_close(logits, gold["outputs/logits"], "classify")


def test_missing_modality_is_zero_filled(gold, eval_run):
  """classify feeds a missing modality as zeros, per sample (no golden: the method has no
  missing-modality mode)."""
  model = eval_run[0]
  rows = np.asarray([(1, 1), (1, 0), (0, 1)], np.float32)
  keep = jnp.asarray(rows[np.arange(gold.batch) % 3])
  _, mixed = _eval(model, gold.xs, keep)
  zeroed = [x * keep[:, m, None, None, None] for m, x in enumerate(gold.xs)]
  _, want = _eval(model, zeroed, gold.keep((1, 1)))
  assert_close(mixed, np.asarray(want), "zero-filled logits")
  assert not np.allclose(np.asarray(mixed)[1:3], gold["outputs/logits"][1:3], atol=1e-3)


def test_train_outputs_and_loss(gold, train_run):
  total, terms, logits, out, _, _ = train_run
  assert_close(out.logits, gold["outputs/train/logits"], "train/logits")
  assert_close(out.fused_feature, gold["outputs/train/fused_feature"], "train/fused_feature")
  ours_total, ours = crosshl.loss_terms(out, gold.labels)
  golden = gold.group("losses/")
  for name, ref in golden.items():
    assert_close(ours[name], ref, f"losses/{name}")
  assert_close(ours_total, golden.get("total", golden["ce"]), "total")
  # model_loss trains with dropout (rate 0.1, their Dropout layers): same BN path, other logits
  assert not np.allclose(logits, gold["outputs/train/logits"], atol=1e-3)
  assert set(terms) == {"ce", "total"} and float(total) == float(terms["ce"])
  assert np.isfinite(float(total))


def test_train_running_stats(gold, train_run):
  after = gold.group("outputs/train/bn_after/")
  for model in train_run[4:]:  # BatchNorm comes before every dropout
    ours = crosshl.torch_buffers(model)
    for name, value in ours.items():
      assert_close(value, after[name], f"bn_after/{name}")
    assert set(ours) == {k for k in after if not k.endswith("num_batches_tracked")}


def test_config_rules():
  # their groups rule: FM*4 // 4 if 8 * (bands - 8) is divisible by FM, else FM*4 // 8
  assert crosshl.CrossHLConfig(bands=(63, 1), num_classes=6).groups == 8
  for bands in (64, 144, 180):
    assert crosshl.CrossHLConfig(bands=(bands, 1), num_classes=6).groups == 16
  cfg = crosshl.CrossHLConfig(bands=(63, 2), num_classes=6, patch_size=7)
  assert (cfg.merged, cfg.pixels, cfg.tokens, cfg.dim, cfg.head_dim) == (440, 49, 50, 64, 8)
  with pytest.raises(ValueError, match="two modalities"):
    crosshl.CrossHLConfig(bands=(63, 4, 1), num_classes=6)
  with pytest.raises(ValueError, match="9-band"):
    crosshl.CrossHLConfig(bands=(8, 1), num_classes=6)
  with pytest.raises(ValueError, match="heads"):
    crosshl.CrossHLConfig(bands=(63, 1), num_classes=6, heads=4)

  def shapes(bands, mods):
    return method.Shapes(bands=bands, num_classes=7, patch_size=11, modalities=mods,
                         text_dim=0, raw_bands=bands)

  assert crosshl.METHOD.check(shapes((180, 4), ("HSI", "SAR"))) is None
  assert "two modalities" in crosshl.METHOD.check(shapes((180, 4, 1), ("HSI", "SAR", "LiDAR")))
  assert "Conv3d" in crosshl.METHOD.check(shapes((6, 1), ("HSI", "LiDAR")))
  assert [s.zero_filled for s in crosshl.METHOD.scored] == [True]


def test_loss_traces_under_grad(gold, eval_run):
  """model_loss traces under nnx.value_and_grad (shapes only, nothing compiled)."""
  model = eval_run[0]
  b = gold.batch

  def step(m, xs, keep, labels):
    def loss(m):
      total, terms, logits = crosshl.model_loss(m, {}, xs, keep, labels, jax.random.key(0))
      return total, (terms, logits)
    return nnx.value_and_grad(loss, has_aux=True)(m)

  (total, (_, logits)), grads = nnx.eval_shape(step, model, gold.xs, gold.keep((1, 0)),
                                               gold.labels)
  chex.assert_shape((total, logits), ((), (b, gold.cfg.num_classes)))
  assert jax.tree.structure(grads) == jax.tree.structure(nnx.state(model, nnx.Param))


def test_tiny_shapes():
  cfg = crosshl.CrossHLConfig.tiny(bands=(12, 2), num_classes=3)
  assert (cfg.groups, cfg.dim, cfg.heads) == (4, 16, 4)
  model = nnx.eval_shape(lambda: crosshl.CrossHL(cfg, rngs=nnx.Rngs(0)))
  p = cfg.patch_size
  xs = [jax.ShapeDtypeStruct((2, p, p, c), jnp.float32) for c in cfg.bands]
  out = nnx.eval_shape(lambda m, xs: m.outputs(xs), model, xs)
  chex.assert_shape((out.logits, out.fused_feature), ((2, 3), (2, 16)))
