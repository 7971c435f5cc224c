"""DGDNet: diversity-guided distillation with modality-centre regularisation (Wei et al., TGRS).

What the authors' public code computes (shicaiwei123/TGRS-DGDNet @ 5c35368,
`models/resnet_ensemble.py:HSI_Lidar_Couple_Share`, `models/base_model.py`):

* One CNN encoder per modality (`cnn.CNNEncoder`: 3x3 conv-BN-ReLU to 32, 64, 128 channels, the
  last with stride 2), the encoder outputs concatenated (HSI first) and fed to one shared head:
  3x3 conv-BN-ReLU to 128, 3x3 conv-BN-ReLU to 64, global average pooling (the fused feature),
  a linear classifier. The same head applied to one modality's features with the others set to
  zero gives that modality's unimodal logits.
* A missing modality is handled at feature level: its encoder output is multiplied by 0 before
  the concatenation; the input itself is still fed.
* Two stages. "teacher": complete inputs, CE(fused) + 3.0 * (MSE(unimodal logits of HSI,
  of LiDAR) + CE(HSI head) + CE(LiDAR head)). "student": built from scratch, per-sample modality
  dropout (`draw_keep`), CE(fused) + 30 * DAD(student fused feature, frozen teacher's eval-mode
  fused feature on complete inputs) + 1.0 * (CE(HSI head) + CE(LiDAR head)), the unimodal heads
  taking the encoder outputs before the dropout mask.
* BatchNorm call order in one forward: the encoders in modality order, the head on the fused
  input, then the head on each unimodal input in modality order.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax import config
from dpmamba_jax import masks
from dpmamba_jax import method
from dpmamba_jax.model.conv import uniform_init
from dpmamba_jax.peers import cnn

TEACHER = "teacher"
STUDENT = "student"
STAGES = (TEACHER, STUDENT)


@dataclasses.dataclass(frozen=True)
class DGDNetConfig:
  """DGDNet hyper-parameters; defaults are the authors' (Houston 2013 HSI + LiDAR scripts).

  bands: channels per modality (raw bands), HSI first.
  widths: the encoder's three conv widths (the last one is each modality's feature width).
  head_widths: the shared head's two conv widths (the last one is the fused feature size).
  lambda_kd: weight of DAD in the student loss (their `lambda_kd_feature`, 30).
  lambda_c: weight of the unimodal CE terms in the student loss (`lambda_center_loss`, 1.0).
  lambda_unimodal: weight of the unimodal terms in the teacher loss (`labma_unimodal`, 3.0).
  """
  bands: tuple[int, ...]
  num_classes: int
  patch_size: int
  widths: tuple[int, int, int] = (32, 64, 128)
  head_widths: tuple[int, int] = (128, 64)
  lambda_kd: float = 30.0
  lambda_c: float = 1.0
  lambda_unimodal: float = 3.0

  def __post_init__(self):
    object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))
    object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
    object.__setattr__(self, "head_widths", tuple(int(w) for w in self.head_widths))

  @property
  def num_modalities(self) -> int:
    return len(self.bands)

  @classmethod
  def tiny(cls, bands: tuple[int, ...] = (6, 1), num_classes: int = 3,
           patch_size: int = 5) -> DGDNetConfig:
    """A narrow model for fast tests."""
    return cls(bands, num_classes, patch_size, widths=(4, 8, 16), head_widths=(8, 4))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for k in ("bands", "widths", "head_widths"):
      d[k] = list(d[k])
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, object]) -> DGDNetConfig:
    return cls(**d)


class DGDNetOutputs(NamedTuple):
  """Named intermediates of one forward.

  logits: (B, C) head on the masked, concatenated encoder outputs.
  fused_feature: (B, D) the pooled head feature behind `logits`.
  unimodal_logits: M arrays (B, C), the head on modality m's unmasked encoder output alone.
  features: M arrays (B, P', P', W) encoder outputs before the keep mask.
  """
  logits: jax.Array
  fused_feature: jax.Array
  unimodal_logits: tuple[jax.Array, ...]
  features: tuple[jax.Array, ...]


def _kaiming_normal_fan_out(conv: cnn.Conv2d, rngs: nnx.Rngs) -> None:
  """Their conv init (kaiming_normal_, mode fan_out, ReLU gain): N(0, 2 / (out * kh * kw))."""
  kh, kw, _, cout = conv.kernel.shape
  std = math.sqrt(2.0 / (cout * kh * kw))
  conv.kernel[...] = std * jax.random.normal(rngs.params(), conv.kernel.shape, jnp.float32)


def _torch_linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
  """nn.Linear with PyTorch's default init U(+-1/sqrt(cin)) for weight and bias."""
  bound = 1.0 / math.sqrt(cin)
  return nnx.Linear(cin, cout, kernel_init=uniform_init(bound), bias_init=uniform_init(bound),
                    precision=jax.lax.Precision.HIGHEST, rngs=rngs)


class SharedHead(nnx.Module):
  """Their `MDMB_fusion_share` (location "after"), without its unused 1x1 conv `block_6`."""

  def __init__(self, cin: int, widths: tuple[int, int], num_classes: int, *, rngs: nnx.Rngs):
    self.block_5_1 = cnn.ConvBNReLU(cin, widths[0], rngs=rngs)
    self.block_5_2 = cnn.ConvBNReLU(widths[0], widths[1], rngs=rngs)
    for block in (self.block_5_1, self.block_5_2):
      _kaiming_normal_fan_out(block.conv, rngs)
    self.fc = _torch_linear(widths[1], num_classes, rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """x: (B, H, W, cin) -> (logits (B, C), pooled feature (B, widths[1]))."""
    x = self.block_5_1(x, train=train)
    x = self.block_5_2(x, train=train)
    feature = cnn.global_avg_pool(x)  # (B, D)
    return self.fc(feature), feature


class DGDNet(nnx.Module):
  """Per-modality CNN encoders + one shared fusion head (teacher and student alike)."""

  def __init__(self, cfg: DGDNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoders = nnx.List([cnn.CNNEncoder(b, cfg.widths, rngs=rngs) for b in cfg.bands])
    for enc in self.encoders:
      for block in (enc.block1, enc.block2, enc.block3):
        _kaiming_normal_fan_out(block.conv, rngs)
    self.head = SharedHead(cfg.widths[2] * cfg.num_modalities, cfg.head_widths,
                           cfg.num_classes, rngs=rngs)

  def _check(self, xs: Sequence[jax.Array], keep: jax.Array) -> None:
    cfg = self.cfg
    if len(xs) != cfg.num_modalities:
      raise ValueError(f"DGDNet: got {len(xs)} modalities, expected {cfg.num_modalities}")
    b = xs[0].shape[0]
    for m, x in enumerate(xs):
      want = (b, cfg.patch_size, cfg.patch_size, cfg.bands[m])
      if tuple(x.shape) != want:
        raise ValueError(f"DGDNet modality {m}: shape {tuple(x.shape)}, expected {want}")
    if tuple(keep.shape) != (b, cfg.num_modalities):
      raise ValueError(f"DGDNet keep: shape {tuple(keep.shape)}, expected "
                       f"{(b, cfg.num_modalities)}")

  def _encode(self, xs: Sequence[jax.Array], train: bool) -> tuple[jax.Array, ...]:
    return tuple(enc(x, train=train) for enc, x in zip(self.encoders, xs))  # M x (B, h, w, W)

  def _fuse(self, feats: Sequence[jax.Array], keep: jax.Array,
            train: bool) -> tuple[jax.Array, jax.Array]:
    keep = keep.astype(feats[0].dtype)
    masked = [f * keep[:, m, None, None, None] for m, f in enumerate(feats)]
    return self.head(jnp.concatenate(masked, axis=-1), train=train)

  def forward_fused(self, xs: Sequence[jax.Array], keep: jax.Array, *,
                    train: bool = False) -> tuple[jax.Array, jax.Array]:
    """xs: M arrays (B, P, P, C_m); keep (B, M) -> (logits (B, C), fused feature (B, D))."""
    self._check(xs, keep)
    return self._fuse(self._encode(xs, train), keep, train)

  def __call__(self, xs: Sequence[jax.Array], keep: jax.Array, *,
               train: bool = False) -> jax.Array:
    """xs: M arrays (B, P, P, C_m); keep (B, M), 1 = present -> logits (B, C)."""
    return self.forward_fused(xs, keep, train=train)[0]

  def outputs(self, xs: Sequence[jax.Array], keep: jax.Array, *,
              train: bool = False) -> DGDNetOutputs:
    """The fused forward plus the unimodal heads (BatchNorm in their call order)."""
    self._check(xs, keep)
    feats = self._encode(xs, train)
    logits, fused = self._fuse(feats, keep, train)
    unimodal = []
    for m in range(len(feats)):
      parts = [f if i == m else jnp.zeros_like(f) for i, f in enumerate(feats)]
      unimodal.append(self.head(jnp.concatenate(parts, axis=-1), train=train)[0])
    return DGDNetOutputs(logits, fused, tuple(unimodal), feats)


# ----------------------------------------------------------------------------------- losses

def _safe_norm(x: jax.Array) -> jax.Array:
  """Row L2 norms (B,) with a finite gradient at an all-zero row (where the norm is 0)."""
  sq = jnp.sum(x * x, axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _centred_cosine(f: jax.Array) -> jax.Array:
  """(B, D) -> (B, B) cosine similarities of the rows after each row loses its own mean."""
  f = f - f.mean(axis=-1, keepdims=True)
  n = _safe_norm(f)
  gram = jnp.matmul(f, f.T, precision=jax.lax.Precision.HIGHEST)
  return gram / (n[:, None] * n[None, :] + 1e-16)


def dad_matrix(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """DAD's elementwise squared differences of the two centred-cosine matrices.

  student, teacher: (B, D) pooled fused features -> (B, B).
  """
  return jnp.square(_centred_cosine(student) - _centred_cosine(teacher))


def dad_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """DAD = sum of `dad_matrix` / B (their mean over rows of the row sums)."""
  return dad_matrix(student, teacher).sum(axis=-1).mean()


def _unimodal_names(m_count: int) -> tuple[str, ...]:
  return ("hsi", "lidar") if m_count == 2 else tuple(f"m{i}" for i in range(m_count))


def teacher_objective(outs: DGDNetOutputs, labels: jax.Array,
                      cfg: DGDNetConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Their teacher loss: CE + lambda_unimodal * (sum of MSE between consecutive modalities'
  unimodal logits + sum of unimodal CEs)."""
  names = _unimodal_names(len(outs.unimodal_logits))
  terms = {"ce": cnn.cross_entropy(outs.logits, labels)}
  uni = outs.unimodal_logits
  terms["unimodal_mse"] = sum((jnp.mean(jnp.square(a - b)) for a, b in itertools.pairwise(uni)),
                              jnp.zeros((), jnp.float32))
  for name, lg in zip(names, uni):
    terms[f"unimodal_ce_{name}"] = cnn.cross_entropy(lg, labels)
  unimodal = sum(v for k, v in terms.items() if k != "ce")
  return terms["ce"] + cfg.lambda_unimodal * unimodal, terms


def student_objective(outs: DGDNetOutputs, teacher_feature: jax.Array, labels: jax.Array,
                      cfg: DGDNetConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Their student loss: CE + lambda_kd * DAD + lambda_c * (sum of unimodal CEs).

  teacher_feature: (B, D) the frozen teacher's eval-mode fused feature on complete inputs.
  """
  names = _unimodal_names(len(outs.unimodal_logits))
  terms = {"ce": cnn.cross_entropy(outs.logits, labels),
           "dad": dad_loss(outs.fused_feature, jax.lax.stop_gradient(teacher_feature))}
  for name, lg in zip(names, outs.unimodal_logits):
    terms[f"unimodal_ce_{name}"] = cnn.cross_entropy(lg, labels)
  unimodal = sum(terms[f"unimodal_ce_{n}"] for n in names)
  return terms["ce"] + cfg.lambda_kd * terms["dad"] + cfg.lambda_c * unimodal, terms


def teacher_loss(model: DGDNet, frozen: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
                 keep: jax.Array, labels: jax.Array,
                 rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """Teacher stage (complete inputs, `keep` all ones): (loss, terms, fused logits (B, C))."""
  del frozen, rng
  outs = model.outputs(xs, keep, train=True)
  total, terms = teacher_objective(outs, labels, model.cfg)
  return total, terms, outs.logits


def student_loss(model: DGDNet, frozen: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
                 keep: jax.Array, labels: jax.Array,
                 rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """Student stage (`keep` from `draw_keep`): (loss, terms, fused logits (B, C)).

  The teacher `frozen[TEACHER]` sees the complete inputs in eval mode.
  """
  del rng
  outs = model.outputs(xs, keep, train=True)
  full = jnp.ones_like(keep)
  _, t_feat = frozen[TEACHER].forward_fused(xs, full, train=False)
  total, terms = student_objective(outs, t_feat, labels, model.cfg)
  return total, terms, outs.logits


def draw_keep(rng: jax.Array, batch: int, num_modalities: int) -> jax.Array:
  """Their training-time `modality_drop` (p = [0, 0]): masks.random_subsets. -> (B, M)."""
  return masks.random_subsets(rng, batch, num_modalities)


# ------------------------------------------------------------------------- building, eval

def _build(shapes: method.Shapes, rngs: nnx.Rngs) -> DGDNet:
  return DGDNet(DGDNetConfig(shapes.bands, shapes.num_classes, shapes.patch_size), rngs=rngs)


def build_teacher(shapes: method.Shapes, frozen: Mapping[str, nnx.Module],
                  rngs: nnx.Rngs) -> DGDNet:
  """A freshly initialised teacher (their init: kaiming-normal fan-out convs)."""
  del frozen
  return _build(shapes, rngs)


def build_student(shapes: method.Shapes, frozen: Mapping[str, nnx.Module],
                  rngs: nnx.Rngs) -> DGDNet:
  """A freshly initialised student: their script builds it anew and loads only the teacher's
  weights (into the teacher), so the student does not start from the teacher."""
  del frozen
  return _build(shapes, rngs)


def classify(models: Mapping[str, nnx.Module], xs: Sequence[jax.Array],
             keep: jax.Array) -> jax.Array:
  """Eval-mode student logits (B, C); each sample's missing modalities are zeroed at feature
  level by its own keep row (eval BatchNorm is per sample, so one pass serves every row)."""
  return models[STUDENT](xs, keep, train=False)


# ------------------------------------------------------------------------------- importer

def torch_encoder_names(m_count: int) -> tuple[str, ...]:
  """State-dict prefixes of the encoders: `special_bone_{hsi,lidar}` (two modalities) or
  `modality_{1..M}` (their three-modality variant)."""
  if m_count == 2:
    return ("special_bone_hsi", "special_bone_lidar")
  return tuple(f"modality_{i + 1}" for i in range(m_count))


def load_torch(model: DGDNet, params: Mapping[str, np.ndarray],
               buffers: Mapping[str, np.ndarray], prefix: str = "") -> None:
  """Copies a PyTorch `HSI_Lidar_Couple_Share` state dict into `model` (in place).

  `share_bone.block_6` (never used by the forward) is ignored.
  """
  for enc, name in zip(model.encoders, torch_encoder_names(len(model.encoders))):
    cnn.load_encoder(enc, params, buffers, prefix + name)
  head = model.head
  for block, name in ((head.block_5_1, "block_5_1"), (head.block_5_2, "block_5_2")):
    base = f"{prefix}share_bone.{name}"
    cnn.load_conv_bn(block, params, buffers, f"{base}.0", f"{base}.1")
  fc = f"{prefix}share_bone.fc"
  head.fc.kernel[...] = jnp.asarray(cnn.torch_linear_kernel(params[f"{fc}.weight"]))
  head.fc.bias[...] = jnp.asarray(params[f"{fc}.bias"], jnp.float32)


# Their Houston 2013 HSI + LiDAR scripts (docs/peers.md; the repository has no Trento setting):
# 7x7 patches of raw bands, batch 32, 500 epochs, SGD (Nesterov, momentum 0.9, lr 1e-3, weight
# decay 1e-3), a 5-epoch linear warmup, then cosine annealing over epochs + 20 to 1e-8.
DEFAULTS = {"*": {
    "patch_size": 7, "pca": "raw", "batch_size": 32, "epochs_pretrain": 500,
    "epochs_distill": 500, "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": True,
    "weight_decay": 1e-3, "lr_schedule": "cosine", "warmup_epochs": 5, "lr_cosine_extra": 20,
    "lr_min": 1e-8, "grad_clip": 0.0}}


def _stages(cfg: config.RunConfig, shapes: method.Shapes) -> tuple[method.Stage, ...]:
  return (method.peer_stage(cfg, name=TEACHER, build=build_teacher, loss=teacher_loss,
                            epochs=cfg.epochs_pretrain, index=0),
          method.peer_stage(cfg, name=STUDENT, reads=(TEACHER,), build=build_student,
                            loss=student_loss, keep_rule=draw_keep, epochs=cfg.epochs_distill,
                            index=1))


METHOD = method.Method(
    name="dgdnet", title="DGDNet", stages=_stages, defaults=DEFAULTS,
    scored=(method.Scored("dgdnet", "DGDNet", (STUDENT,),
                          lambda models: method.Classifier(
                              {STUDENT: models[STUDENT]}, classify,
                              models[STUDENT].cfg.num_modalities)),))
