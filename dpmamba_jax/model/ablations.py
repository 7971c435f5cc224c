"""The pieces that replace a component in the ablation variants of the paper's Tables 1 and 3.

Switches (RunConfig keys, `--set KEY=VALUE`; the default is the paper's method):

  distill=kl        Variant-1   L_TBD replaced by KL distillation (T = 4), losses.kl_distill_loss
  backbone=vit      Variant-2a  modality-aware Mamba blocks replaced by transformer layers: `ViTBlock`
  fusion=add        Variant-2b  attention fusion (AF) replaced by a plain sum: `AddFusion`
  mixer=dwconv      Variant-2c  the selective scan (MISM) replaced by a depthwise 3x3 conv:
                                `DWConvMixer`
  prompts=false     Variant-3   the student has no prompts: missing features are zero-filled in
                                student training and at test time
  modalities=HSI    HSI-Net (LiDAR-Net, SAR-Net): the dataset restricted to the named modalities
                                (data/subsets.py)

The model-side switches are ModelConfig fields (backbone, fusion, mixer, prompts); blocks.py and
network.py build these modules in their place.

Variant-2a (`backbone=vit`): the modality-aware Mamba blocks replaced by a small ViT.

Every modality's embedded patch (B, P, P, h) (the same PatchEmbed as the method, with zeros or
prompts already in the slots of missing modalities) gives L = P*P tokens of width h; the M*L
tokens of all modalities attend jointly, so every layer mixes within and across modalities.
Each `ViTBlock` is one pre-LN transformer layer and takes the place of one MAMambaBlock (same
interface: M maps in, M maps out), so `depth` counts layers and the head is unchanged.

Where a token is (DETR-style, in every layer): a fixed 2-D sine-cosine position embedding of its
pixel (no parameters) plus a learned embedding of its modality (M, h), added to the queries and
keys (not the values).

Comparable size (how): width = hidden (64), heads = heads_per_direction (4, head dim 16, as the
SSM's), MLP ratio 1/2 (hidden 32, GELU), depth = depth (2), biases everywhere, no dropout. One
layer then has 4(h^2 + h) + (h h/2 + h/2) + (h/2 h + h) + 2 * 2h + M h = 21,216 parameters at
h = 64, M = 2 against 21,859 for one MAMambaBlock, so for Trento (M = 2, h = 64, depth 2) the
backbone has 42,432 parameters against the Mamba blocks' 43,718 (-2.9 %). The ratio 1/2 was
picked for that match (ratio 1 would give 50,624, +15.8 %). A ViTBlock's count does not grow
with M (a MAMambaBlock's does), so for three modalities the ViT is the smaller one.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax.model.conv import Conv3x3

MLP_RATIO = 0.5


def sincos_2d(p: int, dim: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding of a P x P grid: (P*P, dim) float32, raster order.

  The first dim // 2 channels encode the row, the rest the column (each half: sines then
  cosines of geometric frequencies, base 10000).
  """

  def one_d(pos, d):
    n = d // 2
    freq = 1.0 / (10000.0 ** (np.arange(n, dtype=np.float64) / max(n, 1)))
    ang = pos[:, None] * freq[None]  # (L, n)
    out = np.concatenate([np.sin(ang), np.cos(ang)], axis=1)
    return np.pad(out, ((0, 0), (0, d - 2 * n)))  # odd d: one zero channel

  rows, cols = np.divmod(np.arange(p * p, dtype=np.float64), p)
  return np.concatenate([one_d(rows, dim // 2), one_d(cols, dim - dim // 2)],
                        axis=1).astype(np.float32)


_trunc_normal_002 = jax.nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)


def _linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(cin, cout, kernel_init=_trunc_normal_002,
                    bias_init=jax.nn.initializers.zeros, rngs=rngs)


class ViTBlock(nnx.Module):
  """One pre-LN transformer layer over the M*L tokens of all modalities (Variant-2a).

  x <- x + Attn(LN(x) + e, LN(x) + e, LN(x)); x <- x + MLP(LN(x)), e = position + modality.

  Intermediate (only under network.capture_intermediates): "tokens", the layer's output
  (B, M*L, h).
  """
  sow_intermediates = False  # set only by network.capture_intermediates

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    h, m_count = cfg.hidden, cfg.num_modalities
    self.num_modalities = m_count
    self.heads = cfg.heads_per_direction
    mlp = max(1, int(round(h * MLP_RATIO)))
    self.ln1 = nnx.LayerNorm(h, epsilon=1e-5, rngs=rngs)
    self.q = _linear(h, h, rngs)
    self.k = _linear(h, h, rngs)
    self.v = _linear(h, h, rngs)
    self.o = _linear(h, h, rngs)
    self.ln2 = nnx.LayerNorm(h, epsilon=1e-5, rngs=rngs)
    self.fc1 = _linear(h, mlp, rngs)
    self.fc2 = _linear(mlp, h, rngs)
    self.modality_embed = nnx.Param(_trunc_normal_002(rngs.params(), (m_count, h)))  # (M, h)

  def __call__(self, fs: Sequence[jax.Array], *, key: jax.Array | None = None) -> list[jax.Array]:
    """fs: M arrays (B, P, P, h) -> M arrays (B, P, P, h). `key` is unused (no dropout)."""
    del key
    m_count = self.num_modalities
    b, p, _, h = fs[0].shape
    n_tok = p * p
    x = jnp.concatenate([f.reshape(b, n_tok, h) for f in fs], axis=1)  # (B, M*L, h)
    pos = jnp.asarray(sincos_2d(p, h))  # (L, h)
    emb = (pos[None] + self.modality_embed[...][:, None]).reshape(m_count * n_tok, h)  # (M*L, h)
    y = self.ln1(x)
    qk_in = y + emb[None]
    r = self.heads
    split = lambda t: t.reshape(b, m_count * n_tok, r, h // r)  # (B, T, R, h/R)
    q, k, v = split(self.q(qk_in)), split(self.k(qk_in)), split(self.v(y))
    logits = jnp.einsum("btrd,bsrd->brts", q, k) / math.sqrt(h // r)  # (B, R, T, T)
    attn = jax.nn.softmax(logits, axis=-1)
    a = jnp.einsum("brts,bsrd->btrd", attn, v).reshape(b, m_count * n_tok, h)
    x = x + self.o(a)
    x = x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)), approximate=False))
    if self.sow_intermediates:  # blocks.maybe_sow (blocks.py imports this module)
      self.sow(nnx.Intermediate, "tokens", x)
    return [x[:, m * n_tok:(m + 1) * n_tok].reshape(b, p, p, h) for m in range(m_count)]


class AddFusion(nnx.Module):
  """Variant-2b: fusion by addition, sum_i z_i (no 1/n mean, no parameters, no dropout).

  Same call signature as blocks.AttentionFusion; `rate` and `key` are accepted and ignored (there
  are no fusion weights to drop out). With one input it is the identity, as AF is.
  """

  def __init__(self):
    pass

  def __call__(self, zs: Sequence[jax.Array], *, rate: float = 0.0,
               key: jax.Array | None = None) -> jax.Array:
    """zs: n arrays (B, H, W, C) -> (B, H, W, C)."""
    del rate, key
    out = zs[0]
    for z in zs[1:]:
      out = out + z
    return out


class DWConvMixer(nnx.Module):
  """Variant-2c: the zigzag selective scan replaced by a depthwise 3x3 conv (+ bias), h -> h.

  Params: kernel (3, 3, 1, h), bias (h,): 10 h scalars (PyTorch default init, like conv.Conv3x3).
  Same call signature as blocks.ZigzagSSM (`impl` is ignored).
  """

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.conv = Conv3x3(hidden, hidden, hidden, rngs=rngs)

  def __call__(self, x: jax.Array, *, impl: str | None = None, layout: str = "NHWC") -> jax.Array:
    """x: (B, P, P, h) -> (B, P, P, h), or (P, P, B, h) with layout "HWNC"."""
    del impl
    return self.conv(x, layout)
