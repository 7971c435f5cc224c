"""ShaSpec (shared-specific feature learning), the HSI-LiDAR adaptation of Shi et al.'s
TGRS-DGDNet repository (`models/shaspec.py`, trained by `lib/model_develop.py`
`train_base_multi_shaspec`), as a Flax NNX module with PyTorch semantics.

Per modality a specific CNN encoder; one shared CNN encoder that sees the modality with more
bands directly and the other after a 1x1 projection to that band count. Each modality's
[specific, shared] maps pass one shared 1x1 projection plus the specific map as a residual; both
results are concatenated and go through two 3x3 conv-BN-ReLU layers, a global average pool and a
linear classifier. Side heads: a modality classifier and a unimodal classifier on the pooled
specific features.

Missing modality (feature level, one model): the missing modality's specific and shared maps are
zeroed per sample and its shared map is replaced by the present modality's shared map. The
authors detect "missing" by a shared map summing to exactly 0; this port uses the keep mask.

Arrays are channels-last; modalities are [HSI, LiDAR]; keep (B, 2) float32, 1 = present.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax import config
from dpmamba_jax import masks
from dpmamba_jax import method
from dpmamba_jax.model.conv import uniform_init
from dpmamba_jax.peers.cnn import (CNNEncoder, Conv2d, ConvBNReLU, cross_entropy,
                                   global_avg_pool, load_conv_bn,
                                   torch_conv_kernel, torch_linear_kernel)

STAGES = ("model",)
MODALITY_NAMES = ("hsi", "lidar")


@dataclasses.dataclass(frozen=True)
class ShaSpecConfig:
  """bands: (HSI bands, LiDAR bands); widths: encoder channels (the last one is the width of
  the specific / shared maps); fusion_widths: the two fusion conv layers; *_weight: loss
  coefficients of `train_base_multi_shaspec` (the unimodal terms are logged but weighted 0)."""
  bands: tuple[int, ...]
  num_classes: int
  patch_size: int = 7
  widths: tuple[int, int, int] = (32, 64, 128)
  fusion_widths: tuple[int, int] = (128, 64)
  shared_mse_weight: float = 1.0
  modality_weight: float = 0.02
  unimodal_weight: float = 0.0

  def __post_init__(self):
    if len(self.bands) != 2:
      raise ValueError(f"ShaSpec takes two modalities (HSI, LiDAR); got bands {self.bands}")

  @classmethod
  def tiny(cls, bands: tuple[int, ...] = (6, 1), num_classes: int = 3,
           patch_size: int = 7) -> "ShaSpecConfig":
    """A small model for fast tests."""
    return cls(bands=bands, num_classes=num_classes, patch_size=patch_size, widths=(4, 8, 8),
               fusion_widths=(8, 4))

  @property
  def projected(self) -> int:
    """Index of the modality fed to the shared encoder through the 1x1 projector: the one with
    fewer bands (the first one on a tie, as in their code)."""
    return self.bands.index(min(self.bands))


class ShaSpecOutputs(NamedTuple):
  """Named outputs of one forward. Maps are (B, h, h, W) with h = ceil(P / 2), W = widths[-1];
  tuples are per modality, [HSI, LiDAR]."""
  logits: jax.Array             # (B, num_classes)
  fused_feature: jax.Array      # (B, fusion_widths[-1])
  modality_logits: jax.Array    # (2B, 2): HSI rows, then LiDAR rows
  modality_labels: jax.Array    # (2B,) int32: B zeros, then B ones
  specific_pooled: jax.Array    # (2B, W)
  specific: tuple[jax.Array, ...]         # specific maps, before the keep mask
  shared: tuple[jax.Array, ...]           # shared maps, before the keep mask
  unimodal_logits: tuple[jax.Array, ...]  # (B, num_classes) per modality


def _linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
  """nn.Linear with PyTorch's default init."""
  bound = 1.0 / math.sqrt(cin)
  return nnx.Linear(cin, cout, kernel_init=uniform_init(bound), bias_init=uniform_init(bound),
                    precision=jax.lax.Precision.HIGHEST, rngs=rngs)


def _kaiming_fan_out(enc: CNNEncoder, rngs: nnx.Rngs) -> None:
  """Re-initialises the encoder's conv kernels as Couple_CNN does: kaiming_normal_(fan_out,
  relu), std = sqrt(2 / (out * kh * kw))."""
  for block in (enc.block1, enc.block2, enc.block3):
    kh, kw, _, cout = block.conv.kernel.shape
    std = math.sqrt(2.0 / (cout * kh * kw))
    block.conv.kernel[...] = std * jax.random.normal(rngs.params(), block.conv.kernel.shape)


class ShaSpec(nnx.Module):
  """ShaSpec_Classfication without its unused `modality_2_transfer` block."""

  def __init__(self, cfg: ShaSpecConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    w = cfg.widths[-1]
    big = max(cfg.bands)
    self.specific = nnx.List([CNNEncoder(b, cfg.widths, rngs=rngs) for b in cfg.bands])
    self.shared = CNNEncoder(big, cfg.widths, rngs=rngs)
    for enc in (*self.specific, self.shared):
      _kaiming_fan_out(enc, rngs)
    self.projector = Conv2d(cfg.bands[cfg.projected], big, 1, use_bias=True, rngs=rngs)
    self.fusion_projector = Conv2d(2 * w, w, 1, use_bias=True, rngs=rngs)
    self.fusion1 = ConvBNReLU(2 * w, cfg.fusion_widths[0], rngs=rngs)
    self.fusion2 = ConvBNReLU(cfg.fusion_widths[0], cfg.fusion_widths[1], rngs=rngs)
    self.classifier = _linear(cfg.fusion_widths[1], cfg.num_classes, rngs)
    self.unimodal_classifier = _linear(w, cfg.num_classes, rngs)
    self.modality_classifier = _linear(w, len(cfg.bands), rngs)

  def outputs(self, xs: Sequence[jax.Array], keep: jax.Array | None = None, *,
              train: bool = False) -> ShaSpecOutputs:
    """xs: [(B, P, P, C_hsi), (B, P, P, C_lidar)]; keep: (B, 2) or None (both present).

    BatchNorm call order (train mode updates running stats in it): HSI-specific,
    LiDAR-specific, shared encoder on the projected modality, shared encoder on the other,
    fusion layers.
    """
    b = xs[0].shape[0]
    m = len(xs)
    if keep is None:
      keep = jnp.ones((b, m), jnp.float32)
    specific = tuple(enc(x, train=train) for enc, x in zip(self.specific, xs))  # (B, h, h, W)
    proj = self.cfg.projected
    shared: list[jax.Array | None] = [None] * m
    for i in (proj, 1 - proj):
      x = self.projector(xs[i]) if i == proj else xs[i]  # (B, P, P, max band count)
      shared[i] = self.shared(x, train=train)

    k = keep.astype(jnp.float32)[:, :, None, None, None]  # (B, 2, 1, 1, 1)
    present = k != 0
    spec_m = [specific[i] * k[:, i] for i in range(m)]
    shared_m = [shared[i] * k[:, i] for i in range(m)]
    # a missing modality borrows the other one's shared map (theirs: HSI first, then LiDAR
    # from the possibly updated HSI map)
    shared_m[0] = jnp.where(present[:, 0], shared_m[0], shared_m[1])
    shared_m[1] = jnp.where(present[:, 1], shared_m[1], shared_m[0])

    fused = [self.fusion_projector(jnp.concatenate([spec_m[i], shared_m[i]], axis=-1))
             + spec_m[i] for i in range(m)]  # (B, h, h, W)
    h = self.fusion1(jnp.concatenate(fused, axis=-1), train=train)
    h = self.fusion2(h, train=train)
    fused_feature = global_avg_pool(h)  # (B, fusion_widths[-1])
    logits = self.classifier(fused_feature)

    pooled = [global_avg_pool(s) for s in specific]  # (B, W) each
    specific_pooled = jnp.concatenate(pooled, axis=0)  # (2B, W)
    return ShaSpecOutputs(
        logits=logits,
        fused_feature=fused_feature,
        modality_logits=self.modality_classifier(specific_pooled),
        modality_labels=jnp.repeat(jnp.arange(m, dtype=jnp.int32), b),
        specific_pooled=specific_pooled,
        specific=specific,
        shared=tuple(shared),
        unimodal_logits=tuple(self.unimodal_classifier(p) for p in pooled),
    )

  def __call__(self, xs: Sequence[jax.Array], keep: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """xs: [(B, P, P, C_hsi), (B, P, P, C_lidar)]; keep (B, 2) -> logits (B, num_classes)."""
    return self.outputs(xs, keep, train=train).logits


def loss_terms(out: ShaSpecOutputs, labels: jax.Array,
               cfg: ShaSpecConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of `train_base_multi_shaspec` on one forward's outputs: (total, terms).

  total = CE(logits) + shared_mse_weight * MSE(shared HSI map, shared LiDAR map)
          + modality_weight * CE(modality logits) + unimodal_weight * unimodal_total,
  unimodal_total = MSE(HSI head, LiDAR head) + CE(HSI head) + CE(LiDAR head).
  """
  task = cross_entropy(out.logits, labels)
  shared_mse = jnp.mean(jnp.square(out.shared[0] - out.shared[1]))
  modality = cross_entropy(out.modality_logits, out.modality_labels)
  uni_ce = [cross_entropy(z, labels) for z in out.unimodal_logits]
  uni_mse = jnp.mean(jnp.square(out.unimodal_logits[0] - out.unimodal_logits[1]))
  uni_total = uni_mse + sum(uni_ce)
  total = (task + cfg.shared_mse_weight * shared_mse + cfg.modality_weight * modality
           + cfg.unimodal_weight * uni_total)
  terms = {"task_ce": task, "shared_mse": shared_mse, "modality_ce": modality,
           "unimodal_logit_mse": uni_mse, "unimodal_total": uni_total, "total": total}
  for name, ce in zip(MODALITY_NAMES, uni_ce):
    terms[f"unimodal_ce_{name}"] = ce
  return total, terms


def model_loss(model: ShaSpec, frozen: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
               keep: jax.Array, labels: jax.Array,
               rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """The one training stage: train-mode forward with the batch's keep mask (B, 2) -> (total,
  terms, logits (B, num_classes)). `frozen` and `rng` are unused (no earlier stage, no dropout).
  """
  del frozen, rng
  out = model.outputs(xs, keep, train=True)
  total, terms = loss_terms(out, labels, model.cfg)
  return total, terms, out.logits


def build_model(bands: Sequence[int], num_classes: int, patch_size: int,
                frozen: Mapping[str, nnx.Module], rngs: nnx.Rngs) -> ShaSpec:
  """A fresh ShaSpec with the authors' widths for `bands` = (HSI bands, LiDAR bands)."""
  del frozen
  return ShaSpec(ShaSpecConfig(bands=tuple(bands), num_classes=num_classes,
                               patch_size=patch_size), rngs=rngs)


def classify(models: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
             keep: jax.Array) -> jax.Array:
  """Eval-mode logits (B, num_classes); each sample uses its own keep row (B, 2)."""
  return models["model"](xs, keep, train=False)


def draw_keep(rng: jax.Array, batch: int, num_modalities: int) -> jax.Array:
  """Their training-time `modality_drop` (p = [0, 0]): masks.random_subsets. -> (B, M)."""
  return masks.random_subsets(rng, batch, num_modalities)


def _conv_bn_layers(model: ShaSpec) -> list[tuple[str, ConvBNReLU]]:
  """(PyTorch Sequential prefix, layer) for every conv-BN-ReLU; conv = `.0`, BN = `.1`."""
  layers = []
  encoders = [(f"modality_encoder_{i + 1}", e) for i, e in enumerate(model.specific)]
  for prefix, enc in encoders + [("share_encoder", model.shared)]:
    for i, block in enumerate((enc.block1, enc.block2, enc.block3), start=1):
      layers.append((f"{prefix}.block{i}", block))
  layers += [("fusion.block_5_1", model.fusion1), ("fusion.block_5_2", model.fusion2)]
  return layers


def _biased_convs(model: ShaSpec) -> list[tuple[str, Conv2d]]:
  return [("modality_projector", model.projector), ("fusion_projector", model.fusion_projector)]


def _linears(model: ShaSpec) -> list[tuple[str, nnx.Linear]]:
  return [("target_classifier", model.classifier),
          ("unimodal_target_classifier", model.unimodal_classifier),
          ("modality_classifier", model.modality_classifier)]


def load_torch(model: ShaSpec, params: Mapping[str, np.ndarray],
               buffers: Mapping[str, np.ndarray], prefix: str = "") -> None:
  """Copies a PyTorch ShaSpec_Classfication state dict (names as in `state_dict()`, with
  `prefix` in front) into `model` in place. `modality_2_transfer.*` is ignored."""
  for name, layer in _conv_bn_layers(model):
    load_conv_bn(layer, params, buffers, f"{prefix}{name}.0", f"{prefix}{name}.1")
  for name, conv in _biased_convs(model):
    conv.kernel[...] = jnp.asarray(torch_conv_kernel(params[f"{prefix}{name}.weight"]))
    conv.bias[...] = jnp.asarray(params[f"{prefix}{name}.bias"], jnp.float32)
  for name, lin in _linears(model):
    lin.kernel[...] = jnp.asarray(torch_linear_kernel(params[f"{prefix}{name}.weight"]))
    lin.bias[...] = jnp.asarray(params[f"{prefix}{name}.bias"], jnp.float32)


def torch_params(model: ShaSpec) -> dict[str, np.ndarray]:
  """The model's nnx.Params under their PyTorch names and layouts (the inverse of
  `load_torch` for parameters). Works on a module whose Params hold gradients."""
  out: dict[str, np.ndarray] = {}
  for name, layer in _conv_bn_layers(model):
    out[f"{name}.0.weight"] = np.transpose(np.asarray(layer.conv.kernel[...]), (3, 2, 0, 1))
    out[f"{name}.1.weight"] = np.asarray(layer.bn.scale[...])
    out[f"{name}.1.bias"] = np.asarray(layer.bn.bias[...])
  for name, conv in _biased_convs(model):
    out[f"{name}.weight"] = np.transpose(np.asarray(conv.kernel[...]), (3, 2, 0, 1))
    out[f"{name}.bias"] = np.asarray(conv.bias[...])
  for name, lin in _linears(model):
    out[f"{name}.weight"] = np.asarray(lin.kernel[...]).T
    out[f"{name}.bias"] = np.asarray(lin.bias[...])
  return out


def torch_buffers(model: ShaSpec) -> dict[str, np.ndarray]:
  """BatchNorm running statistics under their PyTorch names (`<bn>.running_mean/var`)."""
  out: dict[str, np.ndarray] = {}
  for name, layer in _conv_bn_layers(model):
    out[f"{name}.1.running_mean"] = np.asarray(layer.bn.mean[...])
    out[f"{name}.1.running_var"] = np.asarray(layer.bn.var[...])
  return out


# Their Houston 2013 HSI + LiDAR scripts (docs/peers.md; the repository has no Trento setting):
# 7x7 patches of raw bands, batch 32, 500 epochs, SGD (Nesterov, momentum 0.9, lr 1e-3, weight
# decay 1e-3), a 5-epoch linear warmup, then cosine annealing over epochs + 20 to 1e-8.
DEFAULTS = {"*": {
    "patch_size": 7, "pca": "raw", "batch_size": 32, "epochs_pretrain": 500,
    "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3,
    "lr_schedule": "cosine", "warmup_epochs": 5, "lr_cosine_extra": 20, "lr_min": 1e-8,
    "grad_clip": 0.0}}


def _stages(cfg: config.RunConfig, shapes: method.Shapes) -> tuple[method.Stage, ...]:
  def build(shapes: method.Shapes, frozen, rngs: nnx.Rngs) -> ShaSpec:
    return build_model(shapes.bands, shapes.num_classes, shapes.patch_size, frozen, rngs)

  return (method.peer_stage(cfg, name="model", build=build, loss=model_loss,
                            keep_rule=draw_keep, epochs=cfg.epochs_pretrain, index=0),)


def _check(shapes: method.Shapes) -> str | None:
  if shapes.num_modalities != 2:
    return (f"takes two modalities (a specific encoder each and one shared encoder), the "
            f"dataset has {shapes.num_modalities} ({', '.join(shapes.modalities)})")
  return None


METHOD = method.Method(
    name="shaspec", title="ShaSpec", stages=_stages, defaults=DEFAULTS, check=_check,
    scored=(method.Scored("shaspec", "ShaSpec", ("model",),
                          lambda models: method.Classifier(models, classify, 2)),))
