"""Tests for evaluate.py: metrics, padded fixed-batch inference, reports."""
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpmamba_jax import data, inference, losses, metrics
from dpmamba_jax.model import DPMamba, ModelConfig
from dpmamba_jax.inference import Predictor


def ref_kappa(y, p, c):
  n = len(y)
  po = np.mean(y == p)
  pe = sum(np.sum(y == k) * np.sum(p == k) for k in range(c)) / n**2
  return (po - pe) / (1 - pe)


def test_confusion_and_scores_against_reference():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, 500)
  p = np.where(rng.uniform(size=500) < 0.7, y, rng.integers(0, 4, 500))
  conf = metrics.confusion_matrix(y, p, 4)
  assert conf.sum() == 500 and conf[1, 2] == np.sum((y == 1) & (p == 2))
  s = metrics.scores(conf)
  assert s["OA"] == pytest.approx(100 * np.mean(y == p))
  per = [100 * np.mean(p[y == k] == k) for k in range(4)]
  np.testing.assert_allclose(s["per_class"], per)
  assert s["AA"] == pytest.approx(np.mean(per))
  assert s["kappa"] == pytest.approx(100 * ref_kappa(y, p, 4))
  assert s["confusion"] == conf.tolist()


def test_scores_hand_example_and_absent_class():
  conf = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 5]])
  s = metrics.scores(conf)
  assert s["OA"] == pytest.approx(80.0)
  assert s["per_class"][1] is None  # no test pixel of class 1: left out of AA
  assert s["AA"] == pytest.approx(100 * (0.75 + 5 / 6) / 2)
  perfect = metrics.scores(np.diag([2, 3]))
  assert (perfect["OA"], perfect["AA"], perfect["kappa"]) == (100.0, 100.0, 100.0)
  with pytest.raises(ValueError):
    metrics.confusion_matrix([0, 5], [0, 1], 3)


def _tiny_predictor_setup(height, width, seed=0):
  """(model, padded cubes, z) of a tiny student on a random height x width scene."""
  cfg = ModelConfig.tiny(bands=(3, 2), patch_size=3, depth=1, hidden=8, out_dim=8, prompts=True)
  rng = np.random.default_rng(seed)
  cubes = [jnp.asarray(c) for c in data.pad_cubes(
      [rng.normal(size=(height, width, b)).astype(np.float32) for b in cfg.bands], cfg.patch_size)]
  z = jnp.asarray(rng.normal(size=(5, cfg.out_dim)).astype(np.float32))
  return DPMamba(cfg, rngs=nnx.Rngs(seed)), cubes, z


def _eval_forward(model, cubes, z, idx, width, mask_row):
  """The model's own eval-mode predictions of pixels idx (one batch, no Predictor)."""
  p = model.cfg.patch_size
  xs = [data.gather_patches(c, jnp.asarray(idx), width, p) for c in cubes]
  mask = None if mask_row is None else jnp.tile(jnp.asarray(mask_row, jnp.float32), (len(idx), 1))
  return np.asarray(losses.predict(model(xs, mask), z))


@pytest.mark.slow
def test_predict_pixels_pads_last_batch_one_compile():
  h, w = 6, 5
  model, cubes, z = _tiny_predictor_setup(h, w)
  inference._programs.cache_clear()  # Predictors of equal model graphs share programs
  predictor = Predictor(model, width=w, patch_size=3, batch=8, max_calls=1)
  idx = np.arange(3, 3 + 23, dtype=np.int32)  # 23 = 2 full batches of 8 + 7
  out = predictor.predict_pixels(cubes, z, idx, None)
  np.testing.assert_array_equal(out, _eval_forward(model, cubes, z, idx, w, None))
  assert len(set(out.tolist())) > 1  # not a constant map
  row = np.array([0, 1], np.float32)
  out = predictor.predict_pixels(cubes, z, idx, row)
  np.testing.assert_array_equal(out, _eval_forward(model, cubes, z, idx, w, row))
  assert predictor.predict_pixels(cubes, z, idx[:0], None).shape == (0,)
  assert predictor.program._cache_size() == 1  # one batch shape, every scenario


def _metrics(oa, seed=0):
  entry = {"OA": oa, "AA": oa - 1, "kappa": oa - 2, "per_class": [oa, None],
           "confusion": [[1, 0], [0, 1]]}
  return {"dataset": "trento", "seed": seed, "text_encoder": "minilm",
          "epochs": {"pretrain": 1, "distill": 1},
          "student": {"complete": entry, "without:HSI": entry, "without:LiDAR": entry},
          "teacher": {"complete": entry, "without:HSI": entry, "without:LiDAR": entry},
          "wall_time_s": {"pretrain": 1.0, "distill": 2.0, "evaluate": 3.0}}


def test_markdown_table_layout():
  md = metrics.markdown_table(_metrics(90.0), ("HSI", "LiDAR"))
  lines = md.strip().splitlines()
  assert lines[0].startswith("| Method | Training Modalities | Testing Modalities | OA(%)")
  rows = lines[2:]
  assert len(rows) == 6
  assert rows[0] == ("| Baseline (teacher, zero-filled) | HSI, LiDAR | LiDAR | 90.00 | 89.00 | "
                     "88.00 |")
  assert "| DPMamba (student) | HSI, LiDAR | HSI, LiDAR |" in rows[-1]


def test_summarize_runs_mean_std():
  s = metrics.summarize_runs([_metrics(90.0, 0), _metrics(92.0, 1)])
  assert s["seeds"] == [0, 1]
  assert s["student"]["complete"]["OA"] == {"mean": 91.0, "std": pytest.approx(np.sqrt(2.0))}
  assert s["student"]["complete"]["per_class"][1] == {"mean": None, "std": None}
  assert s["wall_time_s"]["evaluate"] == 6.0
  md = metrics.markdown_table(s, ("HSI", "LiDAR"))
  assert "91.00 ± 1.41" in md


def test_test_pixels_subsample_fixed_per_seed():
  import types
  split = types.SimpleNamespace(test_idx=np.arange(0, 5000, 5, dtype=np.int32))  # 1000 pixels
  rd = lambda n, seed: types.SimpleNamespace(split=split, cfg=types.SimpleNamespace(
      eval_subsample=n, seed=seed))
  np.testing.assert_array_equal(metrics.test_pixels(rd(0, 0)), split.test_idx)
  np.testing.assert_array_equal(metrics.test_pixels(rd(5000, 0)), split.test_idx)
  a, b, c = (metrics.test_pixels(rd(300, s)) for s in (0, 0, 1))
  assert a.size == 300 and np.unique(a).size == 300 and np.all(np.diff(a) > 0)
  assert np.isin(a, split.test_idx).all()
  np.testing.assert_array_equal(a, b)  # the same subset for every model of a run
  assert not np.array_equal(a, c)  # another seed, another subset


@pytest.mark.slow
def test_compile_side_by_side_compiles_each_models_program_once():
  h, w = 6, 5
  student, cubes, z = _tiny_predictor_setup(h, w)
  teacher_cfg = ModelConfig.tiny(bands=(3, 2), patch_size=3, depth=1, hidden=8, out_dim=8)
  teacher = DPMamba(teacher_cfg, rngs=nnx.Rngs(1))  # no prompts: another program
  rd = types.SimpleNamespace(cubes=cubes, z=z, height=h, width=w, patch_size=3,
                             inference_mesh=lambda batch: None)
  inference._programs.cache_clear()  # Predictors of equal model graphs share programs
  inference.compile_side_by_side([student, teacher], rd, batch=8)
  idx = np.arange(h * w, dtype=np.int32)
  for model in (student, teacher):
    predictor = Predictor.for_run(model, rd, 8)
    assert predictor.program._cache_size() == 1  # compiled already
    out = predictor.predict_pixels(cubes, z, idx, None)
    np.testing.assert_array_equal(out, _eval_forward(model, cubes, z, idx, w, None))
    assert predictor.program._cache_size() == 1  # and not again
