"""DPMamba (spec §2, §3): ModelConfig and the full network, patches -> visual features V.

Channels-last throughout: modality m is (B, P, P, C_m); features are (B, P, P, hidden), and
(P, P, B, hidden) inside the Mamba blocks. A modality mask is (B, M), 1 = present, 0 = missing.

jit pattern (NNX): split once, then a plain ``jax.jit`` of a pure function that merges inside::

  forward = make_forward(model)          # graphdef fixed
  v = forward(nnx.state(model), xs, mask)

Intermediates (tests / inspection): ``v, inter = capture_intermediates(model, xs, mask)``; a plain
call sows nothing (nnx.Intermediate only under capture_intermediates).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax.data import datasets
from dpmamba_jax.errors import UserError
from dpmamba_jax.model import ablations
from dpmamba_jax.model import scan
from dpmamba_jax.model.blocks import MAMambaBlock, PatchEmbed, layer_norm, linear, maybe_sow


# Which samples enter the embedding BatchNorm's batch statistics (`DPMamba.__call__`).
BN_STATS = ("present", "all")

# ModelConfig fields that choose how the same function is computed, not what it is: left out of
# a checkpoint's config (checkpoint.save_model), so a model trained with one runs with another.
RUNTIME_FIELDS = ("scan_impl",)


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
  scan_impl: how the selective scan is computed, one of scan.SELECTIVE_SCAN_IMPLS: "auto"
    (default: "recurrent" on CPU, "associative" elsewhere), "recurrent" or "associative". Both
    compute the same function, so this is a run-time choice (RUNTIME_FIELDS): checkpoints do not
    store it and load with any.
  backbone: "mamba" (the method: modality-aware Mamba blocks) | "vit" (ablation Variant-2a:
    one transformer layer per block, `ablations.ViTBlock`).
  fusion: "af" (the method: attention fusion) | "add" (Variant-2b: plain sum, `ablations.AddFusion`).
  mixer: "mism" (the method: zigzag selective scan) | "dwconv" (Variant-2c: depthwise 3x3 conv,
    `ablations.DWConvMixer`).
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


class DPMamba(nnx.Module):
  """The DPMamba visual network: M patches -> V (B, out_dim) (spec §2.11).

  Teacher (cfg.prompts False): masked modalities get zero features. Student (True): they get the
  learned prompt of that modality, one (P, P, hidden) N(0,1) tensor per modality.

  Intermediates: see `capture_intermediates`.
  """
  sow_intermediates = False  # set only by capture_intermediates

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h, m_count, p = cfg.hidden, cfg.num_modalities, cfg.patch_size
    self.embed = nnx.List([PatchEmbed(b, h, rngs=rngs) for b in cfg.bands])
    block = MAMambaBlock
    if cfg.backbone == "vit":  # ablation Variant-2a
      block = ablations.ViTBlock
    self.blocks = nnx.List([block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.head_norm = layer_norm(h * m_count, rngs)
    self.head = linear(h * m_count, cfg.out_dim, rngs)
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
               embed_conv: Sequence[jax.Array | None] | None = None,
               bn_stats: str = "present") -> jax.Array:
    """Visual features V.

    Args:
      xs: M arrays (B, P, P, C_m).
      mask: (B, M) bool/float, 1 = present, or None (all present).
      train: batch-statistics BatchNorm (updates running stats) and AF dropout.
      dropout_key: PRNG key for AF dropout; required when train and cfg.af_dropout > 0.
      embed_conv: optional M entries, None or modality m's embedding-conv output (B, P, P, h)
        computed already (scene inference, `Conv3x3.patch_conv_from_scene`); xs[m] is then
        not used and may be None.
      bn_stats: which samples' real input enters the embedding BatchNorm's batch statistics in
        training: "present" (a sample whose modality m is masked is left out of modality m's
        statistics, since its features are replaced) or "all" (every sample, as the authors'
        code does, spec §7.1 item 12; `--protocol reference`).

    Returns:
      (B, out_dim) float32, not normalised.
    """
    cfg = self.cfg
    embed_conv = [None] * len(xs) if embed_conv is None else list(embed_conv)
    self._check_inputs(xs, mask, embed_conv)
    if bn_stats not in BN_STATS:
      raise ValueError(f"bn_stats={bn_stats!r}: expected one of {BN_STATS}")
    if train and cfg.af_dropout > 0 and cfg.depth > 0 and dropout_key is None:
      raise ValueError("DPMamba(train=True) needs dropout_key when af_dropout > 0")
    present = None if mask is None else jnp.asarray(mask) != 0  # (B, M)
    fs = []
    for m in range(cfg.num_modalities):
      bn_mask = None if present is None or bn_stats == "all" else present[:, m]
      f = self.embed[m](xs[m], bn_mask, train=train, conv_out=embed_conv[m])
      maybe_sow(self, f"embed/m{m}", f)
      if present is not None:
        fill = self.prompts[m][...] if cfg.prompts else jnp.zeros_like(f[0])
        f = jnp.where(present[:, m, None, None, None], f, fill[None])
      maybe_sow(self, f"injected/m{m}", f)
      fs.append(f)
    block_keys = (None if not train or dropout_key is None or cfg.af_dropout == 0
                  else jax.random.split(dropout_key, max(cfg.depth, 1)))
    # The Mamba blocks work token-major, (P, P, B, h): one transpose here instead of two around
    # every selective scan. Intermediates are always (B, P, P, h).
    token_major = bool(self.blocks) and getattr(self.blocks[0], "layout", "NHWC") == "HWNC"
    if token_major:
      fs = [jnp.transpose(f, (1, 2, 0, 3)) for f in fs]  # (P, P, B, h)
    for i, blk in enumerate(self.blocks):
      fs = blk(fs, key=None if block_keys is None else block_keys[i])
      for m, f in enumerate(fs):
        maybe_sow(self, f"block{i}/m{m}", f, "HWNC" if token_major else "NHWC")
    normed = self.head_norm(jnp.concatenate(fs, axis=-1))
    if token_major:  # (P, P, B, h*M): the mean over the P*P tokens as one float32 GEMV, which
      # XLA:CPU runs several times faster than a reduction over the two major axes
      p2 = normed.shape[0] * normed.shape[1]
      pooled = jnp.dot(jnp.full((p2,), 1.0 / p2, normed.dtype), normed.reshape(p2, -1),
                       precision=jax.lax.Precision.HIGHEST).reshape(normed.shape[2:])
    else:
      pooled = normed.mean(axis=(1, 2))  # (B, h*M)
    maybe_sow(self, "head_pooled", pooled)
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


def capture_intermediates(model: nnx.Module, *args, **kwargs) -> tuple[Any, dict[str, jax.Array]]:
  """``model(*args, **kwargs)`` and the intermediates it sows: (output, {name: array}).

  Sowing is on for this call only: the `sow_intermediates` flags of the model's modules are set
  here and removed after, and nnx.capture collects the nnx.Intermediate values, so the model's
  state and graphdef are left as they were (a plain call, a jitted step, nnx.state and the
  checkpoints never hold an Intermediate). Eager, or inside jax.jit on a model merged there.

  A DPMamba's names; every array is (B, P, P, .) whatever the blocks' layout:
    "embed_bn_relu/m{m}"   modality m's PatchEmbed after BatchNorm + ReLU (B, P, P, h)
    "embed/m{m}"           modality m's embedding (B, P, P, h)
    "injected/m{m}"        the same with the prompt (student) or zeros (teacher) where masked
    "block{i}_detail/{k}"  block i's own: MAMambaBlock "cross_af", "cross_conv", "cross_ssm",
                           "cross_out" (M >= 2), "af/m{m}", "conv/m{m}", "ssm/m{m}";
                           ViTBlock "tokens" (B, M*L, h)
    "block{i}/m{m}"        block i's output for modality m
    "head_pooled"          (B, h*M), the pooled features before the head
  Other modules' names are the sub-module path and the sown name joined by "/".
  """
  modules = [m for _, m in nnx.iter_modules(model)]
  flagged = [m for m in modules if hasattr(m, "sow_intermediates")]
  for m in flagged:
    m.sow_intermediates = True
  try:
    out, sown = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
  finally:
    for m in flagged:
      del m.sow_intermediates  # back to the class's False
    for m in modules:  # what nnx.capture leaves behind when the call raises
      if "__captures__" in vars(m):
        delattr(m, "__captures__")
  named = {}
  for path, var in nnx.to_flat_state(sown):
    *where, key = path
    (value,) = var.get_value()  # one forward sows each name once
    if not where:
      name = key
    elif len(where) == 2 and where[0] == "embed":
      name = f"{key}/m{where[1]}"
    elif len(where) == 2 and where[0] == "blocks":
      name = f"block{where[1]}_detail/{key}"
    else:
      name = "/".join(map(str, path))
    named[name] = value
  return out, named


def param_count(model: nnx.Module) -> int:
  """Number of trainable scalars (nnx.Param only; running stats are excluded)."""
  leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  return int(sum(np.prod(x.shape) for x in leaves))


def abstract_model(cfg: ModelConfig) -> DPMamba:
  """A DPMamba with ShapeDtypeStruct leaves (no memory, no compute), e.g. for counting."""
  return nnx.eval_shape(lambda: DPMamba(cfg, rngs=nnx.Rngs(0)))
