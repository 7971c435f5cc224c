"""The 3x3 convolutions of the model (PyTorch Conv2d semantics) and their backend forms.

`Conv3x3` is one layer; how it is computed depends on the groups and the backend, all forms
giving the same function:
* grouped convs with few input channels per group (the blocks' grouped and depthwise convs):
  shifted multiply-adds with a hand-written VJP (`_grouped_conv3x3`);
* other grouped convs: one dense conv with a block-diagonal kernel;
* dense convs (the patch embeddings): one im2col matmul on GPU, XLA's conv with a per-tap kernel
  gradient on CPU (`_dense_conv3x3_tap_grad`), XLA's conv elsewhere.
Layouts: "NHWC" (B, H, W, C) or "HWNC" (H, W, B, C), the blocks' token-major features.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax.errors import UserError
from dpmamba_jax.model import cpu_kernels


def uniform_init(bound: float):
  """U(-bound, bound): PyTorch's default conv / linear init with bound = 1/sqrt(fan_in)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init



# Grouped convs up to this many dense weights run as one dense conv with a block-diagonal kernel:
# XLA:CPU's grouped-conv backward pass is very slow.
DENSE_GROUPED_CONV_MAX = 256 * 256


def _block_diagonal_kernel(kernel: jax.Array, groups: int) -> jax.Array:
  """(kh, kw, cin/g, cout) grouped kernel -> the equivalent dense (kh, kw, cin, cout) one."""
  cin_g, cout = kernel.shape[2], kernel.shape[3]
  cin, cout_g = cin_g * groups, cout // groups
  i, o = np.arange(cin)[:, None], np.arange(cout)[None, :]
  # expand[j, i, o] = 1 where input channel i is the j-th input of output o's group
  expand = ((i // cin_g == o // cout_g)[None] & (i % cin_g == np.arange(cin_g)[:, None, None]))
  return jnp.einsum("hwjo,jio->hwio", kernel, expand.astype(kernel.dtype))


class Conv3x3(nnx.Module):
  """3x3 conv, stride 1, zero padding 1, bias, `groups` groups (PyTorch Conv2d semantics).

  Params: kernel (3, 3, cin/groups, cout) HWIO, bias (cout,); PyTorch's default init
  U(+-1/sqrt(fan_in)) for both (spec §2.10).
  """

  def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs):
    if cin % groups or cout % groups:
      raise UserError(f"conv {cin}->{cout}: groups={groups} must divide both")
    bound = 1.0 / math.sqrt(cin // groups * 9)
    self.groups = groups
    self.kernel = nnx.Param(uniform_init(bound)(rngs.params(), (3, 3, cin // groups, cout)))
    self.bias = nnx.Param(uniform_init(bound)(rngs.params(), (cout,)))

  def __call__(self, x: jax.Array, layout: str = "NHWC") -> jax.Array:
    """x: (B, H, W, cin) -> (B, H, W, cout); with layout "HWNC", (H, W, B, cin) -> (H, W, B, cout)."""
    kernel, groups = self.kernel[...], self.groups
    cin = kernel.shape[2] * groups
    if groups > 1 and kernel.shape[2] <= SHIFT_CONV_MAX_CIN_PER_GROUP:
      return _grouped_conv3x3(x, kernel, groups, layout) + self.bias[...]
    if groups > 1 and cin * kernel.shape[3] <= DENSE_GROUPED_CONV_MAX:
      kernel, groups = _block_diagonal_kernel(kernel, groups), 1
    if groups == 1 and jax.default_backend() in CONV_AS_MATMUL_BACKENDS:
      return _im2col_conv3x3(x, kernel, layout) + self.bias[...]
    if groups == 1 and jax.default_backend() in TAP_KERNEL_GRAD_BACKENDS:
      return _dense_conv3x3_tap_grad(x, kernel, layout) + self.bias[...]
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=(layout, "HWIO", layout),
                                     feature_group_count=groups)
    return y + self.bias[...]

  def conv_valid(self, x_padded: jax.Array) -> jax.Array:
    """This conv of an input padded already: (B, H + 2, W + 2, cin) -> (B, H, W, cout). For a
    whole scene, where a padded copy made inside the conv would cost another cube of memory."""
    y = jax.lax.conv_general_dilated(x_padded, self.kernel[...], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=self.groups)
    return y + self.bias[...]

  def patch_conv_from_scene(self, scene_patches: jax.Array, ring) -> jax.Array:
    """This conv of zero-padded (B, P, P, cin) patches, from patches of the conv over the scene.

    Inside a patch the scene's conv and the patch's conv agree; on the patch's border the
    scene's conv also saw the pixels just outside the patch, where the patch has zero padding:
    their terms are subtracted. Dense convs (groups 1) only.

    Args:
      scene_patches: (B, P, P, cout) patches of this conv (bias included) over the whole cube.
      ring: the pixels around each patch, from `data.gather_patch_rings`: rows above and below
        (B, P + 2, cin) (columns -1 .. P) and columns left and right (B, P, cin) (rows 0 .. P-1).

    Returns:
      (B, P, P, cout), equal to ``self(patches)`` up to float rounding.
    """
    if self.groups != 1:
      raise ValueError("patch_conv_from_scene: dense convs only (groups=1)")
    kernel = self.kernel[...]  # (3, 3, cin, cout): (dy, dx)
    top, bottom, left, right = ring
    p = left.shape[1]
    zero = jnp.zeros_like(left[:, :1])
    left, right = (jnp.concatenate([zero, c, zero], axis=1) for c in (left, right))
    # each side is a 1-D conv along the border: kernel row dy=0 over the row above, dy=2 over the
    # row below, column dx=0 over the column left, dx=2 over the column right
    strips = jnp.stack([top, bottom, left, right])  # (4, B, P + 2, cin)
    windows = jnp.concatenate([strips[:, :, i:i + p] for i in range(3)], axis=-1)  # (4,B,P,3cin)
    side_kernels = jnp.stack([kernel[0], kernel[2], kernel[:, 0], kernel[:, 2]])  # (4,3,cin,cout)
    outside = jnp.einsum("sbpk,skc->sbpc", windows,
                         side_kernels.reshape(4, -1, kernel.shape[-1]))  # (4, B, P, cout)
    y = scene_patches.at[:, 0].add(-outside[0]).at[:, p - 1].add(-outside[1])
    return y.at[:, :, 0].add(-outside[2]).at[:, :, p - 1].add(-outside[3])


_SPATIAL_AXES = {"NHWC": (1, 2), "HWNC": (0, 1)}


def _pad_hw(x: jax.Array, layout: str) -> jax.Array:
  """Zero padding 1 on the two spatial axes of `layout`."""
  ay, ax = _SPATIAL_AXES[layout]
  pad = [(0, 0)] * x.ndim
  pad[ay] = pad[ax] = (1, 1)
  return jnp.pad(x, pad)


def _hw_window(xp: jax.Array, dy, dx, h: int, w: int, layout: str) -> jax.Array:
  """The (h, w) spatial window at offset (dy, dx) of a `_pad_hw`-padded array. Offsets are ints
  (static slices) or traced scalars (dynamic slices, e.g. in a loop over the taps)."""
  ay, ax = _SPATIAL_AXES[layout]
  if isinstance(dy, int) and isinstance(dx, int):
    return jax.lax.slice_in_dim(jax.lax.slice_in_dim(xp, dy, dy + h, axis=ay), dx, dx + w,
                                axis=ax)
  return jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_slice_in_dim(xp, dy, h, axis=ay), dx, w,
                                      axis=ax)


# Backends where a dense 3x3 conv runs as one (tokens, 9 cin) x (9 cin, cout) matmul instead of
# a conv (on a GPU: no cuDNN algorithm search at compile time, and a faster step; docs/gpu.md).
CONV_AS_MATMUL_BACKENDS = ("gpu",)


def _im2col_conv3x3(x: jax.Array, kernel: jax.Array, layout: str = "NHWC") -> jax.Array:
  """Dense 3x3 cross-correlation, zero padding 1: the 9 shifted inputs side by side, one matmul.

  x: (B, H, W, cin) ("NHWC") or (H, W, B, cin) ("HWNC"); kernel (3, 3, cin, cout) HWIO.
  """
  ay, ax = _SPATIAL_AXES[layout]
  h, w = x.shape[ay], x.shape[ax]
  xp = _pad_hw(x, layout)
  # 9 x (..., cin), (dy, dx) row-major like the HWIO kernel
  cols = [_hw_window(xp, dy, dx, h, w, layout) for dy in range(3) for dx in range(3)]
  return jnp.concatenate(cols, axis=-1) @ kernel.reshape(-1, kernel.shape[-1])


# Grouped convs with at most this many input channels per group run as 9 * (cin/groups) shifted
# multiply-adds (one elementwise fusion) instead of a conv: the block-diagonal dense conv does
# cin/(cin/groups) times the work, and YNNPACK's dense 3x3 conv is the slowest op on CPU.
SHIFT_CONV_MAX_CIN_PER_GROUP = 4


def _expand_group_input(xp: jax.Array, groups: int, cin_g: int, cout_g: int, j: int):
  """(..., cin) -> (..., cout): output channel o sees its group's j-th input channel."""
  lead = xp.shape[:-1]
  xj = xp.reshape(lead + (groups, cin_g))[..., j]  # (..., groups)
  return jnp.broadcast_to(xj[..., None], xj.shape + (cout_g,)).reshape(lead + (groups * cout_g,))


def _shift_conv3x3(x: jax.Array, kernel: jax.Array, groups: int, layout: str = "NHWC"):
  """Grouped 3x3 cross-correlation, zero padding 1, as shifted multiply-adds.

  x: (B, H, W, cin) for layout "NHWC" or (H, W, B, cin) for "HWNC"; kernel:
  (3, 3, cin/groups, cout) -> the same layout with cout channels.
  """
  ay, ax = _SPATIAL_AXES[layout]
  h, w = x.shape[ay], x.shape[ax]
  cin_g, cout = kernel.shape[2], kernel.shape[3]
  xp = _pad_hw(x, layout)
  y = None
  for j in range(cin_g):
    xj = _expand_group_input(xp, groups, cin_g, cout // groups, j)
    for dy in range(3):
      rows = jax.lax.slice_in_dim(xj, dy, dy + h, axis=ay)
      for dx in range(3):
        term = jax.lax.slice_in_dim(rows, dx, dx + w, axis=ax) * kernel[dy, dx, j]
        y = term if y is None else y + term
  return y


def _transposed_group_kernel(kernel: jax.Array, groups: int) -> jax.Array:
  """The kernel of the input gradient: (3, 3, cin/g, cout) -> (3, 3, cout/g, cin), flipped."""
  cin_g, cout = kernel.shape[2], kernel.shape[3]
  cout_g = cout // groups
  i = np.arange(cin_g * groups)[None, :]
  ol = np.arange(cout_g)[:, None]
  # kt[dy, dx, ol, i] = kernel[2 - dy, 2 - dx, i % cin_g, (i // cin_g) * cout_g + ol]
  return kernel[::-1, ::-1][:, :, i % cin_g, (i // cin_g) * cout_g + ol]


def _dense_conv3x3(x: jax.Array, kernel: jax.Array, layout: str = "NHWC") -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=(layout, "HWIO", layout))


# Backends where a dense 3x3 conv's kernel gradient is nine per-tap matmuls (`_tap_kernel_grad`)
# instead of XLA's filter-gradient conv, which on CPU takes twice the conv's forward.
TAP_KERNEL_GRAD_BACKENDS = ("cpu",)


def _tap_kernel_grad(x: jax.Array, g: jax.Array, layout: str) -> jax.Array:
  """d(sum(g * dense_conv3x3(x, kernel)))/d kernel, (3, 3, cin, cout), one matmul per tap:
  (cin, tokens) @ (tokens, cout) of the shifted input window and the output gradient."""
  ay, ax = _SPATIAL_AXES[layout]
  h, w, cin, cout = x.shape[ay], x.shape[ax], x.shape[-1], g.shape[-1]
  xp = _pad_hw(x, layout)
  g_tokens = g.reshape(-1, cout)  # same token order as every window's reshape

  def tap(_, offset):  # a loop over the taps: one (tokens, cin) window copy alive at a time
    window = _hw_window(xp, offset[0], offset[1], h, w, layout)
    return None, window.reshape(-1, cin).T @ g_tokens

  offsets = jnp.asarray([(dy, dx) for dy in range(3) for dx in range(3)], jnp.int32)
  return jax.lax.scan(tap, None, offsets)[1].reshape(3, 3, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_conv3x3_tap_grad(x: jax.Array, kernel: jax.Array, layout: str) -> jax.Array:
  """`_dense_conv3x3` whose kernel gradient is `_tap_kernel_grad`."""
  return _dense_conv3x3(x, kernel, layout)


def _dense_conv3x3_tap_grad_fwd(x, kernel, layout):
  return _dense_conv3x3(x, kernel, layout), (x, kernel)


def _dense_conv3x3_tap_grad_bwd(layout, res, g):
  # d/dx: the conv of g with the flipped, transposed kernel (XLA drops it when x is data, as for
  # the embedding convs)
  x, kernel = res
  dx = _dense_conv3x3(g, _transposed_group_kernel(kernel, 1), layout)
  return dx, _tap_kernel_grad(x, g, layout)


_dense_conv3x3_tap_grad.defvjp(_dense_conv3x3_tap_grad_fwd, _dense_conv3x3_tap_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _grouped_conv3x3(x: jax.Array, kernel: jax.Array, groups: int,
                     layout: str = "NHWC") -> jax.Array:
  # without a gradient: the C++ kernel where the program runs on a CPU
  return cpu_kernels.cpu_or_xla(
      functools.partial(_shift_conv3x3, groups=groups, layout=layout),
      lambda built: functools.partial(cpu_kernels.grouped_conv3x3, built.grouped_conv3x3,
                                      layout=layout), x, kernel)


def _grouped_conv3x3_fwd(x, kernel, groups, layout):
  return _shift_conv3x3(x, kernel, groups, layout), (x, kernel)


# The kernel gradient of a grouped conv runs as dense filter-gradient convs over channel chunks
# of about this many channels: one block-diagonal (cin x cout) conv would do cin / cin_g times the
# needed work (64x for the depthwise conv), and small chunks are several times faster on CPU.
FILTER_GRAD_CHUNK_CHANNELS = 8


# Backends where the grouped filter gradient runs as dense convs over channel chunks; elsewhere
# (GPU) as 9 * cin/groups multiply-reductions over all tokens, which needs no conv kernels.
FILTER_GRAD_CONV_BACKENDS = ("cpu",)


def _grouped_filter_grad(x: jax.Array, g: jax.Array, kernel: jax.Array, groups: int,
                         layout: str) -> jax.Array:
  """d(sum(g * grouped_conv(x, kernel)))/d kernel, (3, 3, cin/groups, cout)."""
  cin_g, cout = kernel.shape[2], kernel.shape[3]
  cout_g = cout // groups
  if jax.default_backend() not in FILTER_GRAD_CONV_BACKENDS:
    return _grouped_filter_grad_reduce(x, g, groups, cin_g, cout_g, layout)
  per_chunk = max(1, FILTER_GRAD_CHUNK_CHANNELS // max(cin_g, cout_g))
  while groups % per_chunk:  # groups per chunk: a divisor of groups
    per_chunk -= 1
  cin_c, cout_c = per_chunk * cin_g, per_chunk * cout_g
  grads = []
  for c in range(groups // per_chunk):
    xc = jax.lax.slice_in_dim(x, c * cin_c, (c + 1) * cin_c, axis=x.ndim - 1)
    gc = jax.lax.slice_in_dim(g, c * cout_c, (c + 1) * cout_c, axis=g.ndim - 1)
    kc = kernel[..., c * cout_c:(c + 1) * cout_c]
    _, vjp = jax.vjp(lambda k: _dense_conv3x3(xc, _block_diagonal_kernel(k, per_chunk), layout),
                     kc)
    grads.append(vjp(gc)[0])
  return jnp.concatenate(grads, axis=-1)


def _grouped_filter_grad_reduce(x, g, groups, cin_g, cout_g, layout):
  """`_grouped_filter_grad` as sum over tokens of (shifted input) * g, per kernel tap."""
  ay, ax = _SPATIAL_AXES[layout]
  h, w = x.shape[ay], x.shape[ax]
  xp = _pad_hw(x, layout)
  expanded = [_expand_group_input(xp, groups, cin_g, cout_g, j) for j in range(cin_g)]
  token_axes = tuple(range(x.ndim - 1))
  taps = []
  for dy in range(3):
    for dx in range(3):
      for xj in expanded:
        taps.append((_hw_window(xj, dy, dx, h, w, layout) * g).sum(axis=token_axes))  # (cout,)
  return jnp.stack(taps).reshape(3, 3, cin_g, groups * cout_g)


def _grouped_conv3x3_bwd(groups, layout, res, g):
  # d/dx: the same shifted form with the flipped, group-transposed kernel. d/dkernel: on CPU
  # XLA's filter gradient of block-diagonal dense convs over channel chunks (faster there than
  # 9 * cin_g reductions over all tokens), on GPU those reductions (no conv kernels to autotune).
  x, kernel = res
  dx = _shift_conv3x3(g, _transposed_group_kernel(kernel, groups), groups, layout)
  return dx, _grouped_filter_grad(x, g, kernel, groups, layout)


_grouped_conv3x3.defvjp(_grouped_conv3x3_fwd, _grouped_conv3x3_bwd)
