"""HCT: a hierarchical CNN-transformer for HSI-LiDAR fusion (Zhao et al.), as a Flax NNX module
with PyTorch semantics.

What the authors' public code computes (zgr6010/Fusion_HCT @ 66531c7, `Trento_train/HCTnet.py`
`HCTnet`, trained by `Trento_train/Trento_train2.py`):

* HSI (after PCA, D components): a Conv3d 1 -> F (3x3x3, no padding, bias)-BN-ReLU over
  (component, row, column); its F x (D - 2) maps merged into F(D - 2) channels, channel index
  (D - 2) * filter + depth; a Conv2d to `dim` (3x3, no padding, bias)-BN-ReLU: (P - 4)^2 tokens.
  LiDAR: a Conv2d to `dim` (3x3, no padding, bias)-BN-ReLU: (P - 2)^2 tokens.
* One token learner shared by both branches: L tokens = softmax over pixels(x wA^T)^T (x wV).
  One CLS token and one position embedding, shared, are added to both branches.
* Fusion layers: per branch a pre-norm transformer (attention scale dim^-0.5, not per head; MLP
  dim -> mlp_dim -> dim, exact GELU), then cross-token attention: each branch's LayerNormed CLS
  token is the query, and it attends to itself (normalised) and the other branch's patch tokens
  (not normalised); heads x dim_head wide, scale dim_head^-0.5, plus a residual.
* logits = head(CLS_hsi) + head(CLS_lidar), one LayerNorm + linear head shared by both.
* Loss: CE. Dropout 0.1 after the embeddings, in attention and MLPs (off in eval).

Their model also builds a `transformer` its forward never calls; it is not built here.
The method has no missing-modality mode: a missing modality is fed as zeros.
Arrays are channels-last; modalities are [HSI, LiDAR]; keep (B, 2) float32, 1 = present.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax import config, method
from dpmamba_jax.model.blocks import MaskedBatchNorm
from dpmamba_jax.model.conv import uniform_init
from dpmamba_jax.peers.cnn import (
  band_conv3d,
  cross_entropy,
  load_batch_norm,
  torch_conv_kernel,
  torch_linear_kernel,
)

STAGES = ("model",)
MODALITY_NAMES = ("hsi", "lidar")
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class HCTConfig:
  """bands: (HSI components after PCA, LiDAR bands); filters: Conv3d output channels; dim: token
  width (both branches); num_tokens: token-learner tokens; depth: fusion layers, each with
  enc_depth transformer layers per branch (heads, mlp_dim) and ct_depth cross-token attention
  layers (ct_heads x ct_dim_head); dropout: in attention / MLPs; emb_dropout: after the
  embeddings. Defaults are the authors' (`HCTnet` arguments)."""
  bands: tuple[int, ...]
  num_classes: int
  patch_size: int = 11
  filters: int = 8
  dim: int = 64
  num_tokens: int = 4
  depth: int = 1
  enc_depth: int = 1
  heads: int = 8
  mlp_dim: int = 8
  ct_depth: int = 1
  ct_heads: int = 8
  ct_dim_head: int = 64
  dropout: float = 0.1
  emb_dropout: float = 0.1

  def __post_init__(self):
    object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))
    if len(self.bands) != 2:
      raise ValueError(f"HCT takes two modalities (HSI, LiDAR); got bands {self.bands}")
    if self.bands[0] < 3:
      raise ValueError(f"HCT's 3x3x3 Conv3d needs at least 3 HSI bands; got {self.bands[0]}")
    if self.patch_size < 5:
      raise ValueError(f"HCT's two unpadded 3x3 convs need patches of at least 5; got "
                       f"{self.patch_size}")
    if self.dim % self.heads:
      raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")

  @classmethod
  def tiny(cls, bands: tuple[int, ...] = (6, 1), num_classes: int = 3,
           patch_size: int = 7) -> HCTConfig:
    """A small model for fast tests."""
    return cls(bands=bands, num_classes=num_classes, patch_size=patch_size, filters=2, dim=8,
               num_tokens=2, heads=2, mlp_dim=4, ct_heads=2, ct_dim_head=4)

  @property
  def merged_channels(self) -> int:
    """Channels of the merged Conv3d output: filters x (HSI bands - 2)."""
    return self.filters * (self.bands[0] - 2)


class HCTOutputs(NamedTuple):
  """Named outputs of one forward; tuples are per branch, [HSI, LiDAR]."""
  logits: jax.Array                     # (B, num_classes): the sum of head_logits
  cls: tuple[jax.Array, ...]            # (B, dim) CLS tokens after the fusion layers
  head_logits: tuple[jax.Array, ...]    # (B, num_classes) the shared head on each CLS token


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  return [None] * n if key is None else list(jax.random.split(key, n))


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when key is None (eval, or train without dropout)."""
  if key is None or rate == 0.0:
    return x
  kept = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(kept, x / (1.0 - rate), 0.0)


def _linear(cin: int, cout: int, rngs: nnx.Rngs, *, use_bias: bool = True) -> nnx.Linear:
  """nn.Linear with PyTorch's default init."""
  bound = 1.0 / math.sqrt(cin)
  return nnx.Linear(cin, cout, use_bias=use_bias, kernel_init=uniform_init(bound),
                    bias_init=uniform_init(bound), precision=_HI, rngs=rngs)


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """nn.LayerNorm (eps 1e-5, two-pass variance)."""
  return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


class ValidConv(nnx.Module):
  """An unpadded, stride-1 convolution with bias (PyTorch Conv2d / Conv3d, padding 0, default
  init) over the trailing spatial axes: x (B, *S, C_in) -> (B, *(S - k + 1), C_out)."""

  def __init__(self, cin: int, cout: int, kernel: tuple[int, ...], *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(cin * math.prod(kernel))
    self.kernel = nnx.Param(uniform_init(bound)(rngs.params(), (*kernel, cin, cout)))
    self.bias = nnx.Param(uniform_init(bound)(rngs.params(), (cout,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, *S, C_in) -> (B, *S', C_out)."""
    spatial = "DHW"[-(x.ndim - 2):]
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    y = jax.lax.conv_general_dilated(x, self.kernel[...], (1,) * (x.ndim - 2), "VALID",
                                     dimension_numbers=dims, precision=_HI)
    return y + self.bias[...]


class SelfAttention(nnx.Module):
  """Their `Attention`: qkv (with bias), `heads` heads of dim / heads, scale dim^-0.5 (the token
  width, not the head width), output linear."""

  def __init__(self, dim: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
    self.heads = heads
    self.dropout = dropout
    self.to_qkv = _linear(dim, 3 * dim, rngs)
    self.proj = _linear(dim, dim, rngs)

  def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """x: (B, N, dim) -> (B, N, dim)."""
    b, n, dim = x.shape
    q, k, v = (t.reshape(b, n, self.heads, dim // self.heads)
               for t in jnp.split(self.to_qkv(x), 3, axis=-1))  # (B, N, H, d)
    dots = jnp.einsum("bihd,bjhd->bhij", q, k, precision=_HI) * dim ** -0.5
    out = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(dots, axis=-1), v, precision=_HI)
    return _dropout(self.proj(out.reshape(b, n, dim)), self.dropout, key)


class MLP(nnx.Module):
  """Their `MLP_Block`: linear, exact GELU, dropout, linear, dropout."""

  def __init__(self, dim: int, hidden: int, dropout: float, *, rngs: nnx.Rngs):
    self.dropout = dropout
    self.fc1 = _linear(dim, hidden, rngs)
    self.fc2 = _linear(hidden, dim, rngs)

  def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """x: (B, N, dim) -> (B, N, dim)."""
    k1, k2 = _keys(key, 2)
    h = _dropout(jax.nn.gelu(self.fc1(x), approximate=False), self.dropout, k1)
    return _dropout(self.fc2(h), self.dropout, k2)


class TransformerLayer(nnx.Module):
  """Pre-norm residual attention, then pre-norm residual MLP."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, *, rngs: nnx.Rngs):
    self.attn_norm = _layer_norm(dim, rngs)
    self.attn = SelfAttention(dim, heads, dropout, rngs=rngs)
    self.mlp_norm = _layer_norm(dim, rngs)
    self.mlp = MLP(dim, mlp_dim, dropout, rngs=rngs)

  def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """x: (B, N, dim) -> (B, N, dim)."""
    k1, k2 = _keys(key, 2)
    x = self.attn(self.attn_norm(x), k1) + x
    return self.mlp(self.mlp_norm(x), k2) + x


class CrossTokenAttention(nnx.Module):
  """Their pre-norm `CTAttention` on a CLS token with kv_include_self: the normalised CLS token
  queries [itself (normalised), the other branch's patch tokens (as given)]; residual on the
  unnormalised CLS token."""

  def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, *, rngs: nnx.Rngs):
    self.heads = heads
    self.dim_head = dim_head
    self.dropout = dropout
    self.norm = _layer_norm(dim, rngs)
    self.to_q = _linear(dim, heads * dim_head, rngs, use_bias=False)
    self.to_kv = _linear(dim, 2 * heads * dim_head, rngs, use_bias=False)
    self.to_out = _linear(heads * dim_head, dim, rngs)

  def __call__(self, cls: jax.Array, context: jax.Array, key: jax.Array | None) -> jax.Array:
    """cls: (B, 1, dim); context: (B, L, dim) -> (B, 1, dim)."""
    k1, k2 = _keys(key, 2)
    b = cls.shape[0]
    h, d = self.heads, self.dim_head
    x = self.norm(cls)
    ctx = jnp.concatenate([x, context], axis=1)  # (B, 1 + L, dim)
    q = self.to_q(x).reshape(b, 1, h, d)
    k, v = (t.reshape(b, ctx.shape[1], h, d) for t in jnp.split(self.to_kv(ctx), 2, axis=-1))
    dots = jnp.einsum("bihd,bjhd->bhij", q, k, precision=_HI) * d ** -0.5  # (B, H, 1, 1 + L)
    attn = _dropout(jax.nn.softmax(dots, axis=-1), self.dropout, k1)
    out = jnp.einsum("bhij,bjhd->bihd", attn, v, precision=_HI).reshape(b, 1, h * d)
    return _dropout(self.to_out(out), self.dropout, k2) + cls


class FusionLayer(nnx.Module):
  """One layer of their `FusionEncoder`: a transformer per branch, then ct_depth cross-token
  attention layers (HSI CLS on LiDAR patches, then LiDAR CLS on HSI patches)."""

  def __init__(self, cfg: HCTConfig, *, rngs: nnx.Rngs):
    def encoder():
      return nnx.List([TransformerLayer(cfg.dim, cfg.heads, cfg.mlp_dim, cfg.dropout, rngs=rngs)
                       for _ in range(cfg.enc_depth)])

    self.encoders = nnx.List([encoder(), encoder()])  # [HSI, LiDAR]
    self.cross = nnx.List([
        nnx.List([CrossTokenAttention(cfg.dim, cfg.ct_heads, cfg.ct_dim_head, cfg.dropout,
                                      rngs=rngs) for _ in range(2)])
        for _ in range(cfg.ct_depth)])

  def __call__(self, tokens: Sequence[jax.Array],
               key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """tokens: [HSI, LiDAR] (B, 1 + L, dim) each -> the same, CLS tokens updated."""
    keys = iter(_keys(key, 2 * len(self.encoders[0]) + 2 * len(self.cross)))
    out = []
    for enc, t in zip(self.encoders, tokens):
      for layer in enc:
        t = layer(t, next(keys))
      out.append(t)
    (h_cls, h_patch), (l_cls, l_patch) = ((t[:, :1], t[:, 1:]) for t in out)
    for h_attn, l_attn in self.cross:
      h_cls = h_attn(h_cls, l_patch, next(keys))
      l_cls = l_attn(l_cls, h_patch, next(keys))
    return (jnp.concatenate([h_cls, h_patch], axis=1),
            jnp.concatenate([l_cls, l_patch], axis=1))


class HCT(nnx.Module):
  """HCTnet without its unused `transformer`."""

  def __init__(self, cfg: HCTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dim, n_tok = cfg.dim, cfg.num_tokens
    self.conv3d = ValidConv(1, cfg.filters, (3, 3, 3), rngs=rngs)  # its params (cnn.band_conv3d)
    self.bn3d = MaskedBatchNorm(cfg.filters)
    self.conv2d = ValidConv(cfg.merged_channels, dim, (3, 3), rngs=rngs)
    self.bn2d = MaskedBatchNorm(dim)
    self.lidar_conv = ValidConv(cfg.bands[1], dim, (3, 3), rngs=rngs)
    self.lidar_bn = MaskedBatchNorm(dim)
    # xavier_normal_ of their (1, L, dim) and (1, dim, dim) tensors: fan_in = size(1) * dim,
    # fan_out = dim
    self.token_wa = nnx.Param(math.sqrt(2.0 / (n_tok * dim + dim))
                              * jax.random.normal(rngs.params(), (n_tok, dim)))
    self.token_wv = nnx.Param(math.sqrt(2.0 / (dim * dim + dim))
                              * jax.random.normal(rngs.params(), (dim, dim)))
    self.pos_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (n_tok + 1, dim)))
    self.cls_token = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.fusion = nnx.List([FusionLayer(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.head_norm = _layer_norm(dim, rngs)
    self.head = _linear(dim, cfg.num_classes, rngs)

  def _hsi_features(self, x: jax.Array, train: bool) -> jax.Array:
    """x: (B, P, P, D) -> (B, (P - 4)^2, dim)."""
    b = x.shape[0]
    y = band_conv3d(x, self.conv3d.kernel[...], spatial_padding=0) + self.conv3d.bias[...]
    q, dd = y.shape[1], y.shape[3]  # y: (B, P - 2, P - 2, D - 2, F)
    y = self.bn3d(y.reshape(b, q, q * dd, -1), train=train)  # stats over B x pixels x depth
    y = jax.nn.relu(y).reshape(b, q, q, dd, -1)
    y = jnp.transpose(y, (0, 1, 2, 4, 3)).reshape(b, q, q, -1)  # channel = (D - 2) * f + depth
    y = jax.nn.relu(self.bn2d(self.conv2d(y), train=train))  # (B, P - 4, P - 4, dim)
    return y.reshape(b, -1, y.shape[-1])

  def _lidar_features(self, x: jax.Array, train: bool) -> jax.Array:
    """x: (B, P, P, C) -> (B, (P - 2)^2, dim)."""
    y = jax.nn.relu(self.lidar_bn(self.lidar_conv(x), train=train))
    return y.reshape(y.shape[0], -1, y.shape[-1])

  def _tokens(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """The shared token learner, CLS token and position embedding: (B, N, dim) ->
    (B, 1 + L, dim)."""
    attn = jax.nn.softmax(jnp.einsum("bnc,lc->bln", x, self.token_wa[...], precision=_HI),
                          axis=-1)  # (B, L, N), over pixels
    values = jnp.einsum("bnc,cd->bnd", x, self.token_wv[...], precision=_HI)
    t = jnp.einsum("bln,bnd->bld", attn, values, precision=_HI)  # (B, L, dim)
    cls = jnp.broadcast_to(self.cls_token[...], (t.shape[0], 1, t.shape[-1]))
    t = jnp.concatenate([cls, t], axis=1) + self.pos_embedding[...]
    return _dropout(t, self.cfg.emb_dropout, key)

  def outputs(self, xs: Sequence[jax.Array], keep: jax.Array | None = None, *,
              train: bool = False, dropout_key: jax.Array | None = None) -> HCTOutputs:
    """xs: [(B, P, P, D_hsi), (B, P, P, C_lidar)]; keep (B, 2): a modality with 0 is fed as
    zeros (None: both present).

    train: batch-statistics BatchNorm (running stats updated in the order HSI Conv3d, HSI
    Conv2d, LiDAR Conv2d); dropout only with `dropout_key`.
    """
    if len(xs) != 2:
      raise ValueError(f"HCT takes two modalities (HSI, LiDAR); got {len(xs)}")
    xs = zero_fill(xs, keep)
    if not train or (self.cfg.dropout == 0.0 and self.cfg.emb_dropout == 0.0):
      dropout_key = None
    keys = _keys(dropout_key, 2 + len(self.fusion))
    hsi = self._tokens(self._hsi_features(xs[0], train), keys[0])  # (B, 1 + L, dim)
    lidar = self._tokens(self._lidar_features(xs[1], train), keys[1])
    for layer, key in zip(self.fusion, keys[2:]):
      hsi, lidar = layer((hsi, lidar), key)
    cls = (hsi[:, 0], lidar[:, 0])
    head_logits = tuple(self.head(self.head_norm(c)) for c in cls)
    return HCTOutputs(logits=head_logits[0] + head_logits[1], cls=cls, head_logits=head_logits)

  def __call__(self, xs: Sequence[jax.Array], keep: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """xs: [(B, P, P, D_hsi), (B, P, P, C_lidar)]; keep (B, 2) zero-fills missing modalities
    -> logits (B, num_classes)."""
    return self.outputs(xs, keep, train=train).logits


def zero_fill(xs: Sequence[jax.Array], keep: jax.Array | None) -> list[jax.Array]:
  """Each x (B, P, P, C_m) times keep[:, m] (B, M); keep None: unchanged."""
  if keep is None:
    return list(xs)
  k = jnp.asarray(keep, jnp.float32)
  return [x * k[:, m, None, None, None] for m, x in enumerate(xs)]


def model_loss(model: HCT, frozen: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
               keep: jax.Array, labels: jax.Array,
               rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """The one training stage: CE of a train-mode forward (dropout from `rng`) on the inputs
  zero-filled by keep (B, 2) -> (total, {"ce", "total"}, logits (B, num_classes))."""
  del frozen
  out = model.outputs(xs, keep, train=True, dropout_key=rng)
  total, terms = loss_terms(out, labels)
  return total, terms, out.logits


def loss_terms(out: HCTOutputs, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Their loss on one forward's outputs: (total, {"ce", "total"}), total = CE(logits)."""
  ce = cross_entropy(out.logits, labels)
  return ce, {"ce": ce, "total": ce}


def build_model(shapes: method.Shapes, frozen: Mapping[str, nnx.Module],
                rngs: nnx.Rngs) -> HCT:
  """A fresh HCT with the authors' widths for the dataset's shapes: bands = (HSI channels, the
  PCA components under `pca: N`; LiDAR bands)."""
  del frozen
  return HCT(HCTConfig(bands=shapes.bands, num_classes=shapes.num_classes,
                       patch_size=shapes.patch_size), rngs=rngs)


def classify(models: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
             keep: jax.Array) -> jax.Array:
  """Eval-mode logits (B, num_classes), missing modalities (keep (B, 2) = 0) zero-filled."""
  return models["model"](xs, keep, train=False)


# ----------------------------------------------------------------------------------------------
# PyTorch state-dict names.


def _batch_norms(model: HCT) -> list[tuple[str, MaskedBatchNorm]]:
  return [("conv3d_features.1", model.bn3d), ("conv2d_features.1", model.bn2d),
          ("conv2d_features2.1", model.lidar_bn)]


def _convs(model: HCT) -> list[tuple[str, ValidConv]]:
  return [("conv3d_features.0", model.conv3d), ("conv2d_features.0", model.conv2d),
          ("conv2d_features2.0", model.lidar_conv)]


def _linears_and_norms(model: HCT) -> tuple[list[tuple[str, nnx.Linear]],
                                            list[tuple[str, nnx.LayerNorm]]]:
  lins = [("mlp_head.1", model.head)]
  norms = [("mlp_head.0", model.head_norm)]
  for i, layer in enumerate(model.fusion):
    pre = f"fusion_encoder.layers.{i}"
    for j, enc in enumerate(layer.encoders):
      for k, t in enumerate(enc):
        p = f"{pre}.{j}.layers.{k}"
        norms += [(f"{p}.0.fn.norm", t.attn_norm), (f"{p}.1.fn.norm", t.mlp_norm)]
        lins += [(f"{p}.0.fn.fn.to_qkv", t.attn.to_qkv), (f"{p}.0.fn.fn.nn1", t.attn.proj),
                 (f"{p}.1.fn.fn.net.0", t.mlp.fc1), (f"{p}.1.fn.fn.net.3", t.mlp.fc2)]
    for k, pair in enumerate(layer.cross):
      for j, ct in enumerate(pair):
        p = f"{pre}.2.layers.{k}.{j}.fn"
        norms.append((f"{p}.norm", ct.norm))
        lins += [(f"{p}.fn.to_q", ct.to_q), (f"{p}.fn.to_kv", ct.to_kv),
                 (f"{p}.fn.to_out.0", ct.to_out)]
  return lins, norms


def _torch_conv3d_kernel(w: np.ndarray) -> np.ndarray:
  """PyTorch Conv3d weight (out, in, kd, kh, kw) -> (kd, kh, kw, in, out)."""
  return np.transpose(np.asarray(w, np.float32), (2, 3, 4, 1, 0))


def load_torch(model: HCT, params: Mapping[str, np.ndarray],
               buffers: Mapping[str, np.ndarray], prefix: str = "") -> None:
  """Copies a PyTorch HCTnet state dict (names as in `state_dict()`, with `prefix` in front)
  into `model` in place. `transformer.*` (never called) is ignored."""
  def arr(name: str) -> jax.Array:
    return jnp.asarray(params[prefix + name], jnp.float32)

  for name, conv in _convs(model):
    w = np.asarray(params[f"{prefix}{name}.weight"])
    conv.kernel[...] = jnp.asarray(_torch_conv3d_kernel(w) if w.ndim == 5
                                   else torch_conv_kernel(w))
    conv.bias[...] = arr(f"{name}.bias")
  for name, bn in _batch_norms(model):
    load_batch_norm(bn, params, buffers, prefix + name)
  lins, norms = _linears_and_norms(model)
  for name, lin in lins:
    lin.kernel[...] = jnp.asarray(torch_linear_kernel(params[f"{prefix}{name}.weight"]))
    if lin.bias is not None:
      lin.bias[...] = arr(f"{name}.bias")
  for name, norm in norms:
    norm.scale[...] = arr(f"{name}.weight")
    norm.bias[...] = arr(f"{name}.bias")
  model.token_wa[...] = arr("token_wA")[0]
  model.token_wv[...] = arr("token_wV")[0]
  model.pos_embedding[...] = arr("pos_embedding")[0]
  model.cls_token[...] = arr("cls_token")[0, 0]


def torch_buffers(model: HCT) -> dict[str, np.ndarray]:
  """BatchNorm running statistics under their PyTorch names (`<bn>.running_mean/var`)."""
  out: dict[str, np.ndarray] = {}
  for name, bn in _batch_norms(model):
    out[f"{name}.running_mean"] = np.asarray(bn.mean[...])
    out[f"{name}.running_var"] = np.asarray(bn.var[...])
  return out


# Their Trento_train/Trento_train2.py: 11x11 patches, batch 64, 100 epochs, Adam (lr 1e-3,
# PyTorch's betas and eps, no weight decay), a constant lr, no clipping; the HSI reduced to 30
# whitened PCA components, LiDAR as is. PCA 30 is set per named dataset: the built-in synthetic
# scene (24 bands) and dataset files keep their own inputs (`--set pca=N` to change).
_PCA = 30
DEFAULTS = {
    "*": {"patch_size": 11, "batch_size": 64, "epochs_pretrain": 100, "optimizer": "adam",
          "lr": 1e-3, "betas_pretrain": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
          "lr_schedule": "constant", "warmup_epochs": 0, "grad_clip": 0.0},
    **{name: {"pca": _PCA} for name in ("trento", "houston", "muufl", "augsburg")},
}


def _stages(cfg: config.RunConfig, shapes: method.Shapes) -> tuple[method.Stage, ...]:
  return (method.peer_stage(cfg, name="model", build=build_model, loss=model_loss,
                            epochs=cfg.epochs_pretrain, index=0),)


def _check(shapes: method.Shapes) -> str | None:
  if shapes.num_modalities != 2:
    return (f"takes two modalities (an HSI and a LiDAR branch), the dataset has "
            f"{shapes.num_modalities} ({', '.join(shapes.modalities)})")
  if shapes.bands[0] < 3 or shapes.patch_size < 5:
    return (f"needs at least 3 {shapes.modalities[0]} bands and patches of at least 5 (its "
            f"unpadded 3x3x3 and 3x3 convs); got {shapes.bands[0]} bands, patch "
            f"{shapes.patch_size}")
  return None


METHOD = method.Method(
    name="hct", title="HCT", stages=_stages, defaults=DEFAULTS, check=_check,
    scored=(method.Scored("hct", "HCT", ("model",),
                          lambda models: method.Classifier(models, classify, 2),
                          zero_filled=True),))
