"""Cross-HL: the Cross Hyperspectral and LiDAR attention transformer (Roy et al., TGRS 2024), as a
Flax NNX module with the semantics of the authors' public PyTorch code (AtriSukul1508/Cross-HL @
5543efb, `model/CrossHL_model.py:CrossHL_Transformer`, trained by `run.py` / `Cross_HL.ipynb`).

HSI branch: a Conv3d 1 -> 8 (9 x 3 x 3 over band x row x column, padding 0/1/1)-BN-ReLU whose
8 x (bands - 8) maps are merged into channels (index (bands - 8) * filter + depth), then a
heterogeneous conv (grouped 3x3 plus ungrouped 1x1, both with bias)-BN-ReLU to D = 4 * fm
channels: P*P pixel tokens, a CLS token in front and a position embedding added.
LiDAR branch: the patch averaged over its channels, flattened to P*P values: the query source
of every Cross-HL attention.
Two pre-norm encoder blocks (Cross-HL attention, MLP with exact GELU), a final LayerNorm, and a
linear classifier on the CLS token.

Complete-input fusion: a missing modality is fed as zeros (`keep` multiplies the inputs).
Arrays are channels-last; modalities are [HSI, LiDAR]; keep (B, 2) float32, 1 = present.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax import config, method
from dpmamba_jax.model.blocks import MaskedBatchNorm
from dpmamba_jax.model.conv import uniform_init
from dpmamba_jax.peers.cnn import band_conv3d, cross_entropy, grouped_conv2d, load_batch_norm

STAGES = ("model",)
MODALITY_NAMES = ("hsi", "lidar")
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CrossHLConfig:
  """bands: (HSI bands, LiDAR bands); fm: their FM (token width D = 4 * fm); heads: attention
  heads (their code needs D = heads**2: the 8 query rows of a head are as many as its 8 value
  rows); spectral_kernel / filters: the Conv3d's band depth and output maps; dropout: every
  Dropout of their model (embeddings, attention output, MLP)."""
  bands: tuple[int, ...]
  num_classes: int
  patch_size: int = 11
  fm: int = 16
  heads: int = 8
  mlp_dim: int = 512
  depth: int = 2
  spectral_kernel: int = 9
  filters: int = 8
  dropout: float = 0.1

  def __post_init__(self):
    object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))
    if len(self.bands) != 2:
      raise ValueError(f"Cross-HL takes two modalities (HSI, LiDAR); got bands {self.bands}")
    if self.bands[0] < self.spectral_kernel:
      raise ValueError(f"Cross-HL: {self.bands[0]} HSI bands, fewer than the Conv3d's "
                       f"{self.spectral_kernel}-band kernel")
    if self.dim != self.heads ** 2:
      raise ValueError(f"Cross-HL: token width {self.dim} must be heads**2 = {self.heads ** 2}")
    g = self.groups
    if g < 1 or self.merged % g or self.dim % g:
      raise ValueError(f"Cross-HL: the 3x3 conv's {g} groups must divide its {self.merged} "
                       f"input and {self.dim} output channels")

  @classmethod
  def tiny(cls, bands: tuple[int, ...] = (12, 1), num_classes: int = 3,
           patch_size: int = 5) -> CrossHLConfig:
    """A small model for fast tests (D = 16, 4 heads)."""
    return cls(bands=bands, num_classes=num_classes, patch_size=patch_size, fm=4, heads=4,
               mlp_dim=32, depth=2)

  @property
  def dim(self) -> int:
    """Token width D (their FM * 4)."""
    return 4 * self.fm

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads

  @property
  def merged(self) -> int:
    """Channels after merging the Conv3d maps: filters * (bands - spectral_kernel + 1)."""
    return self.filters * (self.bands[0] - self.spectral_kernel + 1)

  @property
  def groups(self) -> int:
    """Groups of the 3x3 heterogeneous conv, their rule: FM*4 // 4 if 8 * (bands - 8) is
    divisible by FM, else FM*4 // 8."""
    return self.dim // 4 if self.merged % self.fm == 0 else self.dim // 8

  @property
  def pixels(self) -> int:
    """P * P: the query linear's input size."""
    return self.patch_size ** 2

  @property
  def tokens(self) -> int:
    """P * P + 1 (with the CLS token): the value map's input size."""
    return self.pixels + 1


class CrossHLOutputs(NamedTuple):
  """Named outputs of one forward."""
  logits: jax.Array         # (B, num_classes)
  fused_feature: jax.Array  # (B, D): the CLS token after the final LayerNorm


def _linear(cin: int, cout: int, rngs: nnx.Rngs, *, use_bias: bool = True) -> nnx.Linear:
  """nn.Linear with PyTorch's default init U(+-1/sqrt(cin))."""
  bound = 1.0 / math.sqrt(cin)
  return nnx.Linear(cin, cout, use_bias=use_bias, kernel_init=uniform_init(bound),
                    bias_init=uniform_init(bound), precision=HIGHEST, rngs=rngs)


def _xavier_linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
  """Their MLP / classifier init: xavier-uniform weight, N(0, 1e-6) bias."""
  return nnx.Linear(cin, cout, kernel_init=nnx.initializers.xavier_uniform(),
                    bias_init=nnx.initializers.normal(1e-6), precision=HIGHEST, rngs=rngs)


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=1e-6, use_fast_variance=False, rngs=rngs)


def _dropout_masks(rng: jax.Array, rate: float, b: int, n: int,
                   widths: Sequence[int]) -> list[jax.Array]:
  """Keep masks (B, N, w) per width, from one uniform draw (one random op compiles much faster
  than one per dropout site)."""
  u = jax.random.uniform(rng, (b, n, sum(widths)))
  return jnp.split(u >= rate, np.cumsum(widths)[:-1].tolist(), axis=-1)


def _dropout(x: jax.Array, kept: jax.Array | None, rate: float) -> jax.Array:
  """Inverted dropout with keep mask `kept` (None: identity)."""
  if kept is None:
    return x
  return jnp.where(kept, x / (1.0 - rate), 0.0)


class SpectralConv3d(nnx.Module):
  """Conv3d 1 -> filters, kernel (k, 3, 3) over (band, row, column), padding (0, 1, 1), bias;
  BatchNorm3d; ReLU; the maps merged into channels as their reshape does."""

  def __init__(self, cfg: CrossHLConfig, *, rngs: nnx.Rngs):
    k, f = cfg.spectral_kernel, cfg.filters
    bound = 1.0 / math.sqrt(k * 9)
    self.kernel = nnx.Param(uniform_init(bound)(rngs.params(), (k, 3, 3, 1, f)))  # DHWIO
    self.bias = nnx.Param(uniform_init(bound)(rngs.params(), (f,)))
    self.bn = MaskedBatchNorm(f)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: (B, P, P, C) -> (B, P, P, filters * (C - k + 1))."""
    b, p, q, _ = x.shape
    y = band_conv3d(x, self.kernel[...], spatial_padding=1) + self.bias[...]  # (B, P, P, C', F)
    depth = y.shape[3]
    y = self.bn(y.reshape(b, p, q * depth, -1), train=train).reshape(y.shape)
    y = jax.nn.relu(y)
    # their (B, F, C', P, P) -> (B, F * C', P, P): channel index C' * filter + depth
    return jnp.transpose(y, (0, 1, 2, 4, 3)).reshape(b, p, q, -1)


class HetConvBNReLU(nnx.Module):
  """HetConv (grouped 3x3, padding 1, plus an ungrouped 1x1, both with bias) -> BN2d -> ReLU."""

  def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs):
    b3 = 1.0 / math.sqrt(cin // groups * 9)
    b1 = 1.0 / math.sqrt(cin)
    self.groups = groups
    self.group_kernel = nnx.Param(uniform_init(b3)(rngs.params(), (3, 3, cin // groups, cout)))
    self.group_bias = nnx.Param(uniform_init(b3)(rngs.params(), (cout,)))
    self.point_kernel = nnx.Param(uniform_init(b1)(rngs.params(), (cin, cout)))
    self.point_bias = nnx.Param(uniform_init(b1)(rngs.params(), (cout,)))
    self.bn = MaskedBatchNorm(cout)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: (B, P, P, cin) -> (B, P, P, cout)."""
    y = grouped_conv2d(x, self.group_kernel[...], self.groups, padding=1) + self.group_bias[...]
    y = y + jnp.matmul(x, self.point_kernel[...], precision=HIGHEST) + self.point_bias[...]
    return jax.nn.relu(self.bn(y, train=train))


class CrossHLAttention(nnx.Module):
  """Their CrossHL_attention: LiDAR queries, token keys, values mapped along the token axis."""

  def __init__(self, cfg: CrossHLConfig, *, rngs: nnx.Rngs):
    d, h = cfg.dim, cfg.heads
    self.heads = h
    self.scale = cfg.head_dim ** -0.5
    self.wq = _linear(cfg.pixels, d * h, rngs, use_bias=False)
    self.wk = _linear(d, d, rngs, use_bias=False)
    self.wv = _linear(cfg.tokens, d, rngs, use_bias=False)
    self.proj = _linear(d * h, d, rngs)

  def __call__(self, x: jax.Array, lidar: jax.Array) -> jax.Array:
    """x: (B, N, D) tokens; lidar: (B, P*P) channel-averaged LiDAR patch -> (B, N, D)."""
    b, n, d = x.shape
    h = self.heads
    q = self.wq(lidar).reshape(b, h, h, d // h)  # (B, heads, query rows, head_dim)
    k = self.wk(x).reshape(b, n, h, d // h).transpose(0, 2, 1, 3)  # (B, heads, N, head_dim)
    # a linear map along the token axis, V[b, c] = Wv x[b, :, c]; value[b, h, j, c] =
    # V[b, c, h * head_dim + j]
    v = self.wv(jnp.swapaxes(x, 1, 2))  # (B, D, D)
    v = v.reshape(b, d, h, d // h).transpose(0, 2, 3, 1)  # (B, heads, head_dim, D)
    att = jnp.einsum("bhid,bhjd->bhij", k, q, precision=HIGHEST) * self.scale  # (B, h, N, h)
    att = jax.nn.softmax(att, axis=-1)  # over the query rows
    out = jnp.einsum("bhij,bhjc->bhic", att, v, precision=HIGHEST)  # (B, heads, N, D)
    # their reshape keeps the head axis first: (B, heads, N, D) read row-major as (B, N, h*D)
    return self.proj(out.reshape(b, n, h * d))


class EncoderBlock(nnx.Module):
  """Pre-norm block: x + attention(LN(x), lidar), then x + MLP(LN(x)) (GELU, exact)."""

  def __init__(self, cfg: CrossHLConfig, *, rngs: nnx.Rngs):
    self.rate = cfg.dropout
    self.attention_norm = _layer_norm(cfg.dim, rngs)
    self.attention = CrossHLAttention(cfg, rngs=rngs)
    self.ffn_norm = _layer_norm(cfg.dim, rngs)
    self.fc1 = _xavier_linear(cfg.dim, cfg.mlp_dim, rngs)
    self.fc2 = _xavier_linear(cfg.mlp_dim, cfg.dim, rngs)

  def __call__(self, x: jax.Array, lidar: jax.Array,
               kept: Sequence[jax.Array | None]) -> jax.Array:
    """x: (B, N, D); lidar: (B, P*P); kept: the dropout keep masks of the attention output
    (B, N, D), the MLP hidden layer (B, N, mlp_dim) and the MLP output (B, N, D), or Nones
    -> (B, N, D)."""
    x = x + _dropout(self.attention(self.attention_norm(x), lidar), kept[0], self.rate)
    y = jax.nn.gelu(self.fc1(self.ffn_norm(x)), approximate=False)
    y = self.fc2(_dropout(y, kept[1], self.rate))
    return x + _dropout(y, kept[2], self.rate)


class CrossHL(nnx.Module):
  """CrossHL_Transformer."""

  def __init__(self, cfg: CrossHLConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.spectral = SpectralConv3d(cfg, rngs=rngs)
    self.hetconv = HetConvBNReLU(cfg.merged, cfg.dim, cfg.groups, rngs=rngs)
    self.position = nnx.Param(jax.random.normal(rngs.params(), (cfg.tokens, cfg.dim)))
    self.cls_token = nnx.Param(jnp.zeros((cfg.dim,), jnp.float32))
    self.blocks = nnx.List([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.encoder_norm = _layer_norm(cfg.dim, rngs)
    self.classifier = _xavier_linear(cfg.dim, cfg.num_classes, rngs)

  def outputs(self, xs: Sequence[jax.Array], keep: jax.Array | None = None, *,
              train: bool = False, rng: jax.Array | None = None) -> CrossHLOutputs:
    """xs: [(B, P, P, C_hsi), (B, P, P, C_lidar)]; keep: (B, 2) or None (both present): a
    missing modality is fed as zeros. train: BatchNorm on batch statistics (updating the
    running ones: Conv3d BN, then HetConv BN); dropout only in train mode with `rng`."""
    cfg = self.cfg
    hsi, lidar = xs
    b, p = hsi.shape[0], cfg.patch_size
    if hsi.shape[1:3] != (p, p) or lidar.shape[1:3] != (p, p):
      raise ValueError(f"Cross-HL: patches {hsi.shape[1:3]}, {lidar.shape[1:3]}, expected "
                       f"{(p, p)}")
    if keep is not None:
      keep = keep.astype(hsi.dtype)
      hsi = hsi * keep[:, 0, None, None, None]
      lidar = lidar * keep[:, 1, None, None, None]
    widths = [cfg.dim] + [cfg.dim, cfg.mlp_dim, cfg.dim] * cfg.depth
    if train and rng is not None and cfg.dropout > 0:
      kept = _dropout_masks(rng, cfg.dropout, b, cfg.tokens, widths)
    else:
      kept = [None] * len(widths)

    x = self.hetconv(self.spectral(hsi, train=train), train=train)  # (B, P, P, D)
    x = x.reshape(b, cfg.pixels, cfg.dim)  # row-major pixel tokens
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.dim))
    x = jnp.concatenate([cls, x], axis=1) + self.position[...]  # (B, N, D)
    x = _dropout(x, kept[0], cfg.dropout)
    query = lidar.reshape(b, cfg.pixels, -1).mean(axis=-1)  # (B, P*P)
    for i, block in enumerate(self.blocks):
      x = block(x, query, kept[1 + 3 * i: 4 + 3 * i])
    fused = self.encoder_norm(x)[:, 0]  # (B, D)
    return CrossHLOutputs(logits=self.classifier(fused), fused_feature=fused)

  def __call__(self, xs: Sequence[jax.Array], keep: jax.Array | None = None, *,
               train: bool = False, rng: jax.Array | None = None) -> jax.Array:
    """xs: [(B, P, P, C_hsi), (B, P, P, C_lidar)]; keep (B, 2) -> logits (B, num_classes)."""
    return self.outputs(xs, keep, train=train, rng=rng).logits


def loss_terms(out: CrossHLOutputs, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Their loss: CE(logits). -> (total, {"ce", "total"})."""
  ce = cross_entropy(out.logits, labels)
  return ce, {"ce": ce, "total": ce}


def model_loss(model: CrossHL, frozen: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
               keep: jax.Array, labels: jax.Array,
               rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """The one training stage: train-mode forward (dropout from `rng`) on the inputs zero-filled
  by `keep` (B, 2) -> (CE, terms, logits (B, num_classes)). `frozen` is unused."""
  del frozen
  out = model.outputs(xs, keep, train=True, rng=rng)
  total, terms = loss_terms(out, labels)
  return total, terms, out.logits


def build_model(shapes: method.Shapes, frozen: Mapping[str, nnx.Module],
                rngs: nnx.Rngs) -> CrossHL:
  """A fresh Cross-HL with the authors' widths for the dataset's (HSI, LiDAR) bands."""
  del frozen
  return CrossHL(CrossHLConfig(bands=shapes.bands, num_classes=shapes.num_classes,
                               patch_size=shapes.patch_size), rngs=rngs)


def classify(models: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
             keep: jax.Array) -> jax.Array:
  """Eval-mode logits (B, num_classes); a missing modality (keep row (B, 2)) is fed as zeros."""
  return models["model"](xs, keep, train=False)


# ------------------------------------------------------------------------------- importer

def _conv3d_to_jax(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 4, 1, 0))  # (O, I, kd, kh, kw) -> DHWIO


def _conv3d_to_torch(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (4, 3, 0, 1, 2))


def _conv2d_to_jax(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))  # (O, I/g, kh, kw) -> HWIO


def _conv2d_to_torch(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (3, 2, 0, 1))


def _pointwise_to_jax(w: np.ndarray) -> np.ndarray:
  return w[:, :, 0, 0].T  # (O, I, 1, 1) -> (I, O)


def _pointwise_to_torch(w: np.ndarray) -> np.ndarray:
  return w.T[:, :, None, None]


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _transpose(w: np.ndarray) -> np.ndarray:
  return w.T


def _pos_to_jax(w: np.ndarray) -> np.ndarray:
  return w[0]  # (1, N, D) -> (N, D)


def _cls_to_jax(w: np.ndarray) -> np.ndarray:
  return w[0, 0]  # (1, 1, D) -> (D,)


def _pos_to_torch(w: np.ndarray) -> np.ndarray:
  return w[None]


def _cls_to_torch(w: np.ndarray) -> np.ndarray:
  return w[None, None]


_Layout = Callable[[np.ndarray], np.ndarray]


def _param_table(model: CrossHL) -> list[tuple[str, nnx.Variable, _Layout, _Layout]]:
  """(PyTorch state-dict name, our variable, torch -> ours, ours -> torch) per parameter."""
  s, h = model.spectral, model.hetconv
  rows = [("position_embeddings", model.position, _pos_to_jax, _pos_to_torch),
          ("clsTok", model.cls_token, _cls_to_jax, _cls_to_torch),
          ("conv5.0.weight", s.kernel, _conv3d_to_jax, _conv3d_to_torch),
          ("conv5.0.bias", s.bias, _same, _same),
          ("conv5.1.weight", s.bn.scale, _same, _same),
          ("conv5.1.bias", s.bn.bias, _same, _same),
          ("hetconv_layer.0.groupwise_conv.weight", h.group_kernel, _conv2d_to_jax,
           _conv2d_to_torch),
          ("hetconv_layer.0.groupwise_conv.bias", h.group_bias, _same, _same),
          ("hetconv_layer.0.pointwise_conv.weight", h.point_kernel, _pointwise_to_jax,
           _pointwise_to_torch),
          ("hetconv_layer.0.pointwise_conv.bias", h.point_bias, _same, _same),
          ("hetconv_layer.1.weight", h.bn.scale, _same, _same),
          ("hetconv_layer.1.bias", h.bn.bias, _same, _same)]

  def linear(name: str, lin: nnx.Linear) -> None:
    rows.append((f"{name}.weight", lin.kernel, _transpose, _transpose))
    if lin.bias is not None:
      rows.append((f"{name}.bias", lin.bias, _same, _same))

  def norm(name: str, ln: nnx.LayerNorm) -> None:
    rows.append((f"{name}.weight", ln.scale, _same, _same))
    rows.append((f"{name}.bias", ln.bias, _same, _same))

  for i, blk in enumerate(model.blocks):
    pre = f"ca.layer.{i}"
    norm(f"{pre}.attention_norm", blk.attention_norm)
    norm(f"{pre}.ffn_norm", blk.ffn_norm)
    linear(f"{pre}.ffn.fclayer1", blk.fc1)
    linear(f"{pre}.ffn.fclayer2", blk.fc2)
    att = blk.attention
    for name, lin in (("Wq", att.wq), ("Wk", att.wk), ("Wv", att.wv),
                      ("linear_projection", att.proj)):
      linear(f"{pre}.cross_hl_attention.{name}", lin)
  norm("ca.encoder_norm", model.encoder_norm)
  linear("fclayer", model.classifier)
  return rows


def _batch_norms(model: CrossHL) -> list[tuple[str, MaskedBatchNorm]]:
  return [("conv5.1", model.spectral.bn), ("hetconv_layer.1", model.hetconv.bn)]


def load_torch(model: CrossHL, params: Mapping[str, np.ndarray],
               buffers: Mapping[str, np.ndarray], prefix: str = "") -> None:
  """Copies a PyTorch CrossHL_Transformer state dict (names as in `state_dict()`, with `prefix`
  in front) into `model` in place."""
  for name, var, to_jax, _ in _param_table(model):
    w = to_jax(np.asarray(params[prefix + name], np.float32))
    if w.shape != var.shape:
      raise ValueError(f"{prefix + name}: shape {w.shape}, expected {var.shape}")
    var[...] = jnp.asarray(w)
  for name, bn in _batch_norms(model):
    load_batch_norm(bn, params, buffers, prefix + name)


def torch_params(model: CrossHL) -> dict[str, np.ndarray]:
  """The model's nnx.Params under their PyTorch names and layouts (the inverse of
  `load_torch` for parameters)."""
  return {name: to_torch(np.asarray(var[...])) for name, var, _, to_torch in _param_table(model)}


def torch_buffers(model: CrossHL) -> dict[str, np.ndarray]:
  """BatchNorm running statistics under their PyTorch names (`<bn>.running_mean/var`)."""
  out: dict[str, np.ndarray] = {}
  for name, bn in _batch_norms(model):
    out[f"{name}.running_mean"] = np.asarray(bn.mean[...])
    out[f"{name}.running_var"] = np.asarray(bn.var[...])
  return out


# Their run.py (@6dfacac, lines 37-42 and 92-94): 11x11 patches of raw bands, batch 64, 100
# epochs, Adam (lr 5e-4, L2 weight decay 5e-3, PyTorch's betas and eps), StepLR(50, 0.9)
# stepped once an epoch; no warmup, no gradient clipping. Cross_HL.ipynb: the same, 10 epochs.
DEFAULTS = {"*": {
    "patch_size": 11, "pca": "raw", "batch_size": 64, "epochs_pretrain": 100,
    "optimizer": "adam", "lr": 5e-4, "weight_decay": 5e-3, "betas_pretrain": (0.9, 0.999),
    "eps": 1e-8, "lr_schedule": "step", "lr_step_epochs": 50, "lr_gamma": 0.9,
    "warmup_epochs": 0, "grad_clip": 0.0}}


def _stages(cfg: config.RunConfig, shapes: method.Shapes) -> tuple[method.Stage, ...]:
  return (method.peer_stage(cfg, name="model", build=build_model, loss=model_loss,
                            epochs=cfg.epochs_pretrain, index=0),)


def _check(shapes: method.Shapes) -> str | None:
  if shapes.num_modalities != 2:
    return (f"takes two modalities (HSI tokens, LiDAR queries), the dataset has "
            f"{shapes.num_modalities} ({', '.join(shapes.modalities)})")
  try:
    CrossHLConfig(bands=shapes.bands, num_classes=shapes.num_classes,
                  patch_size=shapes.patch_size)
  except ValueError as e:
    return str(e).removeprefix("Cross-HL: ")
  return None


METHOD = method.Method(
    name="crosshl", title="Cross-HL", stages=_stages, defaults=DEFAULTS, check=_check,
    scored=(method.Scored("crosshl", "Cross-HL", ("model",),
                          lambda models: method.Classifier(models, classify, 2),
                          zero_filled=True),))
