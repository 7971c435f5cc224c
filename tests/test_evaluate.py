"""Tests for evaluate.py: metrics, padded fixed-batch inference, reports."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmamba_jax import evaluate


def ref_kappa(y, p, c):
  n = len(y)
  po = np.mean(y == p)
  pe = sum(np.sum(y == k) * np.sum(p == k) for k in range(c)) / n**2
  return (po - pe) / (1 - pe)


def test_confusion_and_scores_against_reference():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, 500)
  p = np.where(rng.uniform(size=500) < 0.7, y, rng.integers(0, 4, 500))
  conf = evaluate.confusion_matrix(y, p, 4)
  assert conf.sum() == 500 and conf[1, 2] == np.sum((y == 1) & (p == 2))
  s = evaluate.scores(conf)
  assert s["OA"] == pytest.approx(100 * np.mean(y == p))
  per = [100 * np.mean(p[y == k] == k) for k in range(4)]
  np.testing.assert_allclose(s["per_class"], per)
  assert s["AA"] == pytest.approx(np.mean(per))
  assert s["kappa"] == pytest.approx(100 * ref_kappa(y, p, 4))
  assert s["confusion"] == conf.tolist()


def test_scores_hand_example_and_absent_class():
  conf = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 5]])
  s = evaluate.scores(conf)
  assert s["OA"] == pytest.approx(80.0)
  assert s["per_class"][1] is None  # no test pixel of class 1: left out of AA
  assert s["AA"] == pytest.approx(100 * (0.75 + 5 / 6) / 2)
  perfect = evaluate.scores(np.diag([2, 3]))
  assert (perfect["OA"], perfect["AA"], perfect["kappa"]) == (100.0, 100.0, 100.0)
  with pytest.raises(ValueError):
    evaluate.confusion_matrix([0, 5], [0, 1], 3)


def test_predict_pixels_pads_last_batch_one_compile():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def fake_predict(params, rest, cubes, z, idx, mask):
    # "prediction" = (index + number of present modalities) mod 5
    return ((idx + mask.sum(1).astype(jnp.int32)) % 5).astype(jnp.int32)

  idx = np.arange(3, 3 + 23, dtype=np.int32)  # 23 = 2 full batches of 8 + 7
  out = evaluate.predict_pixels(fake_predict, None, None, None, None, idx, None, 2, batch=8)
  np.testing.assert_array_equal(out, (idx + 2) % 5)
  out = evaluate.predict_pixels(fake_predict, None, None, None, None, idx,
                                np.array([0, 1], np.float32), 2, batch=8)
  np.testing.assert_array_equal(out, (idx + 1) % 5)
  assert evaluate.predict_pixels(fake_predict, None, None, None, None, idx[:0], None, 2,
                                 batch=8).shape == (0,)


def _metrics(oa, seed=0):
  entry = {"OA": oa, "AA": oa - 1, "kappa": oa - 2, "per_class": [oa, None],
           "confusion": [[1, 0], [0, 1]]}
  return {"dataset": "trento", "seed": seed, "text_encoder": "minilm",
          "epochs": {"pretrain": 1, "distill": 1},
          "student": {"complete": entry, "without:HSI": entry, "without:LiDAR": entry},
          "teacher": {"complete": entry, "without:HSI": entry, "without:LiDAR": entry},
          "wall_time_s": {"pretrain": 1.0, "distill": 2.0, "evaluate": 3.0}}


def test_markdown_table_layout():
  md = evaluate.markdown_table(_metrics(90.0), ("HSI", "LiDAR"))
  lines = md.strip().splitlines()
  assert lines[0].startswith("| Method | Training Modalities | Testing Modalities | OA(%)")
  rows = lines[2:]
  assert len(rows) == 6
  assert rows[0] == ("| Baseline (teacher, zero-filled) | HSI, LiDAR | LiDAR | 90.00 | 89.00 | "
                     "88.00 |")
  assert "| DPMamba (student) | HSI, LiDAR | HSI, LiDAR |" in rows[-1]


def test_summarize_runs_mean_std():
  s = evaluate.summarize_runs([_metrics(90.0, 0), _metrics(92.0, 1)])
  assert s["seeds"] == [0, 1]
  assert s["student"]["complete"]["OA"] == {"mean": 91.0, "std": pytest.approx(np.sqrt(2.0))}
  assert s["student"]["complete"]["per_class"][1] == {"mean": None, "std": None}
  assert s["wall_time_s"]["evaluate"] == 6.0
  md = evaluate.markdown_table(s, ("HSI", "LiDAR"))
  assert "91.00 ± 1.41" in md


def test_test_pixels_subsample_fixed_per_seed():
  import types
  split = types.SimpleNamespace(test_idx=np.arange(0, 5000, 5, dtype=np.int32))  # 1000 pixels
  rd = lambda n, seed: types.SimpleNamespace(split=split, cfg=types.SimpleNamespace(
      eval_subsample=n, seed=seed))
  np.testing.assert_array_equal(evaluate.test_pixels(rd(0, 0)), split.test_idx)
  np.testing.assert_array_equal(evaluate.test_pixels(rd(5000, 0)), split.test_idx)
  a, b, c = (evaluate.test_pixels(rd(300, s)) for s in (0, 0, 1))
  assert a.size == 300 and np.unique(a).size == 300 and np.all(np.diff(a) > 0)
  assert np.isin(a, split.test_idx).all()
  np.testing.assert_array_equal(a, b)  # the same subset for every model of a run
  assert not np.array_equal(a, c)  # another seed, another subset
