"""The C++ CPU kernels (model/cpu_kernels.py, .cc): the scan's and the grouped convs' forward
against the float64 numpy loop and XLA's convolution, used only without a gradient, and the
fallback to the XLA programs when they cannot be built."""
import os
import threading
import time
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmamba_jax.model import conv, cpu_kernels, scan
from scan_reference import selective_scan_numpy

needs_compiler = pytest.mark.skipif(cpu_kernels.compiler() is None, reason="no C++ compiler")


def _random_ssm(seed, bsz, p, dim, heads, n_state):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(bsz, p * p, dim)).astype(np.float32),
          (rng.normal(size=(4, dim, heads + 2 * n_state)) / np.sqrt(dim)).astype(np.float32),
          (0.3 * rng.normal(size=(4, heads))).astype(np.float32),
          (0.5 * rng.normal(size=(4, heads))).astype(np.float32),
          (1.0 + 0.1 * rng.normal(size=(4, dim))).astype(np.float32))


def _recurrent(paths):
  return jax.jit(lambda *a: scan.selective_scan(*a, paths, impl="recurrent"))


@needs_compiler
@pytest.mark.parametrize("bsz,p,dim,heads,n_state", [
    (9, 5, 64, 4, 1),   # the paper's heads of 16 channels, state 1 (registers path), B % 8 != 0
    (3, 3, 16, 2, 1),   # heads of 8 channels
    (2, 4, 12, 3, 1),   # heads of 4 channels: the general path
    (2, 3, 8, 2, 3),    # state size 3
    (1, 1, 8, 1, 1),    # one token
])
def test_scan_kernel_matches_numpy(bsz, p, dim, heads, n_state):
  args = _random_ssm(p * 10 + n_state, bsz, p, dim, heads, n_state)
  paths = scan.zigzag_paths(p)
  fn = _recurrent(paths)
  assert cpu_kernels.kernels().zigzag_scan in fn.lower(*args).as_text()
  with jax.default_matmul_precision("highest"):
    y = fn(*args)
  chex.assert_shape(y, (bsz, p * p, dim))
  ref = selective_scan_numpy(*args, paths)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=2e-5)


@needs_compiler
def test_gradients_stay_on_xla():
  # (their values: tests/test_scan_variants.py compares every implementation's gradients)
  args = _random_ssm(0, 2, 3, 16, 2, 1)
  paths = scan.zigzag_paths(3)
  loss = lambda *a: jnp.sum(jnp.sin(scan.selective_scan(*a, paths, impl="recurrent")))
  forward_hlo = jax.jit(loss).lower(*args).as_text()
  grad_hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).as_text()
  assert cpu_kernels.kernels().zigzag_scan in forward_hlo
  assert cpu_kernels.kernels().zigzag_scan not in grad_hlo
  x, k = np.ones((3, 3, 2, 4), np.float32), np.ones((3, 3, 2, 4), np.float32)
  conv_grad = jax.jit(jax.grad(lambda x: conv._grouped_conv3x3(x, k, 2, "HWNC").sum()))
  assert cpu_kernels.kernels().grouped_conv3x3 not in conv_grad.lower(x).as_text()


@needs_compiler
@pytest.mark.parametrize("layout", ["HWNC", "NHWC"])
@pytest.mark.parametrize("cin,cout,groups,width", [
    (64, 64, 32, 11),  # the blocks' pairs (cin_g = cout_g = 2), 4-pixel blocks and a remainder
    (64, 64, 64, 9),   # depthwise
    (12, 12, 4, 5),    # cin_g = cout_g = 3, channels not a multiple of 8
    (8, 40, 8, 3),     # cin_g 1, cout_g 5: the expanded-input path
    (12, 24, 4, 6),    # cin_g 3, cout_g 6
])
def test_grouped_conv_kernel_matches_xla_conv(layout, cin, cout, groups, width):
  rng = np.random.default_rng(cin + cout + width)
  shape = (7, width, 3, cin) if layout == "HWNC" else (3, 7, width, cin)
  x = rng.normal(size=shape).astype(np.float32)
  kernel = rng.normal(size=(3, 3, cin // groups, cout)).astype(np.float32)
  fn = jax.jit(lambda x, k: conv._grouped_conv3x3(x, k, groups, layout))
  assert cpu_kernels.kernels().grouped_conv3x3 in fn.lower(x, kernel).as_text()
  want = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=(layout, "HWIO", layout),
                                      feature_group_count=groups,
                                      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(np.asarray(fn(x, kernel)), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_the_scan_kernel_refuses_paths_that_are_not_permutations():
  args = _random_ssm(1, 2, 2, 8, 2, 1)
  bad = scan.zigzag_paths(2).copy()
  bad[1, 0] = bad[1, 1]
  u = jnp.swapaxes(jnp.asarray(args[0]), 0, 1).reshape(-1, 8)  # (L*B, D)
  coef = jnp.ones((4, 2, 4, 2), jnp.float32)  # (L, B, K, R)
  state = jnp.ones((4, 2, 4, 1), jnp.float32)  # (L, B, K, N)
  with pytest.raises(Exception, match="each path must be a permutation"):
    jax.block_until_ready(cpu_kernels.zigzag_scan_forward(
        cpu_kernels.kernels().zigzag_scan, bad, u, coef, coef, state, state, jnp.asarray(args[4])))


@pytest.fixture
def fresh_kernels():
  """kernels() computed again in the test, and again after it (its result is cached)."""
  cpu_kernels.kernels.cache_clear()
  yield
  cpu_kernels.kernels.cache_clear()


def test_turned_off_the_scan_is_the_xla_loop_with_the_same_results(fresh_kernels, monkeypatch):
  args = _random_ssm(2, 3, 3, 16, 2, 1)
  paths = scan.zigzag_paths(3)
  with jax.default_matmul_precision("highest"):
    on = _recurrent(paths)(*args)
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    cpu_kernels.kernels.cache_clear()
    assert cpu_kernels.kernels() is None
    fn = _recurrent(paths)
    assert "dpmamba_" not in fn.lower(*args).as_text()
    off = fn(*args)
  np.testing.assert_allclose(np.asarray(on), np.asarray(off), rtol=1e-5, atol=1e-5)


def test_no_compiler_is_one_warning_and_the_xla_programs(fresh_kernels, monkeypatch, tmp_path):
  monkeypatch.setenv("DPMAMBA_KERNEL_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(cpu_kernels.KernelUnavailable, match="no-such-compiler"):
    cpu_kernels._load.__wrapped__()  # the uncached build
  monkeypatch.setattr(cpu_kernels, "_load", cpu_kernels._load.__wrapped__)
  with pytest.warns(RuntimeWarning, match="CPU kernels are not available .*no-such-compiler"):
    assert cpu_kernels.kernels() is None
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert cpu_kernels.kernels() is None  # cached: warned once
  x = np.ones((3, 3, 2, 4), np.float32)
  k = np.ones((3, 3, 2, 4), np.float32)
  np.testing.assert_allclose(np.asarray(conv._grouped_conv3x3(x, k, 2, "HWNC"))[1, 1], 18.0)
  assert os.listdir(tmp_path) == []  # nothing half-built left


def test_a_background_build_and_a_trace_build_once(fresh_kernels, monkeypatch):
  """build_in_background's thread and a trace asking at once: one build, one result."""
  builds = []

  def slow_load():
    builds.append(threading.current_thread().name)
    time.sleep(0.3)
    return "the kernels"

  monkeypatch.setattr(cpu_kernels, "_load", slow_load)
  thread = cpu_kernels.build_in_background()
  assert not thread.daemon  # a command that ends first waits for it: no temporary file left
  assert cpu_kernels.kernels() == "the kernels"
  thread.join()
  assert len(builds) == 1


def test_a_failed_background_build_warns_once(fresh_kernels, monkeypatch):
  def failing_load():
    time.sleep(0.3)
    raise cpu_kernels.KernelUnavailable("no C++ compiler found")

  monkeypatch.setattr(cpu_kernels, "_load", failing_load)
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    thread = cpu_kernels.build_in_background()
    assert cpu_kernels.kernels() is None
    thread.join()
  assert len([w for w in seen if "CPU kernels are not available" in str(w.message)]) == 1


@needs_compiler
def test_a_failing_build_names_the_compiler_error_and_leaves_nothing(monkeypatch, tmp_path):
  source = tmp_path / "broken.cc"
  source.write_text("this is not C++\n")
  monkeypatch.setattr(cpu_kernels, "SOURCE", str(source))
  with pytest.raises(cpu_kernels.KernelUnavailable, match="broken.cc.*error"):
    cpu_kernels._build(cpu_kernels.compiler(), str(tmp_path / "out" / "lib.so"))
  assert os.listdir(tmp_path / "out") == []
