"""Tests for masks.py: candidate order, stratified shuffled sampling, evaluation scenarios."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmamba_jax import masks


def test_candidate_order_m2_m3():
  np.testing.assert_array_equal(masks.candidate_masks(2), [[1, 1], [0, 1], [1, 0]])
  np.testing.assert_array_equal(
      masks.candidate_masks(3),
      [[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_candidates_are_all_nonempty_subsets(m):
  c = masks.candidate_masks(m)
  assert c.shape == (2**m - 1, m) and c.dtype == np.float32
  rows = {tuple(r) for r in c.astype(int)}
  want = {r for r in itertools.product((0, 1), repeat=m) if any(r)}
  assert rows == want
  zeros = (c == 0).sum(1)
  assert np.all(np.diff(zeros) >= 0)  # ordered by number of missing modalities


@pytest.mark.parametrize("b,m,counts", [(120, 2, [40, 40, 40]), (150, 2, [50, 50, 50]),
                                        (140, 2, [47, 47, 46]), (140, 3, [20] * 7),
                                        (10, 3, [2, 2, 2, 1, 1, 1, 1])])
def test_sample_masks_stratified(b, m, counts):
  cands = masks.candidate_masks(m)
  out = np.asarray(masks.sample_masks(jax.random.PRNGKey(3), b, m))
  chex.assert_shape(out, (b, m))
  got = [int(np.all(out == row, axis=1).sum()) for row in cands]
  assert got == counts


def test_sample_masks_shuffled_and_keyed():
  a = np.asarray(masks.sample_masks(jax.random.PRNGKey(0), 120, 2))
  b = np.asarray(masks.sample_masks(jax.random.PRNGKey(1), 120, 2))
  a2 = np.asarray(masks.sample_masks(jax.random.PRNGKey(0), 120, 2))
  np.testing.assert_array_equal(a, a2)
  assert not np.array_equal(a, b)
  assert not np.array_equal(a, masks.tiled_masks(120, 2))  # not left in tiled order


def test_sample_masks_jit_one_trace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(key):
    return masks.sample_masks(key, 24, 2)
  for i in range(3):
    out = f(jax.random.PRNGKey(i))
    assert float(jnp.min(out.sum(1))) >= 1.0  # never all-missing


def test_eval_scenarios():
  s2 = masks.eval_scenarios(("HSI", "LiDAR"))
  assert [n for n, _ in s2] == ["complete", "without:HSI", "without:LiDAR"]
  assert s2[0][1] is None
  np.testing.assert_array_equal(s2[1][1], [0, 1])
  s3 = masks.eval_scenarios(("HSI", "SAR", "LiDAR"))
  assert [n for n, _ in s3] == ["complete", "without:HSI", "without:SAR", "without:LiDAR",
                                "without:HSI+SAR", "without:HSI+LiDAR", "without:SAR+LiDAR"]
  assert masks.scenario_file_stem("without:HSI+SAR") == "without-HSI+SAR"
