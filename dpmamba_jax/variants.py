"""Ablation variants of the paper's Tables 1 and 3 (issue 7): the pieces that replace a component.

Switches (RunConfig keys, `--set KEY=VALUE`; the default is the paper's method):

  distill=kl        Variant-1   L_TBD replaced by KL distillation (T = 4), losses.kl_distill_loss
  backbone=vit      Variant-2a  modality-aware Mamba blocks replaced by transformer layers (vit.py)
  fusion=add        Variant-2b  attention fusion (AF) replaced by a plain sum: `AddFusion`
  mixer=dwconv      Variant-2c  the selective scan (MISM) replaced by a depthwise 3x3 conv:
                                `DWConvMixer`
  prompts=false     Variant-3   the student has no prompts: missing features are zero-filled in
                                student training and at test time
  modalities=HSI    HSI-Net (LiDAR-Net, SAR-Net): the dataset restricted to the named modalities
                                in training and testing: `restrict_spec`, `restrict_scene`

The model-side switches are ModelConfig fields (backbone, fusion, mixer, prompts); model.py builds
these modules in their place.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from flax import nnx

from dpmamba_jax import model as model_lib
from dpmamba_jax.errors import UserError


class AddFusion(nnx.Module):
  """Variant-2b: fusion by addition, sum_i z_i (no 1/n mean, no parameters, no dropout).

  Same call signature as model.AttentionFusion; `rate` and `key` are accepted and ignored (there
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

  Params: kernel (3, 3, 1, h), bias (h,): 10 h scalars (PyTorch default init, like model.Conv3x3).
  Same call signature as model.ZigzagSSM (`impl` is ignored).
  """

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.conv = model_lib.Conv3x3(hidden, hidden, hidden, rngs=rngs)

  def __call__(self, x: jax.Array, *, impl: str | None = None, layout: str = "NHWC") -> jax.Array:
    """x: (B, P, P, h) -> (B, P, P, h), or (P, P, B, h) with layout "HWNC"."""
    del impl
    return self.conv(x, layout)


# ----------------------------------------------------------------------------------------------
# Single-modality (and other subset) runs.


def parse_modalities(value: str, spec: Any, where: str = "config modalities") -> tuple[str, ...]:
  """"HSI" / "LiDAR,HSI" -> the named modalities in the dataset's order (case-insensitive)."""
  names = [n.strip() for n in str(value).split(",") if n.strip()]
  by_lower = {m.lower(): m for m in spec.modalities}
  expected = f"a comma-separated subset of {spec.name}'s modalities {','.join(spec.modalities)}"
  if not names:
    raise UserError(f"{where}={value!r}: expected {expected}")
  picked = []
  for n in names:
    m = by_lower.get(n.lower())
    if m is None or m in picked:
      raise UserError(f"{where}={value!r}: expected {expected}")
    picked.append(m)
  return tuple(m for m in spec.modalities if m in picked)


def restrict_spec(spec: Any, modalities: Sequence[str]) -> Any:
  """The DatasetSpec with only `modalities` (names, in spec order): bands, PCA, file stems follow.

  The name, classes and training recipe are unchanged; `full_spec` gives the registered spec back.
  """
  idx = [spec.modalities.index(m) for m in modalities]
  if idx == list(range(spec.num_modalities)):
    return spec
  pick = lambda t: tuple(t[i] for i in idx)
  # spec.synthetic (the generator's config) keeps every modality: the scene is generated whole.
  return dataclasses.replace(spec, modalities=pick(spec.modalities), bands=pick(spec.bands),
                             pca=pick(spec.pca), file_stems=pick(spec.file_stems))


def full_spec(spec: Any) -> Any:
  """The registered spec of `spec.name` with every modality (for loading the files)."""
  from dpmamba_jax import datasets
  full = datasets.get_spec(spec.name)
  if spec.synthetic is not None:  # keep a resized synthetic scene
    full = dataclasses.replace(full, synthetic=spec.synthetic)
  return full


def restrict_scene(scene: Any, spec: Any) -> Any:
  """A data.Scene loaded with every modality -> the one of `spec`'s modalities only."""
  if tuple(scene.spec.modalities) == tuple(spec.modalities):
    return dataclasses.replace(scene, spec=spec)
  idx = [scene.spec.modalities.index(m) for m in spec.modalities]
  files = tuple(scene.files)
  if len(files) == scene.spec.num_modalities + 1:
    files = tuple(files[i] for i in idx) + files[-1:]
  return dataclasses.replace(scene, spec=spec, cubes=[scene.cubes[i] for i in idx], files=files)


def net_name(modalities: Sequence[str]) -> str:
  """("HSI",) -> "HSI-Net"; ("HSI", "SAR") -> "HSI+SAR-Net"."""
  return "+".join(modalities) + "-Net"
