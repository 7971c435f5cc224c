"""Training / test splits and the model's input transform (whitened PCA, per-band z-scores)."""
from __future__ import annotations

import dataclasses
import io
import numbers
import pathlib
from typing import Optional, Sequence

import numpy as np

from dpmamba_jax import fileio
from dpmamba_jax.data.io import READ_ERRORS, Scene, read_array
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


def _check_int(value, name: str, minimum: int) -> int:
  """`value` as an int >= minimum, else UserError naming `name` (bools and floats are refused)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or int(value) < minimum):
    what = "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
    raise UserError(f"{name}={value!r}; expected {what}")
  return int(value)


def make_split(labels: np.ndarray, per_class: int, seed: int, *,
               include_train_in_test: bool = False, num_classes: Optional[int] = None,
               class_names: Optional[Sequence[str]] = None,
               label_source: str = "label map") -> Split:
  """Draws `per_class` training pixels per class with np.random.default_rng(seed).

  Args:
    labels: (H, W) label map, 0 = unlabelled, 1..C.
    per_class: training pixels per class (an int >= 1).
    seed: the random seed (a non-negative int; same seed, same split).
    include_train_in_test: test = every labelled pixel, as the authors do (default: only the
      labelled pixels not used for training).
    num_classes: C; default labels.max().
    class_names, label_source: for error messages (names of the classes, the label file).

  Returns:
    Split; train_idx sorted by (class, raster), test_idx in raster order.
  """
  per_class = _check_int(per_class, "train_per_class", 1)
  seed = _check_int(seed, "seed", 0)
  flat = np.asarray(labels).ravel()
  c_total = int(flat.max()) if num_classes is None else int(num_classes)
  rng = np.random.default_rng(seed)
  train = []
  for c in range(1, c_total + 1):
    pos = np.flatnonzero(flat == c)
    if len(pos) < per_class:
      name = f" ({class_names[c - 1]})" if class_names else ""
      raise UserError(f"{label_source}: class {c}{name} has {len(pos)} labelled pixels, fewer "
                      f"than the {per_class} training pixels per class (train_per_class); "
                      "expected a smaller train_per_class or more labelled pixels")
    train.append(np.sort(rng.choice(pos, per_class, replace=False)))
  train_idx = np.concatenate(train).astype(np.int64) if train else np.zeros(0, np.int64)
  labelled = np.flatnonzero(flat > 0)
  test_idx = labelled if include_train_in_test else np.setdiff1d(labelled, train_idx)
  return Split(train_idx, test_idx.astype(np.int64), int(seed))


_SPLIT_EXPECTED = ("expected an .npz with integer arrays train_idx, test_idx (and seed) as written "
                   "by save_split")


def save_split(path, split: Split) -> None:
  """Writes the split to an .npz (keys train_idx, test_idx, seed, include_train_in_test), atomically.

  include_train_in_test records whether the test set holds training pixels (an overlap made on
  purpose, e.g. make_split(include_train_in_test=True)); load_split accepts such a file.
  """
  overlap = bool(np.intersect1d(split.train_idx, split.test_idx).size)
  buf = io.BytesIO()
  np.savez(buf, train_idx=split.train_idx, test_idx=split.test_idx, seed=np.int64(split.seed),
           include_train_in_test=np.bool_(overlap))
  fileio.write_bytes(path, buf.getvalue())


def _split_array(path, z, key: str) -> np.ndarray:
  arr = z[key]
  if arr.ndim != 1 or arr.dtype.kind not in "iu":
    raise UserError(f"{path}: {key} has dtype {arr.dtype} and shape {arr.shape}; expected a 1-D "
                    f"array of integer flat pixel indices")
  return arr.astype(np.int64)


def _split_scalar(path, z, key: str, kinds: str, expected: str):
  arr = z[key]
  if arr.size != 1 or arr.dtype.kind not in kinds:
    raise UserError(f"{path}: {key} has dtype {arr.dtype} and shape {arr.shape}; expected {expected}")
  return arr.reshape(()).item()


def load_split(path, labels: Optional[np.ndarray] = None, *, allow_overlap: bool = False) -> Split:
  """Reads a split written by save_split; checks it against `labels` when given.

  Args:
    path: the .npz.
    labels: the scene's (H, W) label map; when given, every index must be a labelled pixel.
    allow_overlap: accept pixels in both train_idx and test_idx (a run with
      include_train_in_test); a file written by save_split from such a split says so itself
      (key include_train_in_test) and is accepted without it.

  Raises:
    UserError (one line naming the file) for a missing, damaged or foreign file, missing keys,
    non-integer or repeated indices, overlapping train / test sets and (with `labels`) indices
    outside the scene or on unlabelled pixels.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"{path}: split file not found")
  try:
    with open(path, "rb") as f:
      head = f.read(4)
    if not head:
      raise UserError(f"{path}: is empty (0 bytes); {_SPLIT_EXPECTED}")
    if head not in (b"PK\x03\x04", b"PK\x05\x06"):
      raise UserError(f"{path}: not a split .npz (not a zip archive); {_SPLIT_EXPECTED}")
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in ("train_idx", "test_idx") if k not in z.files]
      if missing:
        raise UserError(f"{path}: no key {missing[0]!r}; expected train_idx, test_idx, seed")
      train_idx, test_idx = _split_array(path, z, "train_idx"), _split_array(path, z, "test_idx")
      seed = (int(_split_scalar(path, z, "seed", "iu", "one integer"))
              if "seed" in z.files else -1)
      recorded = ("include_train_in_test" in z.files and bool(_split_scalar(
          path, z, "include_train_in_test", "biu", "one boolean")))
  except READ_ERRORS as e:
    msg = " ".join(str(e).split())[:160]
    name = type(e).__name__ if type(e).__name__ != "error" else f"{type(e).__module__}.error"
    raise UserError(f"{path}: not a readable split .npz ({name}: {msg}); "
                    f"{_SPLIT_EXPECTED}") from e
  split = Split(train_idx, test_idx, seed)
  allow = allow_overlap or recorded
  if labels is not None:
    check_split(split, labels, str(path), allow_overlap=allow)
  else:
    _check_indices(split, str(path), allow)
  return split


def _check_indices(split: Split, where: str, allow_overlap: bool) -> None:
  if split.train_idx.size == 0:
    raise UserError(f"{where}: train_idx is empty; expected at least one training pixel")
  for name, idx in (("train_idx", split.train_idx), ("test_idx", split.test_idx)):
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
      dup = uniq[counts > 1]
      raise UserError(f"{where}: {name} holds {dup.size} pixels more than once (e.g. pixel "
                      f"{int(dup[0])}); expected each pixel once")
  if not allow_overlap:
    both = np.intersect1d(split.train_idx, split.test_idx)
    if both.size:
      raise UserError(f"{where}: {both.size} pixels are in both train_idx and test_idx; expected "
                      f"disjoint sets (use include_train_in_test to test on training pixels)")


def check_split(split: Split, labels: np.ndarray, where: str = "split", *,
                allow_overlap: bool = False) -> None:
  """UserError unless every train/test index is a labelled pixel of `labels`, no pixel is listed
  twice, and (unless allow_overlap) no pixel is in both train_idx and test_idx."""
  flat = np.asarray(labels).ravel()
  for name, idx in (("train_idx", split.train_idx), ("test_idx", split.test_idx)):
    if idx.size and (idx.min() < 0 or idx.max() >= flat.size):
      bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
      raise UserError(f"{where}: {name} holds index {bad} outside the scene of "
                      f"{flat.size} pixels; expected 0..{flat.size - 1}")
    if idx.size and (flat[idx] == 0).any():
      raise UserError(f"{where}: {name} holds unlabelled pixel {int(idx[flat[idx] == 0][0])}; "
                      f"expected labelled pixels only")
  _check_indices(split, where, allow_overlap)


def _check_map(path, key: str, mp: np.ndarray) -> None:
  """A train / test map: integers 0 (not in the set) .. C (the class)."""
  if mp.dtype.kind == "b":
    raise UserError(f"{path}:{key}: boolean map; expected class indices (0 = not in the set, "
                    f"1..C = class)")
  if mp.dtype.kind == "f":
    bad = ~np.isfinite(mp) | (mp != np.round(mp))
    if bad.any():
      r, c = np.argwhere(bad)[0]
      raise UserError(f"{path}:{key}: value {mp[r, c]} at row {r}, col {c} is not an integer; "
                      f"expected class indices (0 = not in the set, 1..C = class)")
  if mp.min() < 0:
    r, c = np.argwhere(mp < 0)[0]
    raise UserError(f"{path}:{key}: value {mp[r, c]} at row {r}, col {c} is negative; expected "
                    f"class indices (0 = not in the set, 1..C = class)")


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
  for k, mp in zip(keys, maps):
    _check_map(path, k, mp)
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
  for k, idx in zip(keys, (train_idx, test_idx)):
    if idx.size == 0:
      raise UserError(f"{path}:{k}: map marks no pixel; expected at least one pixel of class 1..C")
  if not include_train_in_test and np.intersect1d(train_idx, test_idx).size:
    raise UserError(f"{path}: train and test maps overlap; expected disjoint sets")
  return Split(train_idx, test_idx, -1)


# --------------------------------------------------------------------------------------------------
# Preprocessing


@dataclasses.dataclass(frozen=True)
class BandTransform:
  """One modality's fitted input transform: optional whitened PCA, then optional z-scores.

  raw (N, D) -> ((raw - pca_mean) as float32 @ pca_proj) -> (x - mean) / std -> (N, K) float32;
  with keep_bands the PCA components follow the raw bands: [raw, PCA] (N, D + K) is z-scored.
  """
  bands: int                                  # D, the bands in the files
  pca_mean: Optional[np.ndarray] = None       # (D,) float64
  pca_proj: Optional[np.ndarray] = None       # (D, K) float32 (components scaled to unit variance)
  mean: Optional[np.ndarray] = None           # (out_bands,) float64
  std: Optional[np.ndarray] = None            # (out_bands,) float64, no zeros
  keep_bands: bool = False

  @property
  def out_bands(self) -> int:
    if self.pca_proj is None:
      return self.bands
    return int(self.pca_proj.shape[1]) + (self.bands if self.keep_bands else 0)

  def apply(self, x: np.ndarray) -> np.ndarray:
    """(N, D) raw pixels -> (N, out_bands) float32 model inputs (each row on its own: tiles of a
    scene transform exactly like the whole scene)."""
    if self.pca_proj is not None:
      y = _apply_pca(x, self.pca_mean, self.pca_proj)
      x = np.concatenate([np.asarray(x, np.float32), y], axis=1) if self.keep_bands else y
    if self.mean is not None:
      x = ((x - self.mean) / self.std).astype(np.float32)
    return np.asarray(x, np.float32)

  def to_json(self) -> dict:
    """Exact: JSON floats round-trip float64 (and so float32) values."""
    out = {"bands": int(self.bands)}
    if self.keep_bands:
      out["keep_bands"] = True
    for k in ("pca_mean", "pca_proj", "mean", "std"):
      v = getattr(self, k)
      if v is not None:
        out[k] = np.asarray(v, np.float64).tolist()
    return out

  @classmethod
  def from_json(cls, d: dict) -> "BandTransform":
    def arr(k, dtype):
      return None if d.get(k) is None else np.asarray(d[k], np.float64).astype(dtype)
    return cls(bands=int(d["bands"]), pca_mean=arr("pca_mean", np.float64),
               pca_proj=arr("pca_proj", np.float32), mean=arr("mean", np.float64),
               std=arr("std", np.float64), keep_bands=bool(d.get("keep_bands", False)))


@dataclasses.dataclass(frozen=True)
class InputTransform:
  """The model's input transform, one BandTransform per modality, fitted on the training scene
  (`fit_transform`) and saved with the models, so that a new scene is transformed like it."""
  modalities: tuple[str, ...]
  parts: tuple[BandTransform, ...]

  def apply(self, cubes: Sequence[np.ndarray],
            nodata: Optional[Sequence[Optional[np.ndarray]]] = None) -> list[np.ndarray]:
    """Raw (h, w, D_m) cubes -> (h, w, K_m) float32 model inputs; pixels where `nodata[m]`
    ((h, w) bool) is set become 0 (the training pixels' mean when standardised)."""
    out = []
    for m, (cube, part) in enumerate(zip(cubes, self.parts)):
      if cube is None:
        out.append(None)
        continue
      h, w = cube.shape[:2]
      x = part.apply(cube.reshape(h * w, -1)).reshape(h, w, -1)
      if nodata is not None and nodata[m] is not None:
        x[nodata[m]] = 0.0
      out.append(x)
    return out

  def to_json(self) -> dict:
    return {"modalities": list(self.modalities), "parts": [p.to_json() for p in self.parts]}

  @classmethod
  def from_json(cls, d: dict) -> "InputTransform":
    return cls(tuple(d["modalities"]), tuple(BandTransform.from_json(p) for p in d["parts"]))


def _fit_pca(x: np.ndarray, n_components: int, fit_rows: Optional[np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray]:
  """(mean (D,) float64, projection (D, K) float32) of the whitened PCA of x's rows."""
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
  return mean, (evecs * scale).astype(np.float32)  # (D,), (D, K)


def _apply_pca(x: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
  out = np.empty((x.shape[0], proj.shape[1]), np.float32)
  for s in range(0, x.shape[0], 65536):
    out[s:s + 65536] = (x[s:s + 65536].astype(np.float64) - mean).astype(np.float32) @ proj
  return out


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
  return _apply_pca(x, *_fit_pca(x, n_components, fit_rows))


def _fit_standardize(x: np.ndarray, fit_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  fit = x[fit_rows].astype(np.float64)
  mean, std = fit.mean(axis=0), fit.std(axis=0)
  return mean, np.where(std > 0, std, 1.0)


def standardize(x: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
  """(N, D) -> per-column z-scores with mean / std of x[fit_rows] (std 0 -> 1), float32."""
  mean, std = _fit_standardize(x, fit_rows)
  return ((x - mean) / std).astype(np.float32)


def fit_transform(scene: Scene, split: Split, *, normalize: str = "standard",
                  pca_fit: str = "all") -> InputTransform:
  """Fits the model's input transform on a scene: whitened PCA where the spec sets it, then
  per-band standardisation.

  Args:
    scene: the loaded scene (pixels where a modality has no data are left out of every fit).
    split: its split; standardisation (and PCA when pca_fit="train") is fitted on split.train_idx.
    normalize: "standard" = z-score every band with the training pixels' mean / std (default, a
      deviation from the authors); "none" = raw values as the authors use them.
    pca_fit: "all" = fit PCA on every (valid) pixel of the scene (the authors' transductive
      choice); "train" = fit on the training pixels only.
  """
  if normalize not in ("standard", "none"):
    raise UserError(f"normalize={normalize!r}; expected 'standard' or 'none'")
  if pca_fit not in ("all", "train"):
    raise UserError(f"pca_fit={pca_fit!r}; expected 'all' or 'train'")
  h, w = scene.shape
  invalid = scene.invalid()
  all_rows = None if invalid is None else np.flatnonzero(~invalid.ravel())
  parts = []
  for cube, n_pca in zip(scene.cubes, scene.spec.pca):
    x = cube.reshape(h * w, -1)  # (H*W, D)
    part = BandTransform(bands=x.shape[1])
    if n_pca is not None:
      mean, proj = _fit_pca(x, n_pca, all_rows if pca_fit == "all" else split.train_idx)
      part = dataclasses.replace(part, pca_mean=mean, pca_proj=proj,
                                 keep_bands=scene.spec.pca_keeps_bands)
    if normalize == "standard":
      y = part.apply(x) if n_pca is not None else x  # (H*W, K)
      mean, std = _fit_standardize(y, split.train_idx)
      part = dataclasses.replace(part, mean=mean, std=std)
    parts.append(part)
  return InputTransform(tuple(scene.spec.modalities), tuple(parts))


def preprocess(scene: Scene, split: Split, *, normalize: str = "standard",
               pca_fit: str = "all") -> list[np.ndarray]:
  """The model inputs of a scene: `fit_transform(...)` applied to it.

  Returns:
    list of (H, W, spec.model_bands[m]) float32 arrays (0 at pixels without data).
  """
  transform = fit_transform(scene, split, normalize=normalize, pca_fit=pca_fit)
  return transform.apply(scene.cubes, scene.nodata_masks())
