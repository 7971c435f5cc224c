"""DPMamba model (spec §2-§3): patch embedding, attention fusion, modality-aware Mamba blocks, head.

Channels-last throughout: modality m is (B, P, P, C_m); features are (B, P, P, hidden).
A modality mask is (B, M), 1 = present, 0 = missing.

jit pattern (NNX): split once, then a plain ``jax.jit`` of a pure function that merges inside::

  forward = make_forward(model)          # graphdef fixed
  v = forward(nnx.state(model), xs, mask)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax import scan
from dpmamba_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyper-parameters. Defaults are the reference's (spec §2, all three configs).

  bands: channels per modality as fed to the model (after PCA), modality 0 first.
  patch_size: P of the (P, P) patches (any P >= 1; the reference uses odd P).
  hidden: feature width h (the reference's 64); must be divisible by 2 and by heads_per_direction.
  depth: number of modality-aware Mamba blocks.
  d_state: SSM state size N.
  heads_per_direction: R, the SSM heads per scan direction (head dim = hidden / R).
  out_dim: width of the output V (the text feature size, 512 for CLIP).
  af_dropout: dropout on the attention-fusion weights in training.
  prompts: True for the student (missing-modality prompts), False for the teacher.
  scan_impl: selective-scan implementation, one of scan.SELECTIVE_SCAN_IMPLS: "auto" (default:
    "recurrent" on CPU, "associative" elsewhere), "associative", "chunked", "recurrent" or
    "sequential" (reference). All compute the same function.
  backbone: "mamba" (the method: modality-aware Mamba blocks) | "vit" (ablation Variant-2a:
    one transformer layer per block, `vit.ViTBlock`).
  fusion: "af" (the method: attention fusion) | "add" (Variant-2b: plain sum, `variants.AddFusion`).
  mixer: "mism" (the method: zigzag selective scan) | "dwconv" (Variant-2c: depthwise 3x3 conv,
    `variants.DWConvMixer`).
  """
  bands: tuple[int, ...]
  patch_size: int
  hidden: int = 64
  depth: int = 2
  d_state: int = 1
  heads_per_direction: int = 4
  out_dim: int = 512
  af_dropout: float = 0.3
  prompts: bool = False
  scan_impl: str = "auto"
  backbone: str = "mamba"
  fusion: str = "af"
  mixer: str = "mism"

  def __post_init__(self):
    bands = tuple(int(b) for b in np.atleast_1d(self.bands))
    object.__setattr__(self, "bands", bands)
    checks = [
        (len(bands) >= 1 and all(b >= 1 for b in bands), "bands", "one or more positive ints"),
        (int(self.patch_size) >= 1, "patch_size", "an int >= 1"),
        (self.hidden >= 2 and self.hidden % 2 == 0, "hidden", "an even int >= 2"),
        (self.heads_per_direction >= 1 and self.hidden % self.heads_per_direction == 0,
         "heads_per_direction", f"a divisor of hidden={self.hidden}"),
        (self.depth >= 0, "depth", "an int >= 0"),
        (self.d_state >= 1, "d_state", "an int >= 1"),
        (self.out_dim >= 1, "out_dim", "an int >= 1"),
        (0.0 <= self.af_dropout < 1.0, "af_dropout", "a float in [0, 1)"),
        (self.scan_impl in scan.SELECTIVE_SCAN_IMPLS, "scan_impl",
         f"one of {scan.SELECTIVE_SCAN_IMPLS}"),
        (self.backbone in ("mamba", "vit"), "backbone", "mamba | vit"),
        (self.fusion in ("af", "add"), "fusion", "af | add"),
        (self.mixer in ("mism", "dwconv"), "mixer", "mism | dwconv"),
    ]
    for ok, key, expected in checks:
      if not ok:
        raise UserError(f"ModelConfig.{key}={getattr(self, key)!r}: expected {expected}")

  @property
  def num_modalities(self) -> int:
    return len(self.bands)

  @classmethod
  def tiny(cls, **overrides) -> "ModelConfig":
    """A small two-modality config for tests (hidden 16, P 5, depth 2, out 32)."""
    kw = dict(bands=(6, 2), patch_size=5, hidden=16, depth=2, out_dim=32)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def for_dataset(cls, spec: Any, **overrides) -> "ModelConfig":
    """Config for a ``datasets.DatasetSpec`` (or its name): its model_bands and patch_size."""
    if isinstance(spec, str):
      from dpmamba_jax import datasets  # lazy: datasets imports nothing from here
      spec = datasets.get_spec(spec)
    kw = dict(bands=tuple(spec.model_bands), patch_size=int(spec.patch_size))
    kw.update(overrides)
    return cls(**kw)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["bands"] = list(self.bands)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise UserError(f"model config keys {unknown}: not ModelConfig fields {sorted(names)}")
    return cls(**d)


# ---------------------------------------------------------------------------------------------
# Initialisers (spec §2.10)


def _uniform(bound: float):
  """U(-bound, bound): PyTorch's default conv / linear init with bound = 1/sqrt(fan_in)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# trunc_normal(std 0.02) with an absolute cut at +-2, i.e. +-100 std.
_trunc_normal_002 = jax.nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)


# Grouped convs up to this many dense weights run as one dense conv with a block-diagonal kernel:
# XLA:CPU's grouped-conv backward pass is very slow (seconds at B=120 for 32 groups of 2).
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
    self.kernel = nnx.Param(_uniform(bound)(rngs.params(), (3, 3, cin // groups, cout)))
    self.bias = nnx.Param(_uniform(bound)(rngs.params(), (cout,)))

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
# a conv (on a GPU: no cuDNN algorithm search at compile time, and a faster step; measured on an
# H200, README "GPU check").
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
# instead of XLA's filter-gradient conv, which on a 2-core CPU took twice the conv's forward: the
# HSI embedding conv's kernel gradient at the train batch, Augsburg 15 -> 6 ms, Houston 28 -> 11
# ms, Trento 55 -> 17 ms.
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
  return _shift_conv3x3(x, kernel, groups, layout)


def _grouped_conv3x3_fwd(x, kernel, groups, layout):
  return _shift_conv3x3(x, kernel, groups, layout), (x, kernel)


# The kernel gradient of a grouped conv runs as dense filter-gradient convs over channel chunks
# of about this many channels: one block-diagonal (cin x cout) conv would do cin / cin_g times the
# needed work (64x for the depthwise conv); chunks of 8 are ~5x faster on CPU than one 64 x 64.
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


def _conv3x3(cin: int, cout: int, groups: int, rngs: nnx.Rngs) -> Conv3x3:
  return Conv3x3(cin, cout, groups, rngs=rngs)


def _linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(cin, cout, kernel_init=_trunc_normal_002,
                    bias_init=jax.nn.initializers.zeros, rngs=rngs)


def _layer_norm(features: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # LayerNorm2d: over channels at each pixel, biased variance, eps 1e-5.
  return nnx.LayerNorm(features, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Layers


class MaskedBatchNorm(nnx.Module):
  """BatchNorm2d with PyTorch semantics whose batch statistics skip masked-out samples.

  Eval: (x - running_mean) / sqrt(running_var + eps) * scale + bias.
  Train: normalise with the biased batch variance over (samples with mask != 0) x P x P, and
  update running_mean/var with momentum 0.1 (running_var gets the unbiased variance). When no
  sample is present, the running statistics normalise and are left unchanged.
  """

  def __init__(self, features: int, *, momentum: float = 0.1, epsilon: float = 1e-5):
    self.momentum = momentum
    self.epsilon = epsilon
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))

  def __call__(self, x: jax.Array, sample_mask: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """x: (B, H, W, C); sample_mask: (B,) nonzero = use this sample's statistics."""
    running_mean, running_var = self.mean[...], self.var[...]
    if not train:
      mean, var = running_mean, running_var
    else:
      if sample_mask is None:
        present = jnp.ones(x.shape[:1], bool)
      else:
        present = jnp.asarray(sample_mask) != 0  # (B,)
      sel = present[:, None, None, None]
      count = present.sum().astype(jnp.float32) * (x.shape[1] * x.shape[2])
      safe = jnp.maximum(count, 1.0)
      mean_b = jnp.where(sel, x, 0.0).sum(axis=(0, 1, 2)) / safe  # (C,)
      var_b = jnp.where(sel, jnp.square(x - mean_b), 0.0).sum(axis=(0, 1, 2)) / safe
      unbiased = var_b * count / jnp.maximum(count - 1.0, 1.0)
      any_present = count > 0
      mean = jnp.where(any_present, mean_b, running_mean)
      var = jnp.where(any_present, var_b, running_var)
      mom = self.momentum
      self.mean[...] = jnp.where(any_present, (1 - mom) * running_mean + mom * mean_b,
                                 running_mean)
      self.var[...] = jnp.where(any_present, (1 - mom) * running_var + mom * unbiased,
                                running_var)
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    return (x - mean) * inv + self.bias[...]


class AttentionFusion(nnx.Module):
  """Per-pixel softmax fusion of n feature maps with one shared 1x1 score (spec §2.5)."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(hidden)  # the reference's Conv2d(hidden, 1, 1) default init
    self.score = nnx.Linear(hidden, 1, kernel_init=_uniform(bound), bias_init=_uniform(bound),
                            rngs=rngs)

  def __call__(self, zs: Sequence[jax.Array], *, rate: float = 0.0,
               key: jax.Array | None = None) -> jax.Array:
    """zs: n arrays (..., C) -> (..., C). Dropout on the weights when key is given."""
    # softmax over the list written out per input: no stacked (n, ..., C) copy, one fused pass
    scores = [self.score(z) for z in zs]  # n x (..., 1)
    top = functools.reduce(jnp.maximum, scores)
    exps = [jnp.exp(s - top) for s in scores]
    total = sum(exps)
    ws = [e / total for e in exps]
    if key is not None and rate > 0.0:
      keep = jax.random.bernoulli(key, 1.0 - rate, (len(ws),) + ws[0].shape)
      ws = [jnp.where(keep[i], w / (1.0 - rate), 0.0) for i, w in enumerate(ws)]
    return sum(w * z for w, z in zip(ws, zs))


class ZigzagSSM(nnx.Module):
  """The reference's SSM module (IMSM / Cat_IMSM): four zigzag directions, summed (spec §2.6)."""

  def __init__(self, hidden: int, heads: int, d_state: int, *, rngs: nnx.Rngs):
    k = scan.NUM_DIRECTIONS
    self.x_proj = nnx.Param(_uniform(1.0 / math.sqrt(hidden))(
        rngs.params(), (k, hidden, heads + 2 * d_state)))  # (K, D, R+2N)
    self.dt_bias = nnx.Param(0.1 * jax.random.uniform(rngs.params(), (k, heads)))  # (K, R)
    self.a_log = nnx.Param(jnp.zeros((k, heads), jnp.float32))  # A = -1 at init
    self.d_skip = nnx.Param(jnp.ones((k, hidden), jnp.float32))  # (K, D)

  def __call__(self, x: jax.Array, *, impl: str = "auto", layout: str = "NHWC") -> jax.Array:
    """x: (B, P, P, D) -> (B, P, P, D); layout "HWNC": (P, P, B, D) -> (P, P, B, D)."""
    args = (self.x_proj[...], self.dt_bias[...], self.a_log[...], self.d_skip[...])
    if layout == "HWNC":  # already token-major: (P*P, B, D)
      p, q, b, d = x.shape
      y = scan.selective_scan(x.reshape(p * q, b, d), *args, scan.zigzag_paths(p), impl=impl,
                              time_major=True)
      return y.reshape(p, q, b, d)
    b, p, q, d = x.shape
    y = scan.selective_scan(x.reshape(b, p * q, d), *args, scan.zigzag_paths(p), impl=impl)
    return y.reshape(b, p, q, d)


class PatchEmbed(nnx.Module):
  """conv 3x3 -> masked BatchNorm -> ReLU -> LayerNorm over channels (spec §2.2)."""

  def __init__(self, bands: int, hidden: int, *, rngs: nnx.Rngs):
    self.conv = _conv3x3(bands, hidden, 1, rngs)
    self.bn = MaskedBatchNorm(hidden)
    self.norm = _layer_norm(hidden, rngs)

  def __call__(self, x, sample_mask=None, *, train=False, details=None, conv_out=None):
    """x: (B, P, P, bands) -> (B, P, P, hidden). conv_out: this conv's output, when computed
    already (`Conv3x3.patch_conv_from_scene`); x is not used then."""
    y = jax.nn.relu(self.bn(self.conv(x) if conv_out is None else conv_out, sample_mask,
                            train=train))
    if details is not None:
      details["embed_bn_relu"] = y
    return self.norm(y)


class MAMambaBlock(nnx.Module):
  """Modality-aware Mamba block (spec §2.4): a cross branch plus one branch per modality.

  No residuals. For M == 1 there is no cross branch and the per-modality fusion sees only its
  own input (its softmax weight is 1).

  Features are (P, P, B, h) here (`layout` "HWNC", token-major): the selective scan runs on
  (P*P, B, h) tokens without a transpose, and the shifted convs slice whole (B, h) slabs.
  """
  layout = "HWNC"

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    h, m_count = cfg.hidden, cfg.num_modalities
    self.num_modalities = m_count
    self.af_dropout = cfg.af_dropout
    self.scan_impl = cfg.scan_impl
    ssm = lambda: ZigzagSSM(h, cfg.heads_per_direction, cfg.d_state, rngs=rngs)
    fuse = lambda: AttentionFusion(h, rngs=rngs)
    if cfg.mixer == "dwconv" or cfg.fusion == "add":  # ablations (variants.py)
      from dpmamba_jax import variants
      if cfg.mixer == "dwconv":
        ssm = lambda: variants.DWConvMixer(h, rngs=rngs)
      if cfg.fusion == "add":
        fuse = variants.AddFusion
    self.ln1 = nnx.List([_layer_norm(h, rngs) for _ in range(m_count)])
    self.ln3 = nnx.List([_layer_norm(h, rngs) for _ in range(m_count)])
    self.af = nnx.List([fuse() for _ in range(m_count)])
    self.conv = nnx.List([_conv3x3(h, h, h // 2, rngs) for _ in range(m_count)])
    self.ssm = nnx.List([ssm() for _ in range(m_count)])
    self.out_proj = nnx.List([_linear(h, h, rngs) for _ in range(m_count)])
    if m_count >= 2:
      self.cross_af = fuse()
      self.ln2 = _layer_norm(h, rngs)
      self.cross_conv = _conv3x3(h, h, h, rngs)  # depthwise
      self.cross_ssm = ssm()
      self.cross_proj = _linear(h, h, rngs)

  def __call__(self, fs: Sequence[jax.Array], *, key: jax.Array | None = None,
               details: dict | None = None) -> list[jax.Array]:
    """fs: M arrays (P, P, B, h) -> M arrays (P, P, B, h). key: AF dropout (train) or None."""
    m_count = self.num_modalities
    keys = [None] * (m_count + 1) if key is None else list(jax.random.split(key, m_count + 1))
    det = details if details is not None else {}
    a = [self.ln1[m](fs[m]) for m in range(m_count)]
    c = None
    if m_count >= 2:
      c = self.cross_af(a, rate=self.af_dropout, key=keys[m_count])
      det["cross_af"] = c
      c = self.cross_conv(self.ln2(c), self.layout)
      det["cross_conv"] = c
      c = self.cross_ssm(c, impl=self.scan_impl, layout=self.layout)
      det["cross_ssm"] = c
      c = jax.nn.silu(self.cross_proj(c))
      det["cross_out"] = c
    outs = []
    for m in range(m_count):
      y = self.af[m]([a[m]] if c is None else [a[m], c], rate=self.af_dropout, key=keys[m])
      det[f"af/m{m}"] = y
      y = self.conv[m](self.ln3[m](y), self.layout)
      det[f"conv/m{m}"] = y
      y = self.ssm[m](y, impl=self.scan_impl, layout=self.layout)
      det[f"ssm/m{m}"] = y
      outs.append(jax.nn.silu(self.out_proj[m](y)))
    return outs


class DPMamba(nnx.Module):
  """The DPMamba visual network: M patches -> V (B, out_dim) (spec §2.11).

  Teacher (cfg.prompts False): masked modalities get zero features. Student (True): they get the
  learned prompt of that modality, one (P, P, hidden) N(0,1) tensor per modality.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h, m_count, p = cfg.hidden, cfg.num_modalities, cfg.patch_size
    self.embed = nnx.List([PatchEmbed(b, h, rngs=rngs) for b in cfg.bands])
    block = MAMambaBlock
    if cfg.backbone == "vit":  # ablation Variant-2a
      from dpmamba_jax import vit
      block = vit.ViTBlock
    self.blocks = nnx.List([block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.head_norm = _layer_norm(h * m_count, rngs)
    self.head = _linear(h * m_count, cfg.out_dim, rngs)
    if cfg.prompts:
      self.prompts = nnx.List([
          nnx.Param(jax.random.normal(rngs.params(), (p, p, h), jnp.float32))
          for _ in range(m_count)])

  def _check_inputs(self, xs, mask, embed_conv):
    cfg = self.cfg
    if len(xs) != cfg.num_modalities or len(embed_conv) != cfg.num_modalities:
      raise UserError(f"model input: got {len(xs)} modalities ({len(embed_conv)} embed_conv), "
                      f"expected {cfg.num_modalities}")
    given = [(m, x, cfg.bands[m], "input") if c is None else (m, c, cfg.hidden, "embed_conv")
             for m, (x, c) in enumerate(zip(xs, embed_conv))]
    b = given[0][1].shape[0]
    for m, x, channels, what in given:
      want = (b, cfg.patch_size, cfg.patch_size, channels)
      if tuple(x.shape) != want:
        raise UserError(f"model {what} modality {m}: shape {tuple(x.shape)}, expected {want} "
                        "(B, P, P, C) channels-last")
    if mask is not None and tuple(jnp.shape(mask)) != (b, cfg.num_modalities):
      raise UserError(f"model mask: shape {tuple(jnp.shape(mask))}, expected "
                      f"{(b, cfg.num_modalities)}")

  def __call__(self, xs: Sequence[jax.Array], mask: jax.Array | None = None, *,
               train: bool = False, dropout_key: jax.Array | None = None,
               details: dict | None = None,
               embed_conv: Sequence[jax.Array | None] | None = None) -> jax.Array:
    """Visual features V.

    Args:
      xs: M arrays (B, P, P, C_m).
      mask: (B, M) bool/float, 1 = present, or None (all present).
      train: batch-statistics BatchNorm (updates running stats) and AF dropout.
      dropout_key: PRNG key for AF dropout; required when train and cfg.af_dropout > 0.
      details: optional dict filled with intermediates (for tests / inspection).
      embed_conv: optional M entries, None or modality m's embedding-conv output (B, P, P, h)
        computed already (scene inference, `Conv3x3.patch_conv_from_scene`); xs[m] is then
        not used and may be None.

    Returns:
      (B, out_dim) float32, not normalised.
    """
    cfg = self.cfg
    embed_conv = [None] * len(xs) if embed_conv is None else list(embed_conv)
    self._check_inputs(xs, mask, embed_conv)
    if train and cfg.af_dropout > 0 and cfg.depth > 0 and dropout_key is None:
      raise ValueError("DPMamba(train=True) needs dropout_key when af_dropout > 0")
    det = details if details is not None else {}
    present = None if mask is None else jnp.asarray(mask) != 0  # (B, M)
    fs = []
    for m in range(cfg.num_modalities):
      d_m = {}
      f = self.embed[m](xs[m], None if present is None else present[:, m], train=train,
                        details=d_m, conv_out=embed_conv[m])
      det[f"embed_bn_relu/m{m}"] = d_m["embed_bn_relu"]
      det[f"embed/m{m}"] = f
      if present is not None:
        fill = self.prompts[m][...] if cfg.prompts else jnp.zeros_like(f[0])
        f = jnp.where(present[:, m, None, None, None], f, fill[None])
      det[f"injected/m{m}"] = f
      fs.append(f)
    block_keys = (None if not train or dropout_key is None or cfg.af_dropout == 0
                  else jax.random.split(dropout_key, max(cfg.depth, 1)))
    # The Mamba blocks work token-major, (P, P, B, h): one transpose here instead of two around
    # every selective scan. `details` are always (B, P, P, h).
    token_major = bool(self.blocks) and getattr(self.blocks[0], "layout", "NHWC") == "HWNC"
    to_bhwc = (lambda x: jnp.transpose(x, (2, 0, 1, 3))) if token_major else (lambda x: x)
    if token_major:
      fs = [jnp.transpose(f, (1, 2, 0, 3)) for f in fs]  # (P, P, B, h)
    for i, blk in enumerate(self.blocks):
      d_blk = {}
      fs = blk(fs, key=None if block_keys is None else block_keys[i], details=d_blk)
      for k, v in d_blk.items():
        det[f"block{i}_detail/{k}"] = to_bhwc(v)
      for m, f in enumerate(fs):
        det[f"block{i}/m{m}"] = to_bhwc(f)
    normed = self.head_norm(jnp.concatenate(fs, axis=-1))
    if token_major:  # (P, P, B, h*M): the mean over the P*P tokens as one float32 GEMV, which
      # XLA:CPU runs several times faster than a reduction over the two major axes
      p2 = normed.shape[0] * normed.shape[1]
      pooled = jnp.dot(jnp.full((p2,), 1.0 / p2, normed.dtype), normed.reshape(p2, -1),
                       precision=jax.lax.Precision.HIGHEST).reshape(normed.shape[2:])
    else:
      pooled = normed.mean(axis=(1, 2))  # (B, h*M)
    det["head_pooled"] = pooled
    return self.head(pooled)


# ---------------------------------------------------------------------------------------------
# Helpers


def make_forward(model: DPMamba, *, max_traces: int | None = None):
  """Jitted eval-mode forward with the graphdef fixed: (state, xs, mask) -> V (B, out_dim).

  ``state`` is ``nnx.state(model)``; pass ``mask=None`` for complete inputs. With max_traces,
  the traced function is wrapped in chex.assert_max_traces (for tests).
  """
  graphdef = nnx.graphdef(model)

  def forward(state, xs, mask=None):
    return nnx.merge(graphdef, state)(list(xs), mask)

  if max_traces is not None:
    forward = chex.assert_max_traces(forward, n=max_traces)
  return jax.jit(forward)


def param_count(model: nnx.Module) -> int:
  """Number of trainable scalars (nnx.Param only; running stats are excluded)."""
  leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  return int(sum(np.prod(x.shape) for x in leaves))


def abstract_model(cfg: ModelConfig) -> DPMamba:
  """A DPMamba with ShapeDtypeStruct leaves (no memory, no compute), e.g. for counting."""
  return nnx.eval_shape(lambda: DPMamba(cfg, rngs=nnx.Rngs(0)))
