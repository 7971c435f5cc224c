"""Runs on a subset of a dataset's modalities (HSI-Net, LiDAR-Net, ...: `--set modalities=HSI`).

The spec is restricted to the named modalities (bands, PCA and file stems follow); the files are
still loaded whole and the scene restricted after loading.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from dpmamba_jax.data import dataset_file
from dpmamba_jax.data import datasets
from dpmamba_jax.errors import UserError


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
  pick = lambda t: tuple(t[i] for i in idx) if t else t
  # spec.synthetic (the generator's config) keeps every modality: the scene is generated whole.
  return dataclasses.replace(spec, modalities=pick(spec.modalities), bands=pick(spec.bands),
                             pca=pick(spec.pca), file_stems=pick(spec.file_stems),
                             modality_files=pick(spec.modality_files),
                             modality_keys=pick(spec.modality_keys),
                             modality_nodata=pick(spec.modality_nodata))


def full_spec(spec: Any) -> Any:
  """The registered spec of `spec.name` with every modality (for loading the files)."""
  full = (dataset_file.load_dataset_file(spec.definition) if spec.definition
          else datasets.get_spec(spec.name))
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
