"""Every selective-scan implementation against the float64 numpy loop and the lax.scan reference
(tests/scan_reference.py): values and gradients."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpmamba_jax import model as model_lib
from dpmamba_jax.model import conv, scan
from scan_reference import selective_scan_numpy, selective_scan_sequential


def _random_ssm(seed, bsz, p, dim, heads, n_state, a_scale=0.5):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  u = jax.random.normal(ks[0], (bsz, p * p, dim))
  x_proj = jax.random.normal(ks[1], (4, dim, heads + 2 * n_state)) / np.sqrt(dim)
  dt_bias = 0.3 * jax.random.normal(ks[2], (4, heads))
  a_log = a_scale * jax.random.normal(ks[3], (4, heads))
  d_skip = 1.0 + 0.1 * jax.random.normal(ks[4], (4, dim))
  return u, x_proj, dt_bias, a_log, d_skip


CASES = [  # (B, P, D, heads R, N)
    (2, 3, 8, 2, 1),
    (1, 4, 8, 4, 3),  # even P: paths 2/3 are not reversals of 0/1
    (3, 5, 4, 1, 2),
    (2, 1, 4, 2, 1),
    (1, 6, 16, 4, 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["recurrent"])
@pytest.mark.parametrize("bsz,p,dim,heads,n_state", CASES)
def test_fast_impls_match_numpy(bsz, p, dim, heads, n_state, impl):
  args = _random_ssm(p, bsz, p, dim, heads, n_state)
  paths = scan.zigzag_paths(p)
  ref = selective_scan_numpy(*[np.asarray(a) for a in args], paths)
  with jax.default_matmul_precision("highest"):
    y = jax.jit(lambda *a: scan.selective_scan(*a, paths, impl=impl))(*args)
  chex.assert_shape(y, (bsz, p * p, dim))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.slow
def test_recurrent_any_permutation_paths_and_no_retrace():
  # the recurrent form needs no row/column structure: arbitrary permutations work
  perm = np.stack([np.random.default_rng(k).permutation(16) for k in range(4)]).astype(np.int32)
  args = _random_ssm(5, 3, 4, 8, 2, 2)
  ref = selective_scan_numpy(*[np.asarray(a) for a in args], perm)
  f = jax.jit(chex.assert_max_traces(
      lambda *a: scan.selective_scan(*a, perm, impl="recurrent"), n=1))
  with jax.default_matmul_precision("highest"):
    y = f(*args)
    y2 = f(*[a + 0.0 for a in args])
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))


def test_paths_must_be_permutations():
  # the recurrent VJP relies on every direction visiting every token exactly once
  bad = np.stack([np.arange(9), np.r_[np.arange(8), 0]]).astype(np.int32)
  with pytest.raises(ValueError, match="permutation"):
    scan.inverse_paths(bad)


@pytest.mark.slow
@pytest.mark.parametrize("bsz,p,dim,heads,n_state", [(2, 3, 8, 2, 1), (1, 4, 8, 4, 2)])
def test_all_impls_same_gradients(bsz, p, dim, heads, n_state):
  args = _random_ssm(7 + p, bsz, p, dim, heads, n_state)
  paths = scan.zigzag_paths(p)
  w = jax.random.normal(jax.random.PRNGKey(1), (bsz, p * p, dim))

  def grads(impl):
    fn = ((lambda *a: selective_scan_sequential(*a, paths)) if impl == "sequential"
          else (lambda *a: scan.selective_scan(*a, paths, impl=impl)))
    loss = lambda *a: jnp.sum(w * jnp.tanh(fn(*a)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)

  with jax.default_matmul_precision("highest"):
    ref = grads("sequential")
    for impl in ("associative", "recurrent"):
      chex.assert_trees_all_close(grads(impl), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("p", [3, 4])
@pytest.mark.parametrize("kept_max_bytes", [0, 1 << 30])
def test_recurrent_vjp_recomputed_states_same_gradients(p, kept_max_bytes, monkeypatch):
  # states kept per segment (threshold 0: the backward recomputes them) or all kept: both are
  # the sequential scan's gradients, and the forward keeps L / S or L states
  monkeypatch.setattr(scan, "SCAN_STATES_KEPT_MAX_BYTES", kept_max_bytes)
  bsz, dim, heads, n_state = 2, 8, 2, 2
  args = _random_ssm(11 + p, bsz, p, dim, heads, n_state)
  paths = scan.zigzag_paths(p)
  w = jax.random.normal(jax.random.PRNGKey(2), (bsz, p * p, dim))
  scans = {"sequential": lambda *a: selective_scan_sequential(*a, paths),
           "recurrent": lambda *a: scan.selective_scan(*a, paths, impl="recurrent")}
  loss = lambda impl: lambda *a: jnp.sum(w * jnp.tanh(scans[impl](*a)))
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(jax.grad(loss("sequential"), argnums=(0, 1, 2, 3, 4)))(*args)
    fast = jax.jit(jax.grad(loss("recurrent"), argnums=(0, 1, 2, 3, 4)))(*args)
    _, vjp = jax.vjp(lambda *a: scan.selective_scan(*a, paths, impl="recurrent"), *args)
  chex.assert_trees_all_close(fast, ref, rtol=1e-4, atol=1e-4)
  kept = {x.shape[0] for x in jax.tree_util.tree_leaves(vjp) if x.ndim == 6}
  assert kept == ({p} if kept_max_bytes == 0 else {p * p}), kept


def test_state_segment_length():
  assert [scan.state_segment_length(n) for n in (81, 121, 225, 12, 7, 1)] == [9, 11, 15, 4, 7, 1]


def test_resolve_impl():
  want = "recurrent" if jax.default_backend() == "cpu" else "associative"
  assert scan.resolve_impl("auto") == want
  assert scan.resolve_impl("associative") == "associative"
  with pytest.raises(ValueError, match="scan impl"):
    scan.resolve_impl("fast")


@pytest.mark.slow
def test_model_outputs_agree_across_impls():
  cfg = model_lib.ModelConfig.tiny(depth=1, hidden=8, out_dim=8)
  xs = [jax.random.normal(jax.random.PRNGKey(m), (3, 5, 5, b)) for m, b in enumerate(cfg.bands)]
  state = nnx.state(model_lib.DPMamba(cfg, rngs=nnx.Rngs(0)))
  outs = {}
  with jax.default_matmul_precision("highest"):
    for impl in ("associative", "recurrent"):
      model = model_lib.DPMamba(cfg.replace(scan_impl=impl), rngs=nnx.Rngs(0))
      outs[impl] = model_lib.make_forward(model)(state, xs, None)
  chex.assert_trees_all_close(outs["recurrent"], outs["associative"], rtol=1e-4, atol=1e-5)


# (16, 32, 32) and (32, 32, 32): the kernel gradient runs over several channel chunks
@pytest.mark.slow
@pytest.mark.parametrize("groups,cin,cout", [(4, 8, 8), (8, 8, 8), (2, 4, 6), (16, 32, 32),
                                             (32, 32, 32), (6, 6, 12)])
def test_shift_grouped_conv_matches_lax_grouped_conv(groups, cin, cout):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(groups), 3)
  x = jax.random.normal(kx, (2, 5, 4, cin))
  kernel = jax.random.normal(kk, (3, 3, cin // groups, cout))
  w = jax.random.normal(kg, (2, 5, 4, cout))

  def ref(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)

  new = lambda x, k: conv._grouped_conv3x3(x, k, groups)
  # the token-major layout of the blocks: (H, W, B, C) in and out
  hwnc = lambda x, k: jnp.transpose(conv._grouped_conv3x3(
      jnp.transpose(x, (1, 2, 0, 3)), k, groups, "HWNC"), (2, 0, 1, 3))
  loss = lambda f: (lambda x, k: jnp.sum(w * f(x, k)))
  with jax.default_matmul_precision("highest"):
    chex.assert_trees_all_close(jax.jit(hwnc)(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss(hwnc), argnums=(0, 1)))(x, kernel),
                                jax.grad(loss(ref), argnums=(0, 1))(x, kernel),
                                rtol=1e-4, atol=1e-4)
  with jax.default_matmul_precision("highest"):
    chex.assert_trees_all_close(jax.jit(new)(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss(new), argnums=(0, 1)))(x, kernel),
                                jax.grad(loss(ref), argnums=(0, 1))(x, kernel),
                                rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["associative", "recurrent"])
def test_time_major_matches_batch_major(impl):
  """The blocks call the scan time-major, (L, B, D); values and gradients equal (B, L, D)."""
  args = _random_ssm(11, 3, 5, 8, 2, 1)
  paths = scan.zigzag_paths(5)
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 25, 8))

  def loss(u, *rest, time_major):
    if time_major:
      y = jnp.swapaxes(scan.selective_scan(jnp.swapaxes(u, 0, 1), *rest, paths, impl=impl,
                                           time_major=True), 0, 1)
    else:
      y = scan.selective_scan(u, *rest, paths, impl=impl)
    return jnp.sum(w * jnp.tanh(y))

  with jax.default_matmul_precision("highest"):
    got = jax.jit(jax.value_and_grad(lambda *a: loss(*a, time_major=True),
                                     argnums=(0, 1, 2, 3, 4)))(*args)
    want = jax.jit(jax.value_and_grad(lambda *a: loss(*a, time_major=False),
                                      argnums=(0, 1, 2, 3, 4)))(*args)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
