"""Layers shared by the CNN peers (ShaSpec, DGDNet, MSH-Net), with PyTorch semantics.

Arrays are channels-last: a patch batch is (B, P, P, C). Kernels are stored HWIO, (kh, kw, in,
out); `torch_conv_kernel` turns PyTorch's (out, in, kh, kw) into that. BatchNorm is
`model.blocks.MaskedBatchNorm` (biased variance to normalise, unbiased for the running update,
momentum 0.1); a layer called k times in one train-mode forward updates its statistics k times,
in call order, as PyTorch does.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax.model.blocks import MaskedBatchNorm
from dpmamba_jax.model.conv import uniform_init

PADDINGS = ("zeros", "replicate")


def torch_conv_kernel(w: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight (out, in, kh, kw) -> HWIO (kh, kw, in, out)."""
  return np.transpose(np.asarray(w, np.float32), (2, 3, 1, 0))


def torch_linear_kernel(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight (out, in) -> (in, out)."""
  return np.asarray(w, np.float32).T


class Conv2d(nnx.Module):
  """A k x k convolution (PyTorch Conv2d, groups 1) on (B, H, W, C_in), padding k // 2 by
  `padding` ("zeros" or "replicate": edge pixels repeated), with PyTorch's default init."""

  def __init__(self, cin: int, cout: int, kernel_size: int, *, stride: int = 1,
               padding: str = "zeros", use_bias: bool = False, rngs: nnx.Rngs):
    if padding not in PADDINGS:
      raise ValueError(f"padding {padding!r}: expected one of {PADDINGS}")
    bound = 1.0 / math.sqrt(cin * kernel_size * kernel_size)
    self.kernel = nnx.Param(uniform_init(bound)(rngs.params(),
                                                (kernel_size, kernel_size, cin, cout)))
    self.bias = nnx.Param(uniform_init(bound)(rngs.params(), (cout,))) if use_bias else None
    self.stride = stride
    self.padding = padding

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C_in) -> (B, H', W', C_out)."""
    k = self.kernel.shape[0]
    r = k // 2
    if r and self.padding == "replicate":
      x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
      pads = ((0, 0), (0, 0))
    else:
      pads = ((r, r), (r, r))
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    if self.bias is not None:
      y = y + self.bias[...]
    return y


class ConvBNReLU(nnx.Module):
  """Conv2d (no bias) -> BatchNorm2d -> ReLU: the block every CNN peer is made of."""

  def __init__(self, cin: int, cout: int, kernel_size: int = 3, *, stride: int = 1,
               padding: str = "zeros", rngs: nnx.Rngs):
    self.conv = Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, rngs=rngs)
    self.bn = MaskedBatchNorm(cout)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: (B, H, W, C_in) -> (B, H', W', C_out)."""
    return jax.nn.relu(self.bn(self.conv(x), train=train))


class CNNEncoder(nnx.Module):
  """Three 3x3 conv-BN-ReLU layers to `widths` channels, the last with stride 2 (7x7 -> 4x4):
  the per-modality encoder of ShaSpec, DGDNet and MSH-Net's students (blocks 1-3 in their code)."""

  def __init__(self, cin: int, widths: tuple[int, int, int] = (32, 64, 128), *,
               padding: str = "zeros", rngs: nnx.Rngs):
    self.block1 = ConvBNReLU(cin, widths[0], padding=padding, rngs=rngs)
    self.block2 = ConvBNReLU(widths[0], widths[1], padding=padding, rngs=rngs)
    self.block3 = ConvBNReLU(widths[1], widths[2], stride=2, padding=padding, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: (B, P, P, C) -> (B, ceil(P / 2), ceil(P / 2), widths[2])."""
    x = self.block1(x, train=train)
    x = self.block2(x, train=train)
    return self.block3(x, train=train)


def load_conv_bn(layer: ConvBNReLU, params: Mapping[str, np.ndarray],
                 buffers: Mapping[str, np.ndarray], conv: str, bn: str) -> None:
  """Copies PyTorch `<conv>.weight` and BatchNorm `<bn>.{weight,bias,running_mean,running_var}`
  into `layer` (in place)."""
  layer.conv.kernel[...] = jnp.asarray(torch_conv_kernel(params[f"{conv}.weight"]))
  load_batch_norm(layer.bn, params, buffers, bn)


def load_batch_norm(bn: MaskedBatchNorm, params: Mapping[str, np.ndarray],
                    buffers: Mapping[str, np.ndarray], name: str) -> None:
  """Copies PyTorch BatchNorm `<name>.{weight,bias}` and its running statistics into `bn`."""
  bn.scale[...] = jnp.asarray(params[f"{name}.weight"], jnp.float32)
  bn.bias[...] = jnp.asarray(params[f"{name}.bias"], jnp.float32)
  bn.mean[...] = jnp.asarray(buffers[f"{name}.running_mean"], jnp.float32)
  bn.var[...] = jnp.asarray(buffers[f"{name}.running_var"], jnp.float32)


def load_encoder(enc: CNNEncoder, params: Mapping[str, np.ndarray],
                 buffers: Mapping[str, np.ndarray], prefix: str) -> None:
  """A PyTorch encoder with `<prefix>.block{1,2,3}.{0 conv, 1 bn}` into `enc` (in place)."""
  for i, block in enumerate((enc.block1, enc.block2, enc.block3), start=1):
    load_conv_bn(block, params, buffers, f"{prefix}.block{i}.0", f"{prefix}.block{i}.1")


def global_avg_pool(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, C)."""
  return x.mean(axis=(1, 2))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy (PyTorch CrossEntropyLoss): logits (B, C), labels (B,) int."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1).mean()


def band_conv3d(x: jax.Array, kernel: jax.Array, spatial_padding: int,
                block: int = 8) -> jax.Array:
  """PyTorch's Conv3d(1, F, (k, kh, kw), padding=(0, p, p)) over the (band, row, column) cube
  of a patch batch: x (B, P, P, C), kernel (k, kh, kw, 1, F) (DHWIO) -> (B, P', P', C - k + 1, F),
  P' = P + 2p - kh + 1 (square kernels; no bias).

  Computed as one 2-D convolution over (row, column): every window of `block` + k - 1
  consecutive bands (the band axis zero-padded to whole windows) is one batch entry and gives
  `block` output depths x F filters through a banded kernel, the same for every window. XLA's CPU
  Conv3d with one input channel is many times slower than this.
  """
  b, p, _, c = x.shape
  k, kh, kw, _, f = kernel.shape
  depth = c - k + 1
  windows = -(-depth // block)
  span = block + k - 1
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, windows * block + k - 1 - c)))
  x = jnp.stack([x[..., i * block:i * block + span] for i in range(windows)], axis=1)
  x = x.reshape(b * windows, p, p, span)  # (B * windows, P, P, span)
  band = np.zeros((span, block, k), np.float32)  # band[c, d, t] = 1 where c = d + t
  for d in range(block):
    band[d + np.arange(k), d, np.arange(k)] = 1.0
  w = jnp.einsum("cdt,thwf->hwcdf", band, kernel[:, :, :, 0, :]).reshape(kh, kw, span, block * f)
  y = jax.lax.conv_general_dilated(
      x, w, (1, 1), ((spatial_padding, spatial_padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
  q = y.shape[1]
  y = y.reshape(b, windows, q, q, block, f).transpose(0, 2, 3, 1, 4, 5)
  return y.reshape(b, q, q, windows * block, f)[:, :, :, :depth]


def grouped_conv2d(x: jax.Array, kernel: jax.Array, groups: int, padding: int) -> jax.Array:
  """PyTorch's grouped Conv2d (no bias): x (B, H, W, C_in), kernel (kh, kw, C_in / groups,
  C_out) HWIO, output channel o in group o // (C_out / groups) -> (B, H', W', C_out).

  Computed as one dense convolution with a block-diagonal kernel: XLA's CPU grouped
  convolution is slower than the dense one with `groups` times the work."""
  kh, kw, cin_g, cout = kernel.shape
  k = kernel.reshape(kh, kw, cin_g, groups, cout // groups)
  dense = jnp.einsum("hwcgo,gk->hwgcko", k, jnp.eye(groups, dtype=kernel.dtype))
  return jax.lax.conv_general_dilated(
      x, dense.reshape(kh, kw, cin_g * groups, cout), (1, 1), ((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
