"""The layers of DPMamba (spec §2.2-2.6): masked BatchNorm, attention fusion, the zigzag SSM,
the patch embedding and the modality-aware Mamba block."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dpmamba_jax.model import ablations
from dpmamba_jax.model import scan
from dpmamba_jax.model.conv import Conv3x3, uniform_init

# trunc_normal(std 0.02) with an absolute cut at +-2, i.e. +-100 std.
_trunc_normal_002 = jax.nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)


def linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
  """nn.Linear with the reference's init: trunc_normal(0.02) weights, zero bias."""
  return nnx.Linear(cin, cout, kernel_init=_trunc_normal_002,
                    bias_init=jax.nn.initializers.zeros, rngs=rngs)


def maybe_sow(module: nnx.Module, name: str, value: jax.Array, layout: str = "NHWC") -> None:
  """Records `value` as the nnx.Intermediate `name` of `module`, only while its
  `sow_intermediates` flag is set (`network.capture_intermediates` sets it for one call): a
  plain forward sows nothing and runs no extra op. Layout "HWNC" values, (P, P, B, ·), are
  recorded as (B, P, P, ·)."""
  if module.sow_intermediates:
    if layout == "HWNC":
      value = jnp.transpose(value, (2, 0, 1, 3))
    module.sow(nnx.Intermediate, name, value)


def layer_norm(features: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # LayerNorm2d: over channels at each pixel, biased variance, eps 1e-5.
  return nnx.LayerNorm(features, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


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
    self.score = nnx.Linear(hidden, 1, kernel_init=uniform_init(bound), bias_init=uniform_init(bound),
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
    self.x_proj = nnx.Param(uniform_init(1.0 / math.sqrt(hidden))(
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
  """conv 3x3 -> masked BatchNorm -> ReLU -> LayerNorm over channels (spec §2.2).

  Intermediate (`maybe_sow`): "embed_bn_relu", the ReLU output (B, P, P, hidden).
  """
  sow_intermediates = False  # set only by network.capture_intermediates

  def __init__(self, bands: int, hidden: int, *, rngs: nnx.Rngs):
    self.conv = Conv3x3(bands, hidden, 1, rngs=rngs)
    self.bn = MaskedBatchNorm(hidden)
    self.norm = layer_norm(hidden, rngs)

  def __call__(self, x, sample_mask=None, *, train=False, conv_out=None):
    """x: (B, P, P, bands) -> (B, P, P, hidden). conv_out: this conv's output, when computed
    already (`Conv3x3.patch_conv_from_scene`); x is not used then."""
    y = jax.nn.relu(self.bn(self.conv(x) if conv_out is None else conv_out, sample_mask,
                            train=train))
    maybe_sow(self, "embed_bn_relu", y)
    return self.norm(y)


class MAMambaBlock(nnx.Module):
  """Modality-aware Mamba block (spec §2.4): a cross branch plus one branch per modality.

  No residuals. For M == 1 there is no cross branch and the per-modality fusion sees only its
  own input (its softmax weight is 1).

  Features are (P, P, B, h) here (`layout` "HWNC", token-major): the selective scan runs on
  (P*P, B, h) tokens without a transpose, and the shifted convs slice whole (B, h) slabs.

  Intermediates (`maybe_sow`, all (B, P, P, h)): "cross_af", "cross_conv", "cross_ssm",
  "cross_out" (M >= 2) and "af/m{m}", "conv/m{m}", "ssm/m{m}".
  """
  layout = "HWNC"
  sow_intermediates = False  # set only by network.capture_intermediates

  def __init__(self, cfg, *, rngs: nnx.Rngs):  # cfg: network.ModelConfig
    h, m_count = cfg.hidden, cfg.num_modalities
    self.num_modalities = m_count
    self.af_dropout = cfg.af_dropout
    self.scan_impl = cfg.scan_impl
    ssm = lambda: ZigzagSSM(h, cfg.heads_per_direction, cfg.d_state, rngs=rngs)
    fuse = lambda: AttentionFusion(h, rngs=rngs)
    if cfg.mixer == "dwconv":  # ablation Variant-2c
      ssm = lambda: ablations.DWConvMixer(h, rngs=rngs)
    if cfg.fusion == "add":  # ablation Variant-2b
      fuse = ablations.AddFusion
    self.ln1 = nnx.List([layer_norm(h, rngs) for _ in range(m_count)])
    self.ln3 = nnx.List([layer_norm(h, rngs) for _ in range(m_count)])
    self.af = nnx.List([fuse() for _ in range(m_count)])
    self.conv = nnx.List([Conv3x3(h, h, h // 2, rngs=rngs) for _ in range(m_count)])
    self.ssm = nnx.List([ssm() for _ in range(m_count)])
    self.out_proj = nnx.List([linear(h, h, rngs) for _ in range(m_count)])
    if m_count >= 2:
      self.cross_af = fuse()
      self.ln2 = layer_norm(h, rngs)
      self.cross_conv = Conv3x3(h, h, h, rngs=rngs)  # depthwise
      self.cross_ssm = ssm()
      self.cross_proj = linear(h, h, rngs)

  def __call__(self, fs: Sequence[jax.Array], *, key: jax.Array | None = None) -> list[jax.Array]:
    """fs: M arrays (P, P, B, h) -> M arrays (P, P, B, h). key: AF dropout (train) or None."""
    m_count = self.num_modalities
    keys = [None] * (m_count + 1) if key is None else list(jax.random.split(key, m_count + 1))
    sow = lambda name, value: maybe_sow(self, name, value, self.layout)
    a = [self.ln1[m](fs[m]) for m in range(m_count)]
    c = None
    if m_count >= 2:
      c = self.cross_af(a, rate=self.af_dropout, key=keys[m_count])
      sow("cross_af", c)
      c = self.cross_conv(self.ln2(c), self.layout)
      sow("cross_conv", c)
      c = self.cross_ssm(c, impl=self.scan_impl, layout=self.layout)
      sow("cross_ssm", c)
      c = jax.nn.silu(self.cross_proj(c))
      sow("cross_out", c)
    outs = []
    for m in range(m_count):
      y = self.af[m]([a[m]] if c is None else [a[m], c], rate=self.af_dropout, key=keys[m])
      sow(f"af/m{m}", y)
      y = self.conv[m](self.ln3[m](y), self.layout)
      sow(f"conv/m{m}", y)
      y = self.ssm[m](y, impl=self.scan_impl, layout=self.layout)
      sow(f"ssm/m{m}", y)
      outs.append(jax.nn.silu(self.out_proj[m](y)))
    return outs
