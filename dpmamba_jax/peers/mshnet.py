"""MSH-Net (Wei et al., TGRS 2023; shicaiwei123/TGRS-MSHNet): modality-shared hallucination with
joint adaptation distillation, as its public PyTorch code computes it (docs/peers.md).

Networks (channels-last, one per training stage):
* `Teacher` on complete inputs: per modality two 3x3 conv-BN-ReLU layers (zero padding) and a
  stride-2 3x3 conv-BN-ReLU block; every modality's stride-2 block is applied to every modality's
  features. The fused input is, per block j, the mean over modalities i of block_j(features_i),
  concatenated over j; a shared head (1x1 conv-BN-ReLU, 1x1 conv-BN-ReLU, average pooling, linear)
  classifies it. The same head on path_i = concat_j block_j(features_i) gives one "joint path"
  logit set per modality.
* `UniNet` (the single-modality networks and the hallucination students share it): a CNN encoder
  whose 3x3 convolutions replicate edge pixels, a 1x1 conv-BN-ReLU (`feature_map`), pooling, linear.
* `Ensemble`, per modality: fuse_weight_1 * fc_student(student pool) + fuse_weight_2 *
  fc_single(single pool); it holds only the two classifiers and the two weights, the frozen
  student and single network are passed in.

Stages, in training order (`stages(M)`): teacher; single_<m> per modality (CE); student_<m> per
modality (CE + alpha*MMD + beta*KL against the frozen teacher); ensemble_<m> per modality (CE,
trains only the ensemble). `classify` picks the teacher for complete samples and the ensemble(s)
of the present modalities otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax import config
from dpmamba_jax import method
from dpmamba_jax.model.conv import uniform_init
from dpmamba_jax.peers.cnn import (CNNEncoder, ConvBNReLU, cross_entropy, global_avg_pool,
                                   load_conv_bn, load_encoder, torch_linear_kernel)

# Stage names per number of modalities M (HSI first). M = 3 follows augsburg3 (HSI, SAR, LiDAR).
MODALITY_NAMES: dict[int, tuple[str, ...]] = {2: ("hsi", "lidar"), 3: ("hsi", "sar", "lidar")}
# Module-name stems of their PyTorch teachers (HSI_Lidar_Couple_Cross[_TRI][_DAD]).
TORCH_TEACHER_STEMS: dict[int, tuple[str, ...]] = {2: ("hsi", "lidar"), 3: ("hsi", "lidar", "dsm")}
# (alpha, beta) of each student's JDA loss: their Houston 2013 scripts (huston2013_T_HL_{H,L}.sh)
# for M = 2, their Augsburg HSI+SAR+DSM scripts (augsburg_T_HSD_{H,S,D}.sh) for M = 3.
JDA_WEIGHTS: dict[int, tuple[tuple[float, float], ...]] = {
    2: ((2.0, 1.0), (2.0, 5.0)),
    3: ((2.0, 1.0), (1.0, 5.0), (1.0, 5.0)),
}

ModelT = TypeVar("ModelT", bound=nnx.Module)
Loss = Callable[..., tuple[jax.Array, dict[str, jax.Array], jax.Array]]


def modality_names(num_modalities: int) -> tuple[str, ...]:
  """Stage-name suffixes of the modalities, HSI first; ValueError unless M is 2 or 3."""
  if num_modalities not in MODALITY_NAMES:
    raise ValueError(f"MSH-Net is defined here for 2 or 3 modalities, got {num_modalities}")
  return MODALITY_NAMES[num_modalities]


def stages(num_modalities: int) -> tuple[str, ...]:
  """The training stages in order: teacher, single_<m>..., student_<m>..., ensemble_<m>...."""
  names = modality_names(num_modalities)
  return (("teacher",) + tuple(f"single_{n}" for n in names)
          + tuple(f"student_{n}" for n in names) + tuple(f"ensemble_{n}" for n in names))


def _jda_weights(num_modalities: int) -> tuple[tuple[float, float], ...]:
  modality_names(num_modalities)
  return JDA_WEIGHTS[num_modalities]


@dataclasses.dataclass(frozen=True)
class MSHNetConfig:
  """bands: per-modality channel counts, HSI first (2 or 3 modalities); widths: the two stem
  convolutions and the stride-2 block (students: encoder widths); head_widths: the teacher's two
  1x1 convolutions, the last also the students' 1x1 `feature_map` width; jda_weights: (alpha,
  beta) per modality; kd_temperature: the KL temperature (the KL is multiplied by its square)."""
  bands: tuple[int, ...]
  num_classes: int
  patch_size: int = 7
  widths: tuple[int, int, int] = (32, 64, 128)
  head_widths: tuple[int, int] = (128, 64)
  jda_weights: tuple[tuple[float, float], ...] = JDA_WEIGHTS[2]
  kd_temperature: float = 2.0
  mmd_kernels: int = 5
  mmd_kernel_mul: float = 2.0

  def __post_init__(self):
    modality_names(len(self.bands))
    if len(self.jda_weights) != len(self.bands):
      raise ValueError(f"jda_weights has {len(self.jda_weights)} (alpha, beta) pairs for "
                       f"{len(self.bands)} modalities")
    if self.num_classes < 2 or self.patch_size < 1 or min(self.bands) < 1:
      raise ValueError(f"invalid MSH-Net config: bands {self.bands}, {self.num_classes} classes, "
                       f"patch {self.patch_size}")

  @classmethod
  def create(cls, bands: Sequence[int], num_classes: int, patch_size: int) -> MSHNetConfig:
    """Their architecture and loss weights for len(bands) modalities."""
    bands = tuple(int(b) for b in bands)
    return cls(bands=bands, num_classes=int(num_classes), patch_size=int(patch_size),
               jda_weights=_jda_weights(len(bands)))

  @classmethod
  def tiny(cls, bands: Sequence[int] = (6, 1), num_classes: int = 3) -> MSHNetConfig:
    """A small configuration for fast tests."""
    bands = tuple(int(b) for b in bands)
    return cls(bands=bands, num_classes=num_classes, patch_size=5, widths=(4, 6, 8),
               head_widths=(8, 6), jda_weights=_jda_weights(len(bands)))

  @property
  def names(self) -> tuple[str, ...]:
    """Stage-name suffixes of the modalities."""
    return modality_names(len(self.bands))


def _conv_bn(cin: int, cout: int, kernel_size: int, *, stride: int = 1, padding: str = "zeros",
             rngs: nnx.Rngs) -> ConvBNReLU:
  layer = ConvBNReLU(cin, cout, kernel_size, stride=stride, padding=padding, rngs=rngs)
  _kaiming_fan_out(layer, rngs)
  return layer


def _kaiming_fan_out(layer: ConvBNReLU, rngs: nnx.Rngs) -> None:
  """Their init of every Conv2d: kaiming_normal_(mode="fan_out", nonlinearity="relu")."""
  k, _, _, cout = layer.conv.kernel.shape
  std = math.sqrt(2.0 / (cout * k * k))
  layer.conv.kernel[...] = std * jax.random.normal(rngs.params(), layer.conv.kernel.shape)


def _linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
  """PyTorch's default nn.Linear init."""
  bound = 1.0 / math.sqrt(cin)
  return nnx.Linear(cin, cout, kernel_init=uniform_init(bound), bias_init=uniform_init(bound),
                    rngs=rngs)


class TeacherOutputs(NamedTuple):
  """logits (B, C) of the fused input; path_logits: M x (B, C), the head on each modality's
  path (empty when not computed); fused_feature (B, D) pooled; feature_map (B, H, W, D)."""
  logits: jax.Array
  path_logits: tuple[jax.Array, ...]
  fused_feature: jax.Array
  feature_map: jax.Array


class UniOutputs(NamedTuple):
  """logits (B, C); pooled (B, D); feature_map (B, H, W, D) before pooling."""
  logits: jax.Array
  pooled: jax.Array
  feature_map: jax.Array


class _Stem(nnx.Module):
  """Two 3x3 conv-BN-ReLU layers, zero padding (their `<m>_block_1`)."""

  def __init__(self, cin: int, widths: tuple[int, int], *, rngs: nnx.Rngs):
    self.conv1 = _conv_bn(cin, widths[0], 3, rngs=rngs)
    self.conv2 = _conv_bn(widths[0], widths[1], 3, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, P, P, C_m) -> (B, P, P, widths[1])."""
    return self.conv2(self.conv1(x, train=train), train=train)


class Teacher(nnx.Module):
  """The cross-fusion teacher (their HSI_Lidar_Couple_Cross / _TRI with the DAD feature map)."""

  def __init__(self, cfg: MSHNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    w1, w2, w3 = cfg.widths
    h1, h2 = cfg.head_widths
    m = len(cfg.bands)
    self.stems = nnx.List([_Stem(b, (w1, w2), rngs=rngs) for b in cfg.bands])
    self.blocks = nnx.List([_conv_bn(w2, w3, 3, stride=2, rngs=rngs) for _ in cfg.bands])
    self.head1 = _conv_bn(m * w3, h1, 1, rngs=rngs)
    self.head2 = _conv_bn(h1, h2, 1, rngs=rngs)
    self.fc = _linear(h2, cfg.num_classes, rngs)

  def _head(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    fmap = self.head2(self.head1(x, train=train), train=train)  # (B, h, w, h2)
    pooled = global_avg_pool(fmap)  # (B, h2)
    return self.fc(pooled), pooled, fmap

  def outputs(self, xs: Sequence[jax.Array], *, train: bool = False,
              paths: bool = True) -> TeacherOutputs:
    """xs: M arrays (B, P, P, C_m), all present. BatchNorm call order (train): the stems in
    modality order; each block on its own modality; block j on modality i for i, then j (i != j)
    in order; the head on the fused input, then (paths=True) on each modality's path."""
    m = len(self.blocks)
    if len(xs) != m:
      raise ValueError(f"Teacher takes {m} modalities, got {len(xs)}")
    feats = [stem(x, train=train) for stem, x in zip(self.stems, xs)]  # M x (B, P, P, w2)
    maps: dict[tuple[int, int], jax.Array] = {}  # (i, j) -> block_j(feats_i), (B, P', P', w3)
    for j in range(m):
      maps[j, j] = self.blocks[j](feats[j], train=train)
    for i in range(m):
      for j in range(m):
        if i != j:
          maps[i, j] = self.blocks[j](feats[i], train=train)
    fused = []
    for j in range(m):
      total = maps[j, j]
      for i in range(m):
        if i != j:
          total = total + maps[i, j]
      fused.append(total / m)
    logits, pooled, fmap = self._head(jnp.concatenate(fused, axis=-1), train=train)
    path_logits = ()
    if paths:
      path_logits = tuple(
          self._head(jnp.concatenate([maps[i, j] for j in range(m)], axis=-1), train=train)[0]
          for i in range(m))
    return TeacherOutputs(logits, path_logits, pooled, fmap)

  def __call__(self, xs: Sequence[jax.Array], keep: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """Logits (B, C) of complete inputs (the teacher has no missing-modality path; `keep` is
    accepted for the common interface and ignored)."""
    return self.outputs(xs, train=train, paths=False).logits


class UniNet(nnx.Module):
  """A single-modality network on modality `modality` (their Single_Modality /
  Single_Modality_DAD: Couple_CNN with replicate padding, 1x1 conv-BN-ReLU, pool, linear)."""

  def __init__(self, cfg: MSHNetConfig, modality: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.modality = modality
    self.encoder = CNNEncoder(cfg.bands[modality], cfg.widths, padding="replicate", rngs=rngs)
    for block in (self.encoder.block1, self.encoder.block2, self.encoder.block3):
      _kaiming_fan_out(block, rngs)
    self.neck = _conv_bn(cfg.widths[2], cfg.head_widths[1], 1, rngs=rngs)
    self.fc = _linear(cfg.head_widths[1], cfg.num_classes, rngs)

  def outputs(self, x: jax.Array, *, train: bool = False) -> UniOutputs:
    """x: (B, P, P, C_modality)."""
    fmap = self.neck(self.encoder(x, train=train), train=train)  # (B, P', P', D)
    pooled = global_avg_pool(fmap)  # (B, D)
    return UniOutputs(self.fc(pooled), pooled, fmap)

  def __call__(self, xs: Sequence[jax.Array], keep: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """Logits (B, C) from xs[modality] alone (`keep` is ignored)."""
    return self.outputs(xs[self.modality], train=train).logits


class Ensemble(nnx.Module):
  """The trainable part of their Hallucination_ensemble for one modality: the student's and the
  single network's classifiers and the two fuse weights (as built: 1 and 0)."""

  def __init__(self, cfg: MSHNetConfig, modality: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.modality = modality
    self.fc_student = _linear(cfg.head_widths[1], cfg.num_classes, rngs)
    self.fc_single = _linear(cfg.head_widths[1], cfg.num_classes, rngs)
    self.fuse_weight_1 = nnx.Param(jnp.ones((1,), jnp.float32))
    self.fuse_weight_2 = nnx.Param(jnp.zeros((1,), jnp.float32))

  def __call__(self, student_pooled: jax.Array, single_pooled: jax.Array) -> jax.Array:
    """Pooled (B, D) features of the frozen student and single network -> logits (B, C)."""
    return (self.fc_student(student_pooled) * self.fuse_weight_1[...]
            + self.fc_single(single_pooled) * self.fuse_weight_2[...])


def _get(frozen: Mapping[str, nnx.Module], name: str, cls: type[ModelT]) -> ModelT:
  if name not in frozen:
    raise KeyError(f"MSH-Net stage needs the trained {name!r} model; have {sorted(frozen)}")
  model = frozen[name]
  if not isinstance(model, cls):
    raise TypeError(f"{name!r} is a {type(model).__name__}, expected {cls.__name__}")
  return model


def ensemble_logits(ensemble: Ensemble, student: UniNet, single: UniNet,
                    x: jax.Array) -> jax.Array:
  """One modality's ensemble on x (B, P, P, C_m), the two networks in eval mode -> (B, C)."""
  s = student.outputs(x, train=False).pooled
  n = single.outputs(x, train=False).pooled
  return ensemble(s, n)


# ------------------------------------------------------------------------------------- losses

def mmd(source: jax.Array, target: jax.Array, *, kernels: int = 5,
        kernel_mul: float = 2.0) -> jax.Array:
  """Their MMD_loss: (B, D), (B, D) -> scalar. Gaussian kernels on the 2B stacked rows with
  bandwidths base * mul**i, base = mean off-diagonal squared distance (no gradient) / mul**(k//2);
  the loss is mean(XX + YY - XY - YX) of the summed kernels."""
  b = source.shape[0]
  total = jnp.concatenate([source, target], axis=0)  # (2B, D)
  n = total.shape[0]
  dist = jnp.square(total[None, :, :] - total[:, None, :]).sum(-1)  # (2B, 2B)
  base = jax.lax.stop_gradient(dist.sum()) / (n * n - n) / kernel_mul ** (kernels // 2)
  k = sum(jnp.exp(-dist / (base * kernel_mul ** i)) for i in range(kernels))
  return jnp.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


def kd_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """KL(teacher || student) of the temperature-softened distributions, summed over classes,
  averaged over the batch (kl_div batchmean), times temperature**2. (B, C), (B, C) -> scalar."""
  log_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  kl = (jnp.exp(log_t) * (log_t - log_s)).sum(-1).mean()
  return kl * temperature * temperature


def teacher_loss(model: Teacher, frozen: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
                 keep: jax.Array, labels: jax.Array, rng: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """CE of the fused logits + sum over modalities of MSE(path logits, fused logits) (their
  train_base_multi: the teacher returns (x1, x2, x3) and the loss adds MSE(x2, x1) + MSE(x3, x1),
  both sides differentiated). Complete inputs; `keep`, `frozen` and `rng` are unused."""
  out = model.outputs(xs, train=True, paths=True)
  ce = cross_entropy(out.logits, labels)
  terms = {"ce": ce}
  total = ce
  for name, path in zip(model.cfg.names, out.path_logits):
    term = jnp.mean(jnp.square(path - out.logits))
    terms[f"path_mse_{name}"] = term
    total = total + term
  return total, terms, out.logits


def single_loss(model: UniNet, frozen: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
                keep: jax.Array, labels: jax.Array, rng: jax.Array
                ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """CE of a single-modality network on its own modality (their train_base)."""
  logits = model.outputs(xs[model.modality], train=True).logits
  ce = cross_entropy(logits, labels)
  return ce, {"ce": ce}, logits


def student_loss(model: UniNet, frozen: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
                 keep: jax.Array, labels: jax.Array, rng: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """Their train_knowledge_distill_jda: CE + alpha * MMD(student feature_map, teacher
  feature_map) + beta * KL(T = 2) * T**2, the frozen teacher in eval mode on all modalities."""
  cfg = model.cfg
  teacher = _get(frozen, "teacher", Teacher)
  t = teacher.outputs(xs, train=False, paths=False)
  s = model.outputs(xs[model.modality], train=True)
  b = s.logits.shape[0]
  ce = cross_entropy(s.logits, labels)
  d1 = mmd(s.feature_map.reshape(b, -1), jax.lax.stop_gradient(t.feature_map.reshape(b, -1)),
           kernels=cfg.mmd_kernels, kernel_mul=cfg.mmd_kernel_mul)
  d2 = kd_kl(s.logits, jax.lax.stop_gradient(t.logits), cfg.kd_temperature)
  alpha, beta = cfg.jda_weights[model.modality]
  jda = alpha * d1 + beta * d2
  return ce + jda, {"ce": ce, "mmd": d1, "kl": d2, "jda": jda}, s.logits


def ensemble_loss(model: Ensemble, frozen: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
                  keep: jax.Array, labels: jax.Array, rng: jax.Array
                  ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """CE of the ensemble on its modality (their train_hall_infer: the student and single network
  with BatchNorm in eval mode, only the two classifiers and fuse weights trained)."""
  name = model.cfg.names[model.modality]
  student = _get(frozen, f"student_{name}", UniNet)
  single = _get(frozen, f"single_{name}", UniNet)
  logits = ensemble_logits(model, student, single, xs[model.modality])
  ce = cross_entropy(logits, labels)
  return ce, {"ce": ce}, logits


def stage_loss(stage: str) -> Loss:
  """The loss function of a stage name (teacher, single_<m>, student_<m>, ensemble_<m>)."""
  kind = stage.split("_", 1)[0]
  losses = {"teacher": teacher_loss, "single": single_loss, "student": student_loss,
            "ensemble": ensemble_loss}
  if kind not in losses or (kind == "teacher") != (stage == "teacher"):
    raise ValueError(f"unknown MSH-Net stage {stage!r}")
  return losses[kind]


# ------------------------------------------------------------------------------------ builders

def _modality_index(name: str, num_modalities: int) -> int:
  names = modality_names(num_modalities)
  if name not in names:
    raise ValueError(f"no modality {name!r} among {names} ({num_modalities} modalities)")
  return names.index(name)


def build_teacher(bands: Sequence[int], num_classes: int, patch_size: int,
                  frozen: Mapping[str, nnx.Module], rngs: nnx.Rngs) -> Teacher:
  """The teacher, from scratch."""
  return Teacher(MSHNetConfig.create(bands, num_classes, patch_size), rngs=rngs)


def build_stage(stage: str, bands: Sequence[int], num_classes: int, patch_size: int,
                frozen: Mapping[str, nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """The model a stage trains. Single networks and students start from scratch (their
  init_mode "random"); an ensemble copies the classifiers of the frozen student_<m> and
  single_<m> and starts with fuse weights 1 and 0."""
  if stage == "teacher":
    return build_teacher(bands, num_classes, patch_size, frozen, rngs)
  kind, _, name = stage.partition("_")
  if kind not in ("single", "student", "ensemble"):
    raise ValueError(f"unknown MSH-Net stage {stage!r}")
  cfg = MSHNetConfig.create(bands, num_classes, patch_size)
  m = _modality_index(name, len(cfg.bands))
  if kind != "ensemble":
    return UniNet(cfg, m, rngs=rngs)
  ens = Ensemble(cfg, m, rngs=rngs)
  for fc, source in ((ens.fc_student, f"student_{name}"), (ens.fc_single, f"single_{name}")):
    net = _get(frozen, source, UniNet)
    fc.kernel[...] = net.fc.kernel[...]
    fc.bias[...] = net.fc.bias[...]
  return ens


def _builder(stage: str) -> method.PeerBuilder:
  def build(shapes: method.Shapes, frozen: Mapping[str, nnx.Module],
            rngs: nnx.Rngs) -> nnx.Module:
    return build_stage(stage, shapes.bands, shapes.num_classes, shapes.patch_size, frozen, rngs)

  build.__name__ = f"build_{stage}"
  build.__doc__ = f"The {stage!r} model (see build_stage)."
  return build


build_single_hsi = _builder("single_hsi")
build_single_sar = _builder("single_sar")
build_single_lidar = _builder("single_lidar")
build_student_hsi = _builder("student_hsi")
build_student_sar = _builder("student_sar")
build_student_lidar = _builder("student_lidar")
build_ensemble_hsi = _builder("ensemble_hsi")
build_ensemble_sar = _builder("ensemble_sar")
build_ensemble_lidar = _builder("ensemble_lidar")

single_hsi_loss = single_sar_loss = single_lidar_loss = single_loss
student_hsi_loss = student_sar_loss = student_lidar_loss = student_loss
ensemble_hsi_loss = ensemble_sar_loss = ensemble_lidar_loss = ensemble_loss


# -------------------------------------------------------------------------------- classify

def classify(models: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
             keep: jax.Array) -> jax.Array:
  """Eval-mode logits (B, C), per sample by its keep row (B, M): all modalities present -> the
  teacher; otherwise the mean of the ensembles of the present modalities (for M = 2 exactly the
  one ensemble, their per-scenario model). Rows with nothing present get the teacher's logits."""
  m = len(xs)
  names = modality_names(m)
  full = _get(models, "teacher", Teacher)(xs)  # (B, C)
  present = jnp.asarray(keep) != 0  # (B, M)
  count = present.sum(axis=1)  # (B,)
  partial = jnp.zeros_like(full)
  for i, name in enumerate(names):
    ens = ensemble_logits(_get(models, f"ensemble_{name}", Ensemble),
                          _get(models, f"student_{name}", UniNet),
                          _get(models, f"single_{name}", UniNet), xs[i])
    partial = partial + jnp.where(present[:, i, None], ens, 0.0)
  partial = partial / jnp.maximum(count, 1)[:, None].astype(partial.dtype)
  use_teacher = (count == m) | (count == 0)
  return jnp.where(use_teacher[:, None], full, partial)


# -------------------------------------------------------------------------------- importer

def _load_linear(fc: nnx.Linear, params: Mapping[str, np.ndarray], name: str) -> None:
  fc.kernel[...] = jnp.asarray(torch_linear_kernel(params[f"{name}.weight"]))
  fc.bias[...] = jnp.asarray(params[f"{name}.bias"], jnp.float32)


def load_torch(model: nnx.Module, params: Mapping[str, np.ndarray],
               buffers: Mapping[str, np.ndarray], prefix: str = "") -> None:
  """Copies a PyTorch state dict into `model` in place. Teacher: HSI_Lidar_Couple_Cross[_DAD]
  (`<m>_block_1.{0,1,3,4}`, `<m>_block_2.{0,1}`, `share_bone.block_{5,6}.{0,1}`,
  `share_bone.fc`; m in hsi, lidar[, dsm]); UniNet: Single_Modality[_DAD] (`feature.block{1,2,3}`,
  `block_5_1.{0,1}`, `fc`); Ensemble: Hallucination_ensemble (`modality_{1,2}_model.fc`,
  `fuse_weight_{1,2}`). Layers their forward never uses (block_6, block_7) are not read."""
  p = prefix
  if isinstance(model, Teacher):
    stems = TORCH_TEACHER_STEMS[len(model.cfg.bands)]
    for stem, blk, s in zip(model.stems, model.blocks, stems):
      load_conv_bn(stem.conv1, params, buffers, f"{p}{s}_block_1.0", f"{p}{s}_block_1.1")
      load_conv_bn(stem.conv2, params, buffers, f"{p}{s}_block_1.3", f"{p}{s}_block_1.4")
      load_conv_bn(blk, params, buffers, f"{p}{s}_block_2.0", f"{p}{s}_block_2.1")
    for layer, i in ((model.head1, 5), (model.head2, 6)):
      load_conv_bn(layer, params, buffers, f"{p}share_bone.block_{i}.0",
                   f"{p}share_bone.block_{i}.1")
    _load_linear(model.fc, params, f"{p}share_bone.fc")
  elif isinstance(model, UniNet):
    load_encoder(model.encoder, params, buffers, f"{p}feature")
    load_conv_bn(model.neck, params, buffers, f"{p}block_5_1.0", f"{p}block_5_1.1")
    _load_linear(model.fc, params, f"{p}fc")
  elif isinstance(model, Ensemble):
    _load_linear(model.fc_student, params, f"{p}modality_1_model.fc")
    _load_linear(model.fc_single, params, f"{p}modality_2_model.fc")
    model.fuse_weight_1[...] = jnp.asarray(params[f"{p}fuse_weight_1"], jnp.float32).reshape(1)
    model.fuse_weight_2[...] = jnp.asarray(params[f"{p}fuse_weight_2"], jnp.float32).reshape(1)
  else:
    raise TypeError(f"not an MSH-Net model: {type(model).__name__}")


# Their Houston 2013 scripts (docs/peers.md; none for Trento): 7x7 patches of raw bands, batch
# 32, SGD (Nesterov, momentum 0.9, lr 1e-3), a 5-epoch linear warmup, then cosine annealing over
# epochs + 20; 500 epochs with weight decay 5e-3 for the teacher and the students, 500 with 1e-3
# for the single networks, 100 with 1e-3 for the ensembles (epochs_distill).
DEFAULTS = {"*": {
    "patch_size": 7, "pca": "raw", "batch_size": 32, "epochs_pretrain": 500,
    "epochs_distill": 100, "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": True,
    "weight_decay": 5e-3, "lr_schedule": "cosine", "warmup_epochs": 5, "lr_cosine_extra": 20,
    "lr_min": 0.0, "grad_clip": 0.0}}
SINGLE_AND_ENSEMBLE_WEIGHT_DECAY = 1e-3


def _stages(cfg: config.RunConfig, shapes: method.Shapes) -> tuple[method.Stage, ...]:
  out = []
  for i, name in enumerate(stages(shapes.num_modalities)):
    kind, _, m = name.partition("_")
    reads = {"teacher": (), "single": (), "student": ("teacher",),
             "ensemble": (f"student_{m}", f"single_{m}")}[kind]
    out.append(method.peer_stage(
        cfg, name=name, reads=reads, build=_builder(name), loss=stage_loss(name),
        epochs=cfg.epochs_distill if kind == "ensemble" else cfg.epochs_pretrain, index=i,
        weight_decay=(SINGLE_AND_ENSEMBLE_WEIGHT_DECAY if kind in ("single", "ensemble")
                      else None)))
  return tuple(out)


def _check(shapes: method.Shapes) -> str | None:
  if shapes.num_modalities not in MODALITY_NAMES:
    return (f"is defined here for 2 or 3 modalities (docs/peers.md), the dataset has "
            f"{shapes.num_modalities} ({', '.join(shapes.modalities)})")
  return None


METHOD = method.Method(
    name="mshnet", title="MSH-Net", stages=_stages, defaults=DEFAULTS, check=_check,
    # the last stage of every M is ensemble_lidar: needing it needs every earlier stage
    scored=(method.Scored(
        "mshnet", "MSH-Net", ("teacher", "ensemble_lidar"),
        lambda models: method.Classifier(models, classify,
                                         len(models["teacher"].cfg.bands))),))
