"""Training / test splits and the model's input transform (whitened PCA, per-band z-scores)."""
from __future__ import annotations

import dataclasses
import io
import pathlib
from typing import Optional, Sequence

import numpy as np

from dpmamba_jax import fileio
from dpmamba_jax.data.io import Scene, read_array
from dpmamba_jax.errors import UserError


# --------------------------------------------------------------------------------------------------
# Splits


@dataclasses.dataclass
class Split:
  """Training / test pixels of a scene."""
  train_idx: np.ndarray              # (N_train,) flat raster indices, sorted by (class, raster)
  test_idx: np.ndarray               # (N_test,) flat raster indices, raster order
  seed: int                          # -1 for a split read from label maps


def labels_at(labels: np.ndarray, flat_idx: np.ndarray) -> np.ndarray:
  """0-based int32 class of each flat index (labels (H, W) 1..C)."""
  return (np.asarray(labels).ravel()[np.asarray(flat_idx)] - 1).astype(np.int32)


def make_split(labels: np.ndarray, per_class: int, seed: int, *,
               include_train_in_test: bool = False, num_classes: Optional[int] = None,
               class_names: Optional[Sequence[str]] = None) -> Split:
  """Draws `per_class` training pixels per class with np.random.default_rng(seed).

  Args:
    labels: (H, W) label map, 0 = unlabelled, 1..C.
    per_class: training pixels per class.
    seed: the random seed (same seed, same split).
    include_train_in_test: test = every labelled pixel, as the authors do (default: only the
      labelled pixels not used for training).
    num_classes: C; default labels.max().
    class_names: for error messages.

  Returns:
    Split; train_idx sorted by (class, raster), test_idx in raster order.
  """
  flat = np.asarray(labels).ravel()
  c_total = int(flat.max()) if num_classes is None else int(num_classes)
  rng = np.random.default_rng(seed)
  train = []
  for c in range(1, c_total + 1):
    pos = np.flatnonzero(flat == c)
    if len(pos) < per_class:
      name = f" ({class_names[c - 1]})" if class_names else ""
      raise UserError(f"label map: class {c}{name} has {len(pos)} labelled pixels, fewer than the "
                      f"{per_class} training pixels per class (train_per_class)")
    train.append(np.sort(rng.choice(pos, per_class, replace=False)))
  train_idx = np.concatenate(train).astype(np.int64) if train else np.zeros(0, np.int64)
  labelled = np.flatnonzero(flat > 0)
  test_idx = labelled if include_train_in_test else np.setdiff1d(labelled, train_idx)
  return Split(train_idx, test_idx.astype(np.int64), int(seed))


def save_split(path, split: Split) -> None:
  """Writes the split to an .npz (keys train_idx, test_idx, seed), atomically."""
  buf = io.BytesIO()
  np.savez(buf, train_idx=split.train_idx, test_idx=split.test_idx, seed=np.int64(split.seed))
  fileio.write_bytes(path, buf.getvalue())


def load_split(path, labels: Optional[np.ndarray] = None) -> Split:
  """Reads a split written by save_split; checks it against `labels` when given."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"{path}: split file not found")
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in ("train_idx", "test_idx") if k not in z.files]
      if missing:
        raise UserError(f"{path}: no key {missing[0]!r}; expected train_idx, test_idx, seed")
      split = Split(z["train_idx"].astype(np.int64), z["test_idx"].astype(np.int64),
                    int(z["seed"]) if "seed" in z.files else -1)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a split .npz ({' '.join(str(e).split())})") from e
  if labels is not None:
    check_split(split, labels, str(path))
  return split


def check_split(split: Split, labels: np.ndarray, where: str = "split") -> None:
  """UserError unless every train/test index is a labelled pixel of `labels`."""
  flat = np.asarray(labels).ravel()
  for name, idx in (("train_idx", split.train_idx), ("test_idx", split.test_idx)):
    if idx.size and (idx.min() < 0 or idx.max() >= flat.size):
      raise UserError(f"{where}: {name} holds index {int(idx.max())} outside the scene of "
                      f"{flat.size} pixels")
    if idx.size and (flat[idx] == 0).any():
      raise UserError(f"{where}: {name} holds unlabelled pixel {int(idx[flat[idx] == 0][0])}")


def split_from_maps(path, *, labels: Optional[np.ndarray] = None,
                    include_train_in_test: bool = False,
                    keys: tuple[str, str] = ("train", "test")) -> Split:
  """A fixed split from train / test label maps (e.g. trento-semireal/official_split.npz).

  Args:
    path: .npz or .mat holding two (H, W) maps (0 = not in that set, 1..C = class).
    labels: the scene's label map; when given, the maps must have its shape and agree with it.
    include_train_in_test: add the training pixels to the test set.
    keys: names of the train and test maps.
  """
  maps = []
  for k in keys:
    arr, _ = read_array(path, k)
    maps.append(np.asarray(arr))
  tr, te = maps
  if tr.shape != te.shape or tr.ndim != 2:
    raise UserError(f"{path}: train map {tr.shape} and test map {te.shape} must be equal H x W")
  if labels is not None:
    if tr.shape != labels.shape:
      raise UserError(f"{path}: maps are {tr.shape[0]}x{tr.shape[1]} but the scene is "
                      f"{labels.shape[0]}x{labels.shape[1]}")
    for k, mp in zip(keys, maps):
      bad = (mp != 0) & (mp != labels)
      if bad.any():
        r, c = np.argwhere(bad)[0]
        raise UserError(f"{path}:{k}: class {mp[r, c]} at row {r}, col {c} disagrees with the "
                        f"label map ({labels[r, c]})")
  trf, tef = tr.ravel().astype(np.int64), te.ravel().astype(np.int64)
  train_idx = np.flatnonzero(trf > 0)
  train_idx = train_idx[np.argsort(trf[train_idx], kind="stable")]  # (class, raster)
  test_mask = (tef > 0) | ((trf > 0) if include_train_in_test else False)
  test_idx = np.flatnonzero(test_mask)
  if not include_train_in_test and np.intersect1d(train_idx, test_idx).size:
    raise UserError(f"{path}: train and test maps overlap; expected disjoint sets")
  return Split(train_idx, test_idx, -1)


# --------------------------------------------------------------------------------------------------
# Preprocessing


def whitened_pca(x: np.ndarray, n_components: int, fit_rows: Optional[np.ndarray] = None
                 ) -> np.ndarray:
  """Exact whitened PCA (as sklearn PCA(whiten=True)) of the rows of x.

  Args:
    x: (N, D) data.
    n_components: K <= D.
    fit_rows: rows used to fit the mean and covariance; None = all rows.

  Returns:
    (N, K) float32; on the fit rows every component has mean 0 and variance 1 (ddof=1). Component
    signs are fixed so that each loading vector's largest-magnitude entry is positive.
  """
  fit = x if fit_rows is None else x[fit_rows]
  n, d = fit.shape
  if n_components > d:
    raise UserError(f"PCA: {n_components} components requested from {d} bands")
  if n <= n_components:
    raise UserError(f"PCA: {n} fitting pixels for {n_components} components; need more pixels "
                    f"(or fit PCA on all pixels)")
  mean = fit.mean(axis=0, dtype=np.float64)
  cov = np.zeros((d, d), np.float64)
  for s in range(0, n, 16384):  # chunked (no (N, D) copy): float32 products, float64 total
    blk = (fit[s:s + 16384].astype(np.float64) - mean).astype(np.float32)
    cov += (blk.T @ blk).astype(np.float64)
  cov /= n - 1
  evals, evecs = np.linalg.eigh(cov)
  order = np.argsort(evals)[::-1][:n_components]
  evals, evecs = evals[order], evecs[:, order]
  sign = np.sign(evecs[np.abs(evecs).argmax(axis=0), np.arange(n_components)])
  evecs = evecs * np.where(sign == 0, 1.0, sign)
  scale = 1.0 / np.sqrt(np.maximum(evals, evals[0] * 1e-12 + 1e-30))
  proj = (evecs * scale).astype(np.float32)  # (D, K)
  out = np.empty((x.shape[0], n_components), np.float32)
  for s in range(0, x.shape[0], 65536):
    out[s:s + 65536] = (x[s:s + 65536].astype(np.float64) - mean).astype(np.float32) @ proj
  return out


def standardize(x: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
  """(N, D) -> per-column z-scores with mean / std of x[fit_rows] (std 0 -> 1), float32."""
  fit = x[fit_rows].astype(np.float64)
  mean, std = fit.mean(axis=0), fit.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  return ((x - mean) / std).astype(np.float32)


def preprocess(scene: Scene, split: Split, *, normalize: str = "standard",
               pca_fit: str = "all") -> list[np.ndarray]:
  """Model inputs per modality: whitened PCA where the spec sets it, then per-band standardisation.

  Args:
    scene: the loaded scene.
    split: its split; standardisation (and PCA when pca_fit="train") is fitted on split.train_idx.
    normalize: "standard" = z-score every band with the training pixels' mean / std (default, a
      deviation from the authors); "none" = raw values as the authors use them.
    pca_fit: "all" = fit PCA on every pixel of the scene (the authors' transductive choice);
      "train" = fit on the training pixels only.

  Returns:
    list of (H, W, spec.model_bands[m]) float32 arrays.
  """
  if normalize not in ("standard", "none"):
    raise UserError(f"normalize={normalize!r}; expected 'standard' or 'none'")
  if pca_fit not in ("all", "train"):
    raise UserError(f"pca_fit={pca_fit!r}; expected 'all' or 'train'")
  h, w = scene.shape
  out = []
  for cube, n_pca in zip(scene.cubes, scene.spec.pca):
    x = cube.reshape(h * w, -1)  # (H*W, C)
    if n_pca is not None:
      x = whitened_pca(x, n_pca, None if pca_fit == "all" else split.train_idx)
    if normalize == "standard":
      x = standardize(x, split.train_idx)
    out.append(np.asarray(x, np.float32).reshape(h, w, -1))
  return out
