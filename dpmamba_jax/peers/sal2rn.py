"""Sal2RN (Li et al., TGRS 2022): spatial-spectral salient reinforcement network for HSI + LiDAR,
as the public PyTorch code of lyz123-xidian/TGRS-Sal2RN @ 5a4fd61 computes it
(`network/sal2rn.py`, trained and tested by `demo.py`).

Three branches, each with its own classifier, on complete inputs (channels-last):
* spatial, on N PCA components of the HSI patch: three stages of a dilated 3x3 conv-BN-ReLU
  (dilations 1, 2, 5) plus a parallel plain 3x3 conv-BN-ReLU, summed (P -> P-2 -> P-4 -> P-6);
  the last stage's two outputs pass a 3x3 conv-BN-ReLU each (a, b); a gate alpha from [a, b]
  (1x1 conv with zero padding 1 -> BN -> ReLU -> the mean of the top-left 5x5 window, i.e.
  their AvgPool2d(5) keeping one window -> sigmoid); alpha*a + (1-alpha)*b, max-pooled (2,
  stride 1), flattened in (C, H, W) order, an MLP (ReLU, dropout 0.4) and a linear head;
* spectral, on the raw HSI bands: m = the patch mean per band; g = BN(1x1 conv(ReLU(BN(m))));
  g*m (no sigmoid) -> two 1x1 conv-BN-LeakyReLU(0.2) layers (bands -> 64 -> bands) -> linear;
* LiDAR: three 3x3 conv-BN-ReLU-maxpool(2)-dropout(0.5) layers (32, 64, 128) -> linear.
Loss 0.01*CE(spatial) + 0.01*CE(spectral) + 1*CE(LiDAR). Decision fusion:
logits = w[2]*LiDAR + w[1]*spectral + w[0]*spatial with per-class weights w (3, C) that
`decision_weights` derives from each head's per-class accuracy on the training pixels (eval
mode), normalised over the three heads per class.

The HSI input is the pipeline's `pca: raw+N`: [raw bands..., N PCA components...]; its first
`spectral_bands` (= Shapes.raw_bands[0]) channels feed the spectral branch, the rest the
spatial branch.

Two stages: `branches` trains the network; `model` takes over its parameters and fills in its
decision weights from one eval-mode pass over the training pixels, with no parameter update
(`decision_step`), so the saved model holds them.
Missing modalities: none in the method; evaluation zero-fills the missing input.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax import config
from dpmamba_jax import errors
from dpmamba_jax import method
from dpmamba_jax import sharding
from dpmamba_jax import steps
from dpmamba_jax.model.blocks import MaskedBatchNorm
from dpmamba_jax.model.conv import uniform_init
from dpmamba_jax.peers.cnn import cross_entropy, torch_conv_kernel, torch_linear_kernel

BRANCHES = "branches"   # stage 1: the three branches trained with the weighted CE
MODEL = "model"         # stage 2: the same network with its decision weights filled in
STAGES = (BRANCHES, MODEL)
HEADS = ("spatial", "spectral", "lidar")   # the rows of the decision weights
MIN_PATCH, MAX_PATCH = 9, 13               # the gate's pooling keeps exactly one window


@dataclasses.dataclass(frozen=True)
class Sal2RNConfig:
  """bands: (HSI channels = spectral_bands raw bands + PCA components, LiDAR bands);
  spectral_bands: the raw HSI bands at the start of the HSI input (the spectral branch's
  input; the rest is the spatial branch's); widths: the three spatial stages; gate_width: the
  two maps the gate mixes; mlp_widths: the spatial MLP; spectral_hidden: the spectral 1x1 conv
  width; lidar_widths: the LiDAR convs; loss_weights: CE weights of the (spatial, spectral,
  LiDAR) heads."""
  bands: tuple[int, ...]
  spectral_bands: int
  num_classes: int
  patch_size: int = 11
  widths: tuple[int, int, int] = (16, 32, 64)
  gate_width: int = 64
  gate_pool: int = 5
  mlp_widths: tuple[int, int] = (512, 256)
  mlp_dropout: float = 0.4
  spectral_hidden: int = 64
  leaky_slope: float = 0.2
  lidar_widths: tuple[int, int, int] = (32, 64, 128)
  lidar_dropout: float = 0.5
  loss_weights: tuple[float, float, float] = (0.01, 0.01, 1.0)

  def __post_init__(self):
    if len(self.bands) != 2:
      raise ValueError(f"Sal2RN takes two modalities (HSI, LiDAR); got bands {self.bands}")
    if not 0 < self.spectral_bands < self.bands[0]:
      raise ValueError(f"spectral_bands {self.spectral_bands}: expected 1 to "
                       f"{self.bands[0] - 1} (the HSI input is [raw bands, PCA components])")
    if not MIN_PATCH <= self.patch_size <= MAX_PATCH:
      raise ValueError(f"patch size {self.patch_size}: expected {MIN_PATCH} to {MAX_PATCH}")

  @classmethod
  def tiny(cls, bands: tuple[int, ...] = (10, 1), spectral_bands: int = 6, num_classes: int = 3,
           patch_size: int = 9) -> Sal2RNConfig:
    """A small model for fast tests."""
    return cls(bands=bands, spectral_bands=spectral_bands, num_classes=num_classes,
               patch_size=patch_size, widths=(4, 4, 8), gate_width=8, mlp_widths=(16, 8),
               spectral_hidden=8, lidar_widths=(4, 4, 8))

  @classmethod
  def from_dict(cls, d: Mapping[str, object]) -> Sal2RNConfig:
    """The inverse of dataclasses.asdict after a JSON round trip (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

  @property
  def pca_bands(self) -> int:
    return self.bands[0] - self.spectral_bands

  @property
  def spatial_features(self) -> int:
    """The flattened gated map: gate_width x (P - 7)^2 (their 1024 for P = 11)."""
    return self.gate_width * (self.patch_size - 7) ** 2

  @property
  def lidar_side(self) -> int:
    """The LiDAR map's side after three 2x2 max pools (1 for P = 9..13)."""
    return self.patch_size // 2 // 2 // 2


class DecisionWeights(nnx.Variable):
  """Per-class weights of the three heads (3, C), set after training, never trained."""


class Sal2RNOutputs(NamedTuple):
  """One forward's outputs (the parity file's names)."""
  logits: jax.Array             # (B, C) decision fusion with the model's decision weights
  logits_spatial: jax.Array     # (B, C)
  logits_spectral: jax.Array    # (B, C)
  logits_lidar: jax.Array       # (B, C)
  spatial_feature: jax.Array    # (B, gate_width * (P-7)^2), flattened in (C, H, W) order
  spatial_hidden: jax.Array     # (B, mlp_widths[-1])
  spectral_feature: jax.Array   # (B, spectral_bands)
  lidar_feature: jax.Array      # (B, lidar_widths[-1] * side^2)


class _Conv(nnx.Module):
  """PyTorch Conv2d (groups 1, bias) with explicit zero padding and dilation, default init;
  a 1x1 one on (B, 1, 1, C) is their Conv1d(kernel 1) on (B, C, 1)."""

  def __init__(self, cin: int, cout: int, kernel_size: int, *, padding: int = 0,
               dilation: int = 1, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(cin * kernel_size * kernel_size)
    self.kernel = nnx.Param(uniform_init(bound)(rngs.params(),
                                                (kernel_size, kernel_size, cin, cout)))
    self.bias = nnx.Param(uniform_init(bound)(rngs.params(), (cout,)))
    self.padding = padding
    self.dilation = dilation

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C_in) -> (B, H', W', C_out)."""
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (1, 1), ((p, p), (p, p)), rhs_dilation=(self.dilation,) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    return y + self.bias[...]


class _ConvBN(nnx.Module):
  """_Conv -> BatchNorm (the caller applies the activation)."""

  def __init__(self, cin: int, cout: int, kernel_size: int, *, padding: int = 0,
               dilation: int = 1, rngs: nnx.Rngs):
    self.conv = _Conv(cin, cout, kernel_size, padding=padding, dilation=dilation, rngs=rngs)
    self.bn = MaskedBatchNorm(cout)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """x: (B, H, W, C_in) -> (B, H', W', C_out)."""
    return self.bn(self.conv(x), train=train)


def _linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
  """nn.Linear with PyTorch's default init."""
  bound = 1.0 / math.sqrt(cin)
  return nnx.Linear(cin, cout, kernel_init=uniform_init(bound), bias_init=uniform_init(bound),
                    precision=jax.lax.Precision.HIGHEST, rngs=rngs)


def _max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """MaxPool2d (no padding, floor): (B, H, W, C) -> (B, H', W', C)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), "VALID")


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """nn.Dropout(rate) in train mode (inverted scaling); identity without a key."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _flatten_chw(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, C*H*W) in PyTorch's (C, H, W) order."""
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class Sal2RN(nnx.Module):
  """Their `sal2rn` without the layers its forward never calls (`linear1`, `conv4`), plus the
  decision weights (3, C) that demo.py keeps beside the state dict."""

  def __init__(self, cfg: Sal2RNConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    w1, w2, w3 = cfg.widths
    g = cfg.gate_width
    n_pca, n_raw, c = cfg.pca_bands, cfg.spectral_bands, cfg.num_classes
    # spatial: dilated path (conv*) and plain path (res*)
    self.conv1 = _ConvBN(n_pca, w1, 3, rngs=rngs)
    self.conv2 = _ConvBN(w1, w2, 3, padding=1, dilation=2, rngs=rngs)
    self.conv3 = _ConvBN(w2, w3, 3, padding=4, dilation=5, rngs=rngs)
    self.res1 = _ConvBN(n_pca, w1, 3, rngs=rngs)
    self.res2 = _ConvBN(w1, w2, 3, rngs=rngs)
    self.res3 = _ConvBN(w2, w3, 3, rngs=rngs)
    self.afm1 = _ConvBN(w3, g, 3, padding=1, rngs=rngs)
    self.afm2 = _ConvBN(w3, g, 3, padding=1, rngs=rngs)
    self.gate = _ConvBN(2 * g, g, 1, padding=1, rngs=rngs)
    self.fc1 = _linear(cfg.spatial_features, cfg.mlp_widths[0], rngs)
    self.fc2 = _linear(cfg.mlp_widths[0], cfg.mlp_widths[1], rngs)
    self.spatial_head = _linear(cfg.mlp_widths[1], c, rngs)
    # spectral
    self.spe_bn = MaskedBatchNorm(n_raw)
    self.spe_gate = _ConvBN(n_raw, n_raw, 1, rngs=rngs)
    self.spe1 = _ConvBN(n_raw, cfg.spectral_hidden, 1, rngs=rngs)
    self.spe2 = _ConvBN(cfg.spectral_hidden, n_raw, 1, rngs=rngs)
    self.spectral_head = _linear(n_raw, c, rngs)
    # LiDAR
    l1, l2, l3 = cfg.lidar_widths
    self.lidar1 = _ConvBN(cfg.bands[1], l1, 3, padding=1, rngs=rngs)
    self.lidar2 = _ConvBN(l1, l2, 3, padding=1, rngs=rngs)
    self.lidar3 = _ConvBN(l2, l3, 3, padding=1, rngs=rngs)
    self.lidar_head = _linear(l3 * cfg.lidar_side ** 2, c, rngs)
    self.decision_weights = DecisionWeights(jnp.full((len(HEADS), c), 1.0 / len(HEADS),
                                                     jnp.float32))

  def _spatial(self, x: jax.Array, train: bool, keys: Sequence[jax.Array | None]
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: (B, P, P, N PCA) -> (logits (B, C), feature (B, F), hidden (B, mlp_widths[-1]))."""
    relu = jax.nn.relu
    for conv, res in ((self.conv1, self.res1), (self.conv2, self.res2)):
      x = relu(conv(x, train=train)) + relu(res(x, train=train))
    a = relu(self.afm1(relu(self.conv3(x, train=train)), train=train))  # (B, P-6, P-6, G)
    b = relu(self.afm2(relu(self.res3(x, train=train)), train=train))
    gate = relu(self.gate(jnp.concatenate([a, b], axis=-1), train=train))  # (B, P-4, P-4, G)
    k = self.cfg.gate_pool
    alpha = jax.nn.sigmoid(gate[:, :k, :k, :].mean(axis=(1, 2)))[:, None, None, :]  # (B,1,1,G)
    fused = alpha * a + (1.0 - alpha) * b
    feature = _flatten_chw(_max_pool(fused, 2, 1))  # (B, G * (P-7)^2)
    h = _dropout(relu(self.fc1(feature)), self.cfg.mlp_dropout, keys[0])
    h = _dropout(relu(self.fc2(h)), self.cfg.mlp_dropout, keys[1])
    return self.spatial_head(h), feature, h

  def _spectral(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """x: (B, P, P, raw bands) -> (logits (B, C), feature (B, raw bands))."""
    m = x.mean(axis=(1, 2), keepdims=True)  # (B, 1, 1, R): their AvgPool2d(11) on 11x11
    g = self.spe_gate(jax.nn.relu(self.spe_bn(m, train=train)), train=train)
    h = g * m
    h = jax.nn.leaky_relu(self.spe1(h, train=train), self.cfg.leaky_slope)
    h = jax.nn.leaky_relu(self.spe2(h, train=train), self.cfg.leaky_slope)
    feature = h[:, 0, 0, :]  # (B, R)
    return self.spectral_head(feature), feature

  def _lidar(self, x: jax.Array, train: bool, keys: Sequence[jax.Array | None]
             ) -> tuple[jax.Array, jax.Array]:
    """x: (B, P, P, LiDAR bands) -> (logits (B, C), feature (B, lidar_widths[-1] * side^2))."""
    for layer, key in zip((self.lidar1, self.lidar2, self.lidar3), keys):
      x = _dropout(_max_pool(jax.nn.relu(layer(x, train=train)), 2, 2),
                   self.cfg.lidar_dropout, key)
    feature = _flatten_chw(x)
    return self.lidar_head(feature), feature

  def outputs(self, xs: Sequence[jax.Array], *, train: bool = False,
              dropout_key: jax.Array | None = None) -> Sal2RNOutputs:
    """xs: [(B, P, P, spectral_bands + N PCA) HSI, (B, P, P, C_lidar)], complete inputs.
    dropout_key: the dropouts' key in train mode (None: no dropout). BatchNorm call order:
    spatial, spectral, LiDAR branch (each layer once)."""
    hsi, lidar = xs
    if hsi.shape[-1] != self.cfg.bands[0] or lidar.shape[-1] != self.cfg.bands[1]:
      raise ValueError(f"Sal2RN built for bands {self.cfg.bands}, got inputs with "
                       f"{(hsi.shape[-1], lidar.shape[-1])}")
    keys: list[jax.Array | None] = [None] * 5
    if train and dropout_key is not None:
      keys = list(jax.random.split(dropout_key, 5))
    n_raw = self.cfg.spectral_bands
    spatial, feature, hidden = self._spatial(hsi[..., n_raw:], train, keys[:2])
    spectral, spectral_feature = self._spectral(hsi[..., :n_raw], train)
    lidar_logits, lidar_feature = self._lidar(lidar, train, keys[2:])
    return Sal2RNOutputs(
        logits=fuse(self.decision_weights[...], spatial, spectral, lidar_logits),
        logits_spatial=spatial, logits_spectral=spectral, logits_lidar=lidar_logits,
        spatial_feature=feature, spatial_hidden=hidden, spectral_feature=spectral_feature,
        lidar_feature=lidar_feature)

  def head_logits(self, xs: Sequence[jax.Array]) -> jax.Array:
    """Eval-mode logits of the three heads (B, 3, C), rows in HEADS order."""
    out = self.outputs(xs)
    return jnp.stack([out.logits_spatial, out.logits_spectral, out.logits_lidar], axis=1)

  def __call__(self, xs: Sequence[jax.Array], keep: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """Fused logits (B, C); keep (B, 2): a missing modality's input is zero-filled."""
    return self.outputs(zero_fill(xs, keep), train=train).logits


def fuse(weights: jax.Array, spatial: jax.Array, spectral: jax.Array,
         lidar: jax.Array) -> jax.Array:
  """demo.py's decision fusion: w[2]*LiDAR + w[1]*spectral + w[0]*spatial, w (3, C), logits
  (B, C) each (raw logits, not probabilities) -> (B, C)."""
  return weights[2] * lidar + weights[1] * spectral + weights[0] * spatial


def decision_weights(predictions: np.ndarray, labels: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """demo.py's per-class weights from the heads' training predictions.

  predictions: (N, 3) int, each head's argmax (HEADS order) on the training pixels; labels:
  (N,) int. right[k, c] = pixels of class c that head k gets right; w[k, c] = right[k, c] /
  (sum_k right[k, c] + 1e-5) (per class, normalised over the heads; in float64 as their
  Python floats, then float32). A class no head gets right has all-zero weights. -> (3, C).
  """
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  hit = predictions == labels[:, None]  # (N, 3)
  right = np.stack([np.bincount(labels[hit[:, k]], minlength=num_classes)[:num_classes]
                    for k in range(predictions.shape[1])]).astype(np.float64)  # (3, C)
  return (right / (right.sum(axis=0, keepdims=True) + 1e-5)).astype(np.float32)


def zero_fill(xs: Sequence[jax.Array], keep: jax.Array | None) -> list[jax.Array]:
  """xs with each modality multiplied by its keep column (B, M); keep None: unchanged."""
  if keep is None:
    return list(xs)
  keep = keep.astype(jnp.float32)
  return [x * keep[:, i, None, None, None] for i, x in enumerate(xs)]


def loss_terms(out: Sal2RNOutputs, labels: jax.Array,
               cfg: Sal2RNConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """demo.py's loss: 0.01*CE(spatial) + 0.01*CE(spectral) + 1*CE(LiDAR) -> (total, terms)."""
  terms = {f"ce_{name}": cross_entropy(z, labels) for name, z in
           zip(HEADS, (out.logits_spatial, out.logits_spectral, out.logits_lidar))}
  total = sum(w * terms[f"ce_{name}"] for w, name in zip(cfg.loss_weights, HEADS))
  terms["total"] = total
  return total, terms


def train_forward(model: Sal2RN, xs: Sequence[jax.Array], keep: jax.Array, labels: jax.Array,
                  rng: jax.Array | None
                  ) -> tuple[Sal2RNOutputs, jax.Array, dict[str, jax.Array]]:
  """Train-mode forward on the inputs zero-filled by keep (B, 2), dropout from `rng` (None: no
  dropout) -> (outputs, total loss, terms)."""
  out = model.outputs(zero_fill(xs, keep), train=True, dropout_key=rng)
  total, terms = loss_terms(out, labels, model.cfg)
  return out, total, terms


def model_loss(model: Sal2RN, frozen: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
               keep: jax.Array, labels: jax.Array,
               rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """Stage `branches` (method.LossFn): `train_forward` -> (total, terms, logits (B, C) fused
  with the current decision weights, equal ones during training)."""
  del frozen
  out, total, terms = train_forward(model, xs, keep, labels, rng)
  return total, terms, out.logits


def classify(models: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
             keep: jax.Array) -> jax.Array:
  """Eval-mode fused logits (B, C) of the final model; a missing modality is zero-filled."""
  return models[MODEL](xs, keep, train=False)


# ------------------------------------------------------------------------- the weights stage

def _set_weights(graphdef: nnx.GraphDef, state: steps.TrainState,
                 weights: jax.Array) -> steps.TrainState:
  """The train state with the model's decision weights replaced (parameters unchanged)."""
  model = nnx.merge(graphdef, state.params, state.batch_stats)
  model.decision_weights[...] = weights
  _, _, rest = steps.split_model(model)
  return state.replace(batch_stats=rest, step=state.step + 1)


def decision_step(ctx: method.StepContext) -> Callable:
  """Step factory of stage `model`: no gradient, no update; the stage's model is a copy of the
  trained `branches` network and this fills in its decision weights.

  Once per stage the frozen network's three heads run in eval mode on every training pixel (as
  demo.py, on the whole training set with cnn.eval()); the weights follow from their per-class
  accuracies and every step of the stage's one epoch sets them. Metrics: each head's training OA
  and the fused one (`train_oa`).
  """
  net = ctx.frozen[BRANCHES]
  if not isinstance(net, Sal2RN):
    raise TypeError(f"{BRANCHES!r} is a {type(net).__name__}, expected Sal2RN")
  gd, params, rest = steps.split_model(net)
  frozen = (params, rest)
  if ctx.mesh is not None:
    frozen = sharding.replicate(frozen, ctx.mesh)

  def heads(frozen, cubes, idx):
    model = nnx.merge(gd, *frozen)
    return model.head_logits(steps.gather_batch(cubes, idx, ctx.width, ctx.patch_size))

  program = jax.jit(heads)
  idx = np.asarray(ctx.train_idx, np.int32)
  b = ctx.batch_size
  padded = np.concatenate([idx, np.repeat(idx[-1:], -idx.size % b)])
  logits = np.concatenate(jax.device_get(
      [program(frozen, ctx.cubes, ctx.to_device(padded[i:i + b]))
       for i in range(0, padded.size, b)]))[:idx.size]  # (N, 3, C)
  preds = logits.argmax(axis=-1)  # (N, 3)
  labels = np.asarray(ctx.train_labels)
  w = decision_weights(preds, labels, logits.shape[-1])  # (3, C)
  fused = np.einsum("kc,nkc->nc", w, logits).argmax(axis=-1)
  metrics = {"loss": 0.0, "grad_norm": 0.0, "lr": 0.0, "train_oa": np.mean(fused == labels),
             **{f"oa_{name}": np.mean(preds[:, k] == labels) for k, name in enumerate(HEADS)}}
  metrics = {k: np.float32(v) for k, v in metrics.items()}
  w_dev = jnp.asarray(w) if ctx.mesh is None else sharding.replicate(jnp.asarray(w), ctx.mesh)

  def run(state: steps.TrainState, rows: np.ndarray, batch_labels: np.ndarray):
    del rows, batch_labels
    return _set_weights(ctx.graphdef, state, w_dev), metrics

  return run


# ------------------------------------------------------------------------------ build, import

def _pca_problem(shapes: method.Shapes) -> str | None:
  if not shapes.raw_bands or shapes.bands[0] <= shapes.raw_bands[0]:
    return ("needs pca=raw+N: its spectral branch takes the HSI's bands, its spatial branch N "
            "PCA components (theirs: raw+48)")
  return None


def config_for(shapes: method.Shapes) -> Sal2RNConfig:
  """The authors' Sal2RN for a dataset's shapes; the HSI input must be `pca: raw+N`
  (shapes.bands[0] = raw_bands[0] raw bands + N components)."""
  why = _pca_problem(shapes)
  if why:
    raise errors.UserError(f"sal2rn: {why}")
  return Sal2RNConfig(bands=tuple(shapes.bands), spectral_bands=int(shapes.raw_bands[0]),
                      num_classes=int(shapes.num_classes), patch_size=int(shapes.patch_size))


def _shell(cfg: Sal2RNConfig) -> Sal2RN:
  """A Sal2RN of abstract arrays (no initialisers run), to be filled with nnx.update."""
  return nnx.eval_shape(lambda: Sal2RN(cfg, rngs=nnx.Rngs(0)))


def build_branches(shapes: method.Shapes, frozen: Mapping[str, nnx.Module],
                   rngs: nnx.Rngs) -> Sal2RN:
  """Stage `branches`: a fresh Sal2RN (PyTorch's default initialisation)."""
  del frozen
  return Sal2RN(config_for(shapes), rngs=rngs)


def build_model(frozen: Mapping[str, nnx.Module], shapes: method.Shapes,
                seed: int) -> tuple[Sal2RN, dict]:
  """Stage `model`: the trained `branches` network (its arrays; the trainer copies them before
  any donation), saved with its config."""
  del seed
  net = frozen[BRANCHES]
  if not isinstance(net, Sal2RN):
    raise TypeError(f"{BRANCHES!r} is a {type(net).__name__}, expected Sal2RN")
  model = _shell(net.cfg)
  nnx.update(model, nnx.state(net))
  return model, {"shapes": dataclasses.asdict(shapes), "model": dataclasses.asdict(net.cfg)}


def restore_model(saved: dict, frozen: Mapping[str, nnx.Module]) -> Sal2RN:
  """Stage `model`'s structure from its saved config (to load its checkpoint into)."""
  del frozen
  return _shell(Sal2RNConfig.from_dict(saved["model"]))


def _weights_optim(steps_per_epoch: int) -> steps.OptimConfig:
  """Stage `model` makes no update; its optimiser is never applied (lr 0, no decay)."""
  return steps.plain_optim_config(
      optimizer="adam", lr=0.0, weight_decay=0.0, momentum=0.0, nesterov=False,
      betas=(0.9, 0.999), eps=1e-8, grad_clip=0.0, schedule="constant",
      steps_per_epoch=steps_per_epoch, epochs=1)


def _stages(cfg: config.RunConfig, shapes: method.Shapes) -> tuple[method.Stage, ...]:
  branches = method.peer_stage(cfg, name=BRANCHES, build=build_branches, loss=model_loss,
                               epochs=cfg.epochs_pretrain, index=0)
  weights = method.Stage(name=MODEL, model=MODEL, reads=(BRANCHES,), epochs=1,
                         batch_size=cfg.batch_size, build=build_model, restore=restore_model,
                         optim=_weights_optim, step=decision_step, sampler="shuffle")
  return branches, weights


def _conv_layers(model: Sal2RN) -> list[tuple[str, _ConvBN]]:
  """(PyTorch BatchNorm name, conv-BN layer) in forward order; the conv is the Sequential's
  previous index."""
  return [("conv1.1", model.conv1), ("res1.1", model.res1), ("conv2.1", model.conv2),
          ("res2.1", model.res2), ("conv3.1", model.conv3), ("res3.1", model.res3),
          ("afm_conv1.1", model.afm1), ("afm_conv2.1", model.afm2), ("afm_conv3.1", model.gate),
          ("spe_conv2.1", model.spe_gate), ("spe_conv3.1", model.spe1),
          ("spe_conv3.4", model.spe2), ("lidar_conv.1", model.lidar1),
          ("lidar_conv.6", model.lidar2), ("lidar_conv.11", model.lidar3)]


def _bn_layers(model: Sal2RN) -> list[tuple[str, MaskedBatchNorm]]:
  """(PyTorch BatchNorm name, layer): every conv's BatchNorm and the spectral input's."""
  return [(name, layer.bn) for name, layer in _conv_layers(model)] + [("spe_conv1.1",
                                                                       model.spe_bn)]


def _linears(model: Sal2RN) -> list[tuple[str, nnx.Linear]]:
  return [("out1.0", model.fc1), ("out1.3", model.fc2), ("out1_final.0", model.spatial_head),
          ("out2.1", model.spectral_head), ("out3.0", model.lidar_head)]


def _conv_name(bn_name: str) -> str:
  stem, _, i = bn_name.rpartition(".")
  return f"{stem}.{int(i) - 1}"


def _put(a: np.ndarray) -> jax.Array:
  """A host array on the device as float32 (device_put: no per-shape compile)."""
  return jax.device_put(np.asarray(a, np.float32))


def load_torch(model: Sal2RN, params: Mapping[str, np.ndarray],
               buffers: Mapping[str, np.ndarray]) -> None:
  """Copies a PyTorch `sal2rn` state dict (names as in `state_dict()`) into `model` in place.
  Conv1d weights (out, in, 1) become 1x1 kernels; `linear1.*` and `conv4.*` (never called) are
  ignored. The decision weights are not in the state dict (set `model.decision_weights`)."""
  for bn_name, layer in _conv_layers(model):
    conv = _conv_name(bn_name)
    w = np.asarray(params[f"{conv}.weight"], np.float32)
    if w.ndim == 3:  # Conv1d (out, in, 1)
      w = w[..., None]
    layer.conv.kernel[...] = _put(torch_conv_kernel(w))
    layer.conv.bias[...] = _put(params[f"{conv}.bias"])
  for name, bn in _bn_layers(model):
    bn.scale[...] = _put(params[f"{name}.weight"])
    bn.bias[...] = _put(params[f"{name}.bias"])
    bn.mean[...] = _put(buffers[f"{name}.running_mean"])
    bn.var[...] = _put(buffers[f"{name}.running_var"])
  for name, lin in _linears(model):
    lin.kernel[...] = _put(torch_linear_kernel(params[f"{name}.weight"]))
    lin.bias[...] = _put(params[f"{name}.bias"])


def torch_buffers(model: Sal2RN) -> dict[str, np.ndarray]:
  """BatchNorm running statistics under their PyTorch names (`<bn>.running_mean/var`)."""
  out: dict[str, np.ndarray] = {}
  for name, bn in _bn_layers(model):
    out[f"{name}.running_mean"] = np.asarray(bn.mean[...])
    out[f"{name}.running_var"] = np.asarray(bn.var[...])
  return out


# demo.py (Trento, the repository's only script): 11x11 patches, NC = 48 PCA components for the
# spatial branch and the raw bands for the spectral one, batch 64, 250 epochs, Adam lr 1e-3
# (PyTorch defaults otherwise: no weight decay, constant lr, no clipping).
DEFAULTS = {
    "*": {"patch_size": 11, "pca": "raw+48", "batch_size": 64, "epochs_pretrain": 250,
          "optimizer": "adam", "lr": 1e-3, "betas_pretrain": (0.9, 0.999), "eps": 1e-8,
          "weight_decay": 0.0, "lr_schedule": "constant", "warmup_epochs": 0,
          "grad_clip": 0.0},
    # the built-in test scene has 24 HSI bands: fewer components than bands
    "synthetic": {"pca": "raw+16"},
}


def _check(shapes: method.Shapes) -> str | None:
  if shapes.num_modalities != 2:
    return (f"takes two modalities (HSI + LiDAR/SAR), the dataset has "
            f"{shapes.num_modalities} ({', '.join(shapes.modalities)})")
  if not MIN_PATCH <= shapes.patch_size <= MAX_PATCH:
    return (f"patch_size={shapes.patch_size}: its dilated convolutions and one-window gate "
            f"need {MIN_PATCH} to {MAX_PATCH} (theirs: 11)")
  return _pca_problem(shapes)


METHOD = method.Method(
    name="sal2rn", title="Sal2RN", stages=_stages, defaults=DEFAULTS, check=_check,
    scored=(method.Scored("sal2rn", "Sal2RN", (MODEL,),
                          lambda models: method.Classifier({MODEL: models[MODEL]}, classify, 2),
                          zero_filled=True),))
