"""Zigzag paths and the selective SSM: the implementations vs a lax.scan reference and a numpy
loop (tests/scan_reference.py)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmamba_jax.model import scan
from scan_reference import (linear_recurrence_sequential, selective_scan_numpy,
                            selective_scan_sequential)


def test_zigzag_n3_example():
  # spec §2.7 / parity README §4
  np.testing.assert_array_equal(scan.zigzag_paths(3), [
      [0, 1, 2, 5, 4, 3, 6, 7, 8],
      [0, 3, 6, 7, 4, 1, 2, 5, 8],
      [8, 7, 6, 3, 4, 5, 2, 1, 0],
      [8, 5, 2, 1, 4, 7, 6, 3, 0]])


@pytest.mark.parametrize("p", [1, 2, 4, 5, 8, 9])
def test_zigzag_properties(p):
  paths = scan.zigzag_paths(p)
  chex.assert_shape(paths, (4, p * p))
  assert paths.dtype == np.int32
  for k in range(4):
    assert sorted(paths[k].tolist()) == list(range(p * p))  # a permutation
    # consecutive pixels are 4-neighbours (a snake never jumps)
    r, c = np.divmod(paths[k], p)
    assert np.all(np.abs(np.diff(r)) + np.abs(np.diff(c)) == 1)
  inv = scan.inverse_paths(paths)
  for k in range(4):
    np.testing.assert_array_equal(inv[k][paths[k]], np.arange(p * p))
  if p % 2 == 1:  # odd P: paths 2/3 reverse paths 0/1, and the centre is in the middle
    np.testing.assert_array_equal(paths[2], paths[0][::-1])
    np.testing.assert_array_equal(paths[3], paths[1][::-1])
    assert np.all(paths[:, (p * p - 1) // 2] == (p * p - 1) // 2)
  elif p == 4:
    assert not np.array_equal(paths[2], paths[0][::-1])  # spec: not reversals for even N


def _random_ssm(key, bsz, p, dim, heads, n_state):
  ks = jax.random.split(key, 5)
  u = jax.random.normal(ks[0], (bsz, p * p, dim))
  x_proj = jax.random.normal(ks[1], (4, dim, heads + 2 * n_state)) / np.sqrt(dim)
  dt_bias = 0.3 * jax.random.normal(ks[2], (4, heads))
  a_log = 0.5 * jax.random.normal(ks[3], (4, heads))
  d_skip = 1.0 + 0.1 * jax.random.normal(ks[4], (4, dim))
  return u, x_proj, dt_bias, a_log, d_skip


def _jit_scan(paths, impl="associative"):
  return jax.jit(lambda *a: scan.selective_scan(*a, paths, impl=impl))


CASES = [  # (B, P, D, heads R, N)
    (2, 3, 8, 2, 1),
    (1, 4, 8, 4, 3),
    (3, 5, 4, 1, 2),
    (2, 2, 16, 4, 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("bsz,p,dim,heads,n_state", CASES)
def test_selective_scan_matches_numpy_loop(bsz, p, dim, heads, n_state):
  args = _random_ssm(jax.random.PRNGKey(bsz * 100 + p), bsz, p, dim, heads, n_state)
  paths = scan.zigzag_paths(p)
  ref = selective_scan_numpy(*[np.asarray(a) for a in args], paths)
  with jax.default_matmul_precision("highest"):
    for impl in ("associative", "sequential"):
      fn = (jax.jit(lambda *a: selective_scan_sequential(*a, paths)) if impl == "sequential"
            else _jit_scan(paths, impl))
      y = fn(*args)
      chex.assert_shape(y, (bsz, p * p, dim))
      np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_numpy_reference_single_direction_by_hand():
  # One direction, one head, N = 1, L = 2 (P = ... not needed): h0 = d0 B0 x0, h1 = e^{d1 A} h0 + d1 B1 x1.
  u = np.array([[[1.0], [2.0]]])  # (B=1, L=2, D=1)
  x_proj = np.zeros((4, 1, 3))
  x_proj[:, 0] = [0.5, 1.0, 1.0]  # z = x * [0.5, 1, 1]: dt_raw = x/2, B = C = x
  dt_bias, a_log, d_skip = np.zeros((4, 1)), np.zeros((4, 1)), np.zeros((4, 1))
  paths = np.array([[0, 1]] * 4)
  sp = lambda v: np.log1p(np.exp(v))
  d0, d1 = sp(0.5), sp(1.0)
  h0 = d0 * 1.0 * 1.0
  h1 = np.exp(-d1) * h0 + d1 * 2.0 * 2.0
  want = 4 * np.array([h0 * 1.0, h1 * 2.0])  # four identical directions, summed
  got = selective_scan_numpy(u, x_proj, dt_bias, a_log, d_skip, paths)
  np.testing.assert_allclose(got[0, :, 0], want, rtol=1e-12)
  y = _jit_scan(paths)(jnp.asarray(u, jnp.float32), x_proj, dt_bias, a_log, d_skip)
  np.testing.assert_allclose(np.asarray(y)[0, :, 0], want, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("bsz,p,dim,heads,n_state", CASES[:3])
def test_associative_and_sequential_gradients_agree(bsz, p, dim, heads, n_state):
  args = _random_ssm(jax.random.PRNGKey(7 + p), bsz, p, dim, heads, n_state)
  paths = scan.zigzag_paths(p)
  w = jax.random.normal(jax.random.PRNGKey(3), (bsz, p * p, dim))

  def grad(impl):
    fn = ((lambda *a: selective_scan_sequential(*a, paths)) if impl == "sequential"
          else (lambda *a: scan.selective_scan(*a, paths, impl=impl)))
    loss = lambda *a: jnp.sum(w * fn(*a))
    return jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*args)

  with jax.default_matmul_precision("highest"):
    ga, gs = grad("associative"), grad("sequential")
  chex.assert_trees_all_close(ga, gs, rtol=1e-4, atol=1e-5)
  assert all(float(jnp.abs(g).max()) > 0 for g in ga)  # every argument gets a gradient


class JitVariantsTest(chex.TestCase):

  # jitted only: selective_scan has no value-dependent Python branch, so running it op by op
  # (chex's without_jit variant) would check the same primitives again
  @chex.variants(with_jit=True)
  def test_variants(self):
    args = _random_ssm(jax.random.PRNGKey(0), 2, 3, 8, 2, 1)
    paths = scan.zigzag_paths(3)
    fn = self.variant(lambda *a: scan.selective_scan(*a, paths))
    with jax.default_matmul_precision("highest"):
      y = fn(*args)
    ref = selective_scan_numpy(*[np.asarray(a) for a in args], paths)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_linear_recurrence_zero_initial_state_and_bad_impl():
  a = jnp.full((1, 5), 0.5)
  b = jnp.ones((1, 5))
  h = scan.linear_recurrence(a, b, axis=1)
  np.testing.assert_allclose(np.asarray(h)[0], [1, 1.5, 1.75, 1.875, 1.9375], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(linear_recurrence_sequential(a, b, axis=1))[0],
                             [1, 1.5, 1.75, 1.875, 1.9375], rtol=1e-6)
  with pytest.raises(ValueError, match="scan impl"):
    scan.selective_scan(*_random_ssm(jax.random.PRNGKey(0), 1, 2, 4, 2, 1), scan.zigzag_paths(2),
                        impl="parallel")


@pytest.mark.slow
@pytest.mark.parametrize("axis", [1, 0])
def test_path_ops_vjps_match_autodiff(axis):
  """gather/merge carry hand-written VJPs (each other); compare with autodiff of plain gathers.

  axis 1: (B, L, D) tokens, (B, K, L, D) per direction; axis 0: (L, B, D) and (K, L, B, D).
  """
  p, bsz, dim = 4, 2, 3
  paths = scan.zigzag_paths(p)
  inv = scan.inverse_paths(paths)
  gather, merge = scan.path_ops(paths, axis=axis)
  u = jax.random.normal(jax.random.PRNGKey(0), (bsz, p * p, dim))
  y = jax.random.normal(jax.random.PRNGKey(1), (bsz, 4, p * p, dim))
  ref_gather = lambda u: jnp.take(u, jnp.asarray(paths), axis=1)  # (B, K, L, D)
  ref_merge = lambda y: jnp.take_along_axis(y, jnp.asarray(inv)[None, :, :, None], axis=2).sum(1)
  if axis == 0:  # the same references on the time-major layouts
    ref_gather0, ref_merge0 = ref_gather, ref_merge
    u, y = jnp.swapaxes(u, 0, 1), jnp.transpose(y, (1, 2, 0, 3))
    ref_gather = lambda u: jnp.transpose(ref_gather0(jnp.swapaxes(u, 0, 1)), (1, 2, 0, 3))
    ref_merge = lambda y: jnp.swapaxes(ref_merge0(jnp.transpose(y, (2, 0, 1, 3))), 0, 1)
  np.testing.assert_array_equal(gather(u), ref_gather(u))
  np.testing.assert_allclose(merge(y), ref_merge(y), rtol=1e-6)
  cy, cu = jnp.cos(y), jnp.sin(u)
  chex.assert_trees_all_close(jax.grad(lambda u: jnp.sum(cy * gather(u)))(u),
                              jax.grad(lambda u: jnp.sum(cy * ref_gather(u)))(u), rtol=1e-6)
  chex.assert_trees_all_close(jax.grad(lambda y: jnp.sum(cu * merge(y)))(y),
                              jax.grad(lambda y: jnp.sum(cu * ref_merge(y)))(y), rtol=1e-6)
  with pytest.raises(ValueError, match="permutation"):
    scan.path_ops(np.zeros((4, 9), np.int32))


@pytest.mark.slow
def test_linear_recurrence_custom_vjp_broadcast_a():
  """The associative scan's custom VJP (a reverse scan) vs autodiff through lax.scan."""
  a = jax.random.uniform(jax.random.PRNGKey(0), (2, 7, 3, 1), minval=0.2, maxval=1.0)
  b = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 3, 5))
  w = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 3, 5))
  recurrences = {"associative": scan.linear_recurrence, "sequential": linear_recurrence_sequential}
  grads = {impl: jax.jit(jax.grad(
      lambda a, b: jnp.sum(w * fn(a, b, axis=1)),
      argnums=(0, 1)))(a, b) for impl, fn in recurrences.items()}
  chex.assert_trees_all_close(grads["associative"], grads["sequential"], rtol=1e-5, atol=1e-6)
  chex.assert_shape(grads["associative"][0], a.shape)
