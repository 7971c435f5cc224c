"""The layers the comparison methods share (peers/cnn.py) against XLA's own convolutions."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmamba_jax.peers import cnn


@pytest.mark.parametrize("bands,k,padding,block", [(12, 9, 1, 8), (7, 3, 0, 2), (5, 3, 1, 8)])
def test_band_conv3d_is_a_conv3d_with_one_input_channel(bands, k, padding, block):
  """Depths that are not a multiple of the window, no window at all but one, both paddings."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, bands)), jnp.float32)     # (B, P, P, C)
  kernel = jnp.asarray(rng.standard_normal((k, 3, 3, 1, 4)), jnp.float32)  # (k, kh, kw, 1, F)
  cube = jnp.transpose(x, (0, 3, 1, 2))[..., None]                         # (B, C, P, P, 1)
  want = jax.lax.conv_general_dilated(
      cube, kernel, (1, 1, 1), ((0, 0), (padding, padding), (padding, padding)),
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision="highest")
  got = cnn.band_conv3d(x, kernel, spatial_padding=padding, block=block)
  q = 6 + 2 * padding - 2
  chex.assert_shape(got, (2, q, q, bands - k + 1, 4))
  chex.assert_trees_all_close(got, jnp.transpose(want, (0, 2, 3, 1, 4)), atol=1e-5)


def test_grouped_conv2d_is_xlas_grouped_convolution():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 12)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)  # 3 groups, 2 out each
  want = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=3, precision="highest")
  chex.assert_trees_all_close(cnn.grouped_conv2d(x, kernel, 3, padding=1), want, atol=1e-5)
