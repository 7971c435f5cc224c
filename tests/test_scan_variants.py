"""Every selective-scan implementation against the float64 numpy loop: values and gradients."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpmamba_jax import model as model_lib
from dpmamba_jax import scan
from dpmamba_jax import ssd_chunked

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


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
@pytest.mark.parametrize("bsz,p,dim,heads,n_state", CASES)
def test_fast_impls_match_numpy(bsz, p, dim, heads, n_state, impl):
  args = _random_ssm(p, bsz, p, dim, heads, n_state)
  paths = scan.zigzag_paths(p)
  assert ssd_chunked.supports(paths)
  ref = scan.selective_scan_numpy(*[np.asarray(a) for a in args], paths)
  with jax.default_matmul_precision("highest"):
    y = jax.jit(lambda *a: scan.selective_scan(*a, paths, impl=impl))(*args)
  chex.assert_shape(y, (bsz, p * p, dim))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=2e-5)


def test_recurrent_any_permutation_paths_and_no_retrace():
  # the recurrent form needs no row/column structure: arbitrary permutations work
  perm = np.stack([np.random.default_rng(k).permutation(16) for k in range(4)]).astype(np.int32)
  args = _random_ssm(5, 3, 4, 8, 2, 2)
  ref = scan.selective_scan_numpy(*[np.asarray(a) for a in args], perm)
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


@pytest.mark.parametrize("bsz,p,dim,heads,n_state", [(2, 3, 8, 2, 1), (1, 4, 8, 4, 2)])
def test_all_impls_same_gradients(bsz, p, dim, heads, n_state):
  args = _random_ssm(7 + p, bsz, p, dim, heads, n_state)
  paths = scan.zigzag_paths(p)
  w = jax.random.normal(jax.random.PRNGKey(1), (bsz, p * p, dim))

  def grads(impl):
    loss = lambda *a: jnp.sum(w * jnp.tanh(scan.selective_scan(*a, paths, impl=impl)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)

  with jax.default_matmul_precision("highest"):
    ref = grads("sequential")
    for impl in ("associative", "chunked", "recurrent"):
      chex.assert_trees_all_close(grads(impl), ref, rtol=1e-4, atol=1e-4)


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
  loss = lambda impl: lambda *a: jnp.sum(
      w * jnp.tanh(scan.selective_scan(*a, paths, impl=impl)))
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(jax.grad(loss("sequential"), argnums=(0, 1, 2, 3, 4)))(*args)
    fast = jax.jit(jax.grad(loss("recurrent"), argnums=(0, 1, 2, 3, 4)))(*args)
    _, vjp = jax.vjp(lambda *a: scan.selective_scan(*a, paths, impl="recurrent"), *args)
  chex.assert_trees_all_close(fast, ref, rtol=1e-4, atol=1e-4)
  kept = {x.shape[0] for x in jax.tree_util.tree_leaves(vjp) if x.ndim == 6}
  assert kept == ({p} if kept_max_bytes == 0 else {p * p}), kept


def test_state_segment_length():
  assert [scan.state_segment_length(n) for n in (81, 121, 225, 12, 7, 1)] == [9, 11, 15, 4, 7, 1]


def test_chunked_strong_decay_is_finite_and_exact():
  # A = -exp(3) ~ -20: in-chunk exp(-cum) would overflow; the masked segment sums must not.
  args = _random_ssm(3, 2, 5, 8, 2, 1, a_scale=0.0)
  args = args[:3] + (jnp.full((4, 2), 3.0),) + args[4:]
  paths = scan.zigzag_paths(5)
  ref = scan.selective_scan_numpy(*[np.asarray(a) for a in args], paths)
  f = lambda *a: scan.selective_scan(*a, paths, impl="chunked")
  with jax.default_matmul_precision("highest"):
    y = jax.jit(f)(*args)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 3)))(*args)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=2e-5)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


def test_line_structure_and_fallback():
  orient, chunk_line, line_chunk, order = ssd_chunked.line_structure(scan.zigzag_paths(3))
  np.testing.assert_array_equal(orient, [0, 1, 0, 1])
  np.testing.assert_array_equal(chunk_line[2], [2, 1, 0])  # path 2 starts at the bottom row
  np.testing.assert_array_equal(order[0, 1], [2, 1, 0])  # row 1 is walked right to left
  np.testing.assert_array_equal(line_chunk[2][chunk_line[2]], np.arange(3))
  # paths whose chunks are not rows/columns: "chunked" falls back to the associative scan
  perm = np.stack([np.random.default_rng(k).permutation(9) for k in range(4)]).astype(np.int32)
  assert not ssd_chunked.supports(perm)
  assert scan.resolve_impl("chunked", perm) == "associative"
  with pytest.raises(ValueError, match="rows/columns"):
    ssd_chunked.selective_scan_chunked(*_random_ssm(0, 1, 3, 4, 2, 1), perm)
  args = _random_ssm(1, 2, 3, 4, 2, 1)
  ref = scan.selective_scan_numpy(*[np.asarray(a) for a in args], perm)
  with jax.default_matmul_precision("highest"):
    y = scan.selective_scan(*args, perm, impl="chunked")
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=2e-5)


def test_resolve_impl():
  want = "recurrent" if jax.default_backend() == "cpu" else "associative"
  assert scan.resolve_impl("auto", scan.zigzag_paths(5)) == want
  assert scan.resolve_impl("associative") == "associative"
  with pytest.raises(ValueError, match="scan impl"):
    scan.resolve_impl("fast")


def test_model_outputs_agree_across_impls():
  cfg = model_lib.ModelConfig.tiny(depth=1, hidden=8, out_dim=8)
  xs = [jax.random.normal(jax.random.PRNGKey(m), (3, 5, 5, b)) for m, b in enumerate(cfg.bands)]
  state = nnx.state(model_lib.DPMamba(cfg, rngs=nnx.Rngs(0)))
  outs = {}
  with jax.default_matmul_precision("highest"):
    for impl in ("associative", "chunked", "recurrent"):
      model = model_lib.DPMamba(cfg.replace(scan_impl=impl), rngs=nnx.Rngs(0))
      outs[impl] = model_lib.make_forward(model)(state, xs, None)
  chex.assert_trees_all_close(outs["chunked"], outs["associative"], rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(outs["recurrent"], outs["associative"], rtol=1e-4, atol=1e-5)


# (16, 32, 32) and (32, 32, 32): the kernel gradient runs over several channel chunks
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

  new = lambda x, k: model_lib._grouped_conv3x3(x, k, groups)
  # the token-major layout of the blocks: (H, W, B, C) in and out
  hwnc = lambda x, k: jnp.transpose(model_lib._grouped_conv3x3(
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


@pytest.mark.parametrize("impl", ["associative", "sequential", "chunked", "recurrent"])
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
