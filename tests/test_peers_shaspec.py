"""ShaSpec against the golden vectors of the authors' PyTorch code (peers/shaspec_*.npz)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peer_golden
from conftest import parity_dir
from peer_golden import GoldenFile, assert_close
from dpmamba_jax.model.network import param_count
from dpmamba_jax.peers import shaspec

FILES = peer_golden.golden_files("shaspec")


def _nchw_to_nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _shell(cfg):
  """A ShaSpec with zero-filled variables, built without running the random initialisers
  (their first compilation dominates a test's time)."""
  return peer_golden.shell(lambda: shaspec.ShaSpec(cfg, rngs=nnx.Rngs(0)))


class Golden(GoldenFile):
  def __init__(self, path):
    super().__init__(path)
    self.xs = [jnp.asarray(self.arrays[f"inputs/{m}_cl"]) for m in shaspec.MODALITY_NAMES]
    self.labels = jnp.asarray(self.arrays["inputs/labels"])
    self.cfg = shaspec.ShaSpecConfig(
        bands=tuple(int(x.shape[-1]) for x in self.xs), num_classes=int(self.meta["classes"]),
        patch_size=int(self.meta["patch_size"]))

  def model(self):
    model = _shell(self.cfg)
    shaspec.load_torch(model, self.params, self.buffers)
    return model


def test_golden_files_exist():
  assert FILES, f"no peers/shaspec_*.npz under {parity_dir()}"


@pytest.fixture(scope="module", params=FILES, ids=lambda p: p.stem)
def gold(request):
  return Golden(request.param)


@pytest.fixture(scope="module")
def eval_out(gold):
  """One eval forward on the batch three times: both present, LiDAR missing, HSI missing."""
  b = gold.xs[0].shape[0]
  keep = jnp.repeat(jnp.asarray([[1, 1], [1, 0], [0, 1]], jnp.float32), b, axis=0)  # (3B, 2)
  xs = [jnp.concatenate([x] * 3) for x in gold.xs]
  model = gold.model()
  out = nnx.jit(lambda m, xs, k: m.outputs(xs, k))(model, xs, keep)
  logits = nnx.jit(shaspec.classify)({"model": model}, xs, keep)
  return out, logits, b, model


@pytest.fixture(scope="module")
def train_run(gold):
  """model_loss with the drawn keep mask: its value, terms, gradient and the model after it."""
  keep = jnp.asarray(gold["inputs/train_drop_mask"])
  model = gold.model()

  def loss(m):
    total, terms, logits = shaspec.model_loss(m, {}, gold.xs, keep, gold.labels,
                                              jax.random.key(0))
    return total, (terms, logits)

  (total, (terms, logits)), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  grads_named = shaspec.torch_params(nnx.merge(graphdef, grads, rest))
  out = nnx.jit(lambda m: m.outputs(gold.xs, keep, train=True))(gold.model())
  return total, terms, logits, grads_named, model, out


@pytest.mark.slow
def test_param_count(gold, eval_out):
  model = eval_out[3]
  meta = gold.meta
  assert param_count(model) == (meta["param_count_trainable"]
                                - meta["param_count_unused_in_forward"])
  names = set(shaspec.torch_params(model))
  assert names == set(gold.params) - set(meta["params_without_grad"])


def test_eval_outputs(gold, eval_out):
  out, _, b, _ = eval_out
  full = slice(0, b)
  assert_close(out.logits[full], gold["outputs/logits"], "logits")
  assert_close(out.fused_feature[full], gold["outputs/fused_feature"], "fused_feature")
  # the 3B-sample batch stacks [HSI of all 3B; LiDAR of all 3B]; take the first B of each
  n = 3 * b
  mod = jnp.concatenate([out.modality_logits[:b], out.modality_logits[n:n + b]])
  assert_close(mod, gold["outputs/modality_logits"], "modality_logits")
  pooled = jnp.concatenate([out.specific_pooled[:b], out.specific_pooled[n:n + b]])
  assert_close(pooled, gold["outputs/specific_pooled_feature"], "specific_pooled_feature")
  labels = jnp.concatenate([out.modality_labels[:b], out.modality_labels[n:n + b]])
  np.testing.assert_array_equal(labels, gold["outputs/modality_labels"])
  for i, name in enumerate(shaspec.MODALITY_NAMES):
    assert_close(out.specific[i][full], _nchw_to_nhwc(gold[f"outputs/{name}_specific_feature"]),
           f"{name}_specific_feature")
    assert_close(out.shared[i][full], _nchw_to_nhwc(gold[f"outputs/{name}_shared_feature"]),
           f"{name}_shared_feature")
    assert_close(out.unimodal_logits[i][full], gold[f"outputs/logits_{name}_head"],
           f"logits_{name}_head")


@pytest.mark.parametrize("scenario,row", [("missing_lidar", 1), ("missing_hsi", 2)])
def test_missing_modality(gold, eval_out, scenario, row):
  out, logits, b, _ = eval_out
  rows = slice(row * b, (row + 1) * b)
  assert_close(out.logits[rows], gold[f"outputs/{scenario}/logits"], f"{scenario}/logits")
  assert_close(out.fused_feature[rows], gold[f"outputs/{scenario}/fused_feature"],
         f"{scenario}/fused_feature")
  chex.assert_trees_all_close(logits, out.logits)


@pytest.mark.slow
def test_train_outputs(gold, train_run):
  _, _, logits, _, _, out = train_run
  assert_close(logits, gold["outputs/train/logits"], "train/logits (model_loss)")
  assert_close(out.logits, gold["outputs/train/logits"], "train/logits")
  assert_close(out.fused_feature, gold["outputs/train/fused_feature"], "train/fused_feature")
  assert_close(out.modality_logits, gold["outputs/train/modality_logits"], "train/modality_logits")
  for i, name in enumerate(shaspec.MODALITY_NAMES):
    assert_close(out.shared[i], _nchw_to_nhwc(gold[f"outputs/train/{name}_shared_feature"]),
           f"train/{name}_shared_feature")
    assert_close(out.unimodal_logits[i], gold[f"outputs/train/logits_{name}_head"],
           f"train/logits_{name}_head")


def test_train_running_stats(gold, train_run):
  model = train_run[4]
  after = gold.group("outputs/train/bn_after/")
  ours = shaspec.torch_buffers(model)
  for name, value in ours.items():
    assert_close(value, after[name], f"bn_after/{name}")
  unused = {k for k in after if k.startswith("modality_2_transfer.")
            or k.endswith("num_batches_tracked")}
  assert set(ours) == set(after) - unused


def test_losses(gold, train_run):
  total, terms, *_ = train_run
  golden = gold.group("losses/")
  golden["unimodal_total"] = golden.pop("unimodal_total_coef0")
  assert set(terms) == set(golden)
  for name, ref in golden.items():
    assert_close(terms[name], ref, f"losses/{name}")
  assert_close(total, golden["total"], "total")


def test_grads(gold, train_run):
  grads = train_run[3]
  golden = gold.group("grads/")
  for name in gold.meta["params_without_grad"]:
    assert not np.any(golden.pop(name))
  assert set(grads) == set(golden)
  for name, ref in golden.items():
    assert_close(grads[name], ref, f"grads/{name}")


def test_draw_keep():
  keep = np.asarray(shaspec.draw_keep(jax.random.key(1), 3000, 2))
  chex.assert_shape(keep, (3000, 2))
  assert keep.dtype == np.float32 and keep.sum(axis=1).min() == 1
  patterns, counts = np.unique(keep, axis=0, return_counts=True)
  np.testing.assert_array_equal(patterns, [[0, 1], [1, 0], [1, 1]])
  np.testing.assert_allclose(counts / 3000, 1 / 3, atol=0.04)
  assert len(np.unique(np.asarray(shaspec.draw_keep(jax.random.key(2), 2000, 3)), axis=0)) == 7


def test_tiny_projected_first_modality():
  """A tiny model whose first modality has fewer bands: the projector serves modality 0."""
  cfg = shaspec.ShaSpecConfig.tiny(bands=(1, 5), num_classes=4)
  model = _shell(cfg)
  rng = np.random.default_rng(3)  # numpy: eager jax.random compiles once per shape
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  noisy = [jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]
  nnx.update(model, jax.tree.unflatten(treedef, noisy))
  chex.assert_shape(model.projector.kernel[...], (1, 1, 1, 5))
  b, p = 4, cfg.patch_size
  xs = [jnp.asarray(rng.standard_normal((b, p, p, c)), jnp.float32) for c in cfg.bands]
  keep = jnp.asarray([[1, 1], [1, 0], [0, 1], [1, 1]], jnp.float32)
  labels = jnp.arange(b) % cfg.num_classes
  total, terms, logits = nnx.jit(shaspec.model_loss)(model, {}, xs, keep, labels,
                                                     jax.random.key(0))
  chex.assert_shape(logits, (b, cfg.num_classes))
  assert np.isfinite(float(total)) and float(terms["total"]) == float(total)
  with pytest.raises(ValueError):
    shaspec.ShaSpecConfig(bands=(5, 1, 1), num_classes=3)
