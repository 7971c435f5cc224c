"""The built-in procedural scene: a small multimodal 'remote-sensing' scene generated from a seed.

Layout: Voronoi parcels on warped coordinates (spatially coherent, irregular regions), one class per
parcel; some parcels and every class boundary are unlabelled (0), as in real ground truth.

Modalities: a multi-band modality is HSI-like (smooth class spectra, parcel brightness, mixing with
a look-alike class, sub-pixel mixing, illumination field, sensor blur, noise); a 1-band modality is
elevation-like (terrain + class object height per parcel + class roughness + noise). Classes are
confusable in pairs, and each modality pairs them differently (modality m groups classes by
(c + m) // 2), so every modality alone is informative but confusable and fusion separates the pairs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage
from scipy import spatial


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Parameters of `make_synthetic_scene` (the synthetic DatasetSpec stores one)."""
  height: int = 96
  width: int = 96
  num_classes: int = 6
  bands: tuple[int, ...] = (24, 1)
  seed: int = 0
  parcel_area: float = 80.0          # mean parcel size in pixels
  unlabelled_fraction: float = 0.15  # parcels left unlabelled (they still carry data)
  noise: float = 1.0                 # scales every noise term


def _smooth_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
  """(H, W) smooth random field with zero mean and unit std."""
  f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
  return (f - f.mean()) / (f.std() + 1e-12)


def _parcels(rng, h, w, parcel_area):
  """(H, W) parcel ids from Voronoi cells of random seeds on warped coordinates."""
  n = max(2, int(round(h * w / parcel_area)))
  seeds = rng.uniform([0, 0], [h, w], size=(n, 2))
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
  warp = 0.35 * np.sqrt(parcel_area)
  sig = 0.6 * np.sqrt(parcel_area)
  yy = yy + warp * _smooth_field(rng, (h, w), sig)
  xx = xx + warp * _smooth_field(rng, (h, w), sig)
  _, ids = spatial.cKDTree(seeds).query(np.stack([yy.ravel(), xx.ravel()], -1))
  return ids.reshape(h, w), n


def _groups(num_classes: int, m: int) -> np.ndarray:
  """(C,) confusion group of each class for modality m: pairs (c + m) // 2, wrapped."""
  g = max(1, (num_classes + 1) // 2)
  return ((np.arange(num_classes) + m) // 2) % g


def _smooth_curve(rng, n, num_bumps=3):
  """(n,) smooth positive curve: baseline slope + Gaussian bumps."""
  x = np.linspace(0.0, 1.0, n)
  y = 0.15 + 0.2 * rng.uniform() * x
  for _ in range(num_bumps):
    c, wd, a = rng.uniform(0, 1), rng.uniform(0.08, 0.3), rng.uniform(-0.15, 0.35)
    y = y + a * np.exp(-0.5 * ((x - c) / wd) ** 2)
  return np.clip(y, 0.02, None)


def _spectral(rng, bands, cls_map, parcel_ids, parcel_cls, groups, noise):
  """(H, W, bands) HSI-like cube."""
  h, w = cls_map.shape
  num_classes = len(groups)
  group_spec = np.stack([_smooth_curve(rng, bands) for _ in range(groups.max() + 1)])
  # Classes of one group differ by a small smooth perturbation: confusable, not identical.
  delta = np.stack([_smooth_curve(rng, bands, 2) - 0.15 for _ in range(num_classes)])
  delta = 0.05 * delta / (np.abs(delta).max(axis=1, keepdims=True) + 1e-12)
  cls_spec = group_spec[groups] + delta  # (C, bands)
  n_parcels = len(parcel_cls)
  # Each parcel mixes its class spectrum with the other class of its group (a mixture fraction
  # above 0.5 now and then): the group's classes overlap for real, not only through noise.
  partner = np.array([next((o for o in range(num_classes) if o != c and groups[o] == groups[c]), c)
                      for c in range(num_classes)])
  a = (0.8 * rng.beta(2.0, 3.0, size=n_parcels) * min(1.0, noise))[:, None]
  base = (1 - a) * cls_spec[parcel_cls] + a * cls_spec[partner[parcel_cls]]
  bright = rng.normal(1.0, 0.08 * noise, size=n_parcels)
  jitter = 0.02 * noise * np.stack([_smooth_curve(rng, bands, 2) - 0.15 for _ in range(n_parcels)])
  parcel_spec = bright[:, None] * base + jitter  # (n_parcels, bands)
  cube = parcel_spec[parcel_ids]  # (H, W, bands)
  # Sub-pixel mixing with the spectrum of a random class.
  frac = 0.25 * noise * rng.beta(1.0, 3.0, size=(h, w, 1))
  other = cls_spec[rng.integers(0, num_classes, size=(h, w))]
  cube = (1 - frac) * cube + frac * other
  illum = 1.0 + 0.08 * noise * _smooth_field(rng, (h, w), max(h, w) / 6)
  cube = cube * illum[..., None]
  cube = ndimage.gaussian_filter(cube, (0.7, 0.7, 0), mode="reflect")  # sensor blur
  cube = cube + rng.normal(0.0, 0.02 * noise, size=cube.shape)
  return cube.astype(np.float32)


def _elevation(rng, cls_map, parcel_ids, parcel_cls, groups, noise):
  """(H, W, 1) elevation-like raster (metres)."""
  h, w = cls_map.shape
  num_classes = len(groups)
  num_groups = groups.max() + 1
  group_h = rng.permutation(np.linspace(0.0, 12.0, num_groups))
  # The classes of a group sit below / above the group height (opposite signs).
  first = np.array([groups[c] not in groups[:c] for c in range(num_classes)])
  cls_h = group_h[groups] + np.where(first, -1.0, 1.0) * rng.uniform(0.6, 1.2, size=num_classes)
  rough = rng.uniform(0.1, 1.2, size=num_classes)  # per-class surface roughness
  parcel_h = rng.normal(cls_h[parcel_cls], 1.2 * noise)
  z = parcel_h[parcel_ids]
  z = z + rough[cls_map] * noise * rng.standard_normal((h, w))
  z = z + 2.0 * _smooth_field(rng, (h, w), max(h, w) / 4)  # terrain
  z = ndimage.gaussian_filter(z, 0.7, mode="reflect")
  z = z + rng.normal(0.0, 0.3 * noise, size=(h, w))
  return (z - z.min()).astype(np.float32)[..., None]


def make_synthetic_scene(height: int = 96, width: int = 96, num_classes: int = 6,
                         bands: tuple[int, ...] = (24, 1), seed: int = 0, *,
                         parcel_area: float = 80.0, unlabelled_fraction: float = 0.15,
                         noise: float = 1.0) -> tuple[list[np.ndarray], np.ndarray]:
  """Generates the procedural scene.

  Args:
    height, width: scene size H x W.
    num_classes: C >= 1.
    bands: band count per modality (any number of modalities); 1 band -> elevation-like,
      more -> HSI-like.
    seed: everything is drawn from `np.random.default_rng(seed)`; same arguments, same scene.
    parcel_area: mean region size in pixels.
    unlabelled_fraction: fraction of parcels whose pixels are labelled 0.
    noise: multiplies every noise / variability term.

  Returns:
    cubes: list of (H, W, bands[m]) float32 arrays.
    labels: (H, W) int32 label map, 0 = unlabelled, 1..C.
  """
  if height < 1 or width < 1 or num_classes < 1 or not bands or min(bands) < 1:
    raise ValueError(f"bad synthetic scene size {height}x{width}, {num_classes} classes, "
                     f"bands {bands}")
  rng = np.random.default_rng(seed)
  parcel_ids, n = _parcels(rng, height, width, parcel_area)
  parcel_cls = rng.permutation(np.arange(n) % num_classes)  # balanced class counts
  cls_map = parcel_cls[parcel_ids]  # (H, W) 0-based, every pixel
  cubes = []
  for m, b in enumerate(bands):
    mrng = np.random.default_rng([seed, 1 + m])
    groups = _groups(num_classes, m)
    if b == 1:
      cubes.append(_elevation(mrng, cls_map, parcel_ids, parcel_cls, groups, noise))
    else:
      cubes.append(_spectral(mrng, b, cls_map, parcel_ids, parcel_cls, groups, noise))
  # Ground truth: labelled parcels, minus pixels whose 3x3 neighbourhood holds another class.
  labelled_parcel = rng.uniform(size=n) >= unlabelled_fraction
  same = (ndimage.maximum_filter(cls_map, 3, mode="nearest") ==
          ndimage.minimum_filter(cls_map, 3, mode="nearest"))
  labels = np.where(labelled_parcel[parcel_ids] & same, cls_map + 1, 0).astype(np.int32)
  return cubes, labels


def generate(cfg: SyntheticConfig) -> tuple[list[np.ndarray], np.ndarray]:
  """`make_synthetic_scene` with the parameters of `cfg`."""
  return make_synthetic_scene(cfg.height, cfg.width, cfg.num_classes, tuple(cfg.bands), cfg.seed,
                              parcel_area=cfg.parcel_area,
                              unlabelled_fraction=cfg.unlabelled_fraction, noise=cfg.noise)
