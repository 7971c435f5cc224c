"""Classical baselines on the built-in synthetic scene: is each modality informative, fusion better?

  python tools/synthetic_baselines.py [--seeds 0 1 2] [--json]

Features per modality: the standardised centre-pixel bands plus their 5x5 mean (symmetric padding).
Classifiers (numpy only): nearest class mean (NCM) and linear discriminant analysis with a shrunk
shared covariance (LDA). Training set = the synthetic spec's train_per_class pixels per class drawn
by make_split(seed); test = every other labelled pixel. Prints the overall accuracy (OA, %) per
modality and for the fusion (features concatenated), averaged over the seeds.
"""
from __future__ import annotations

import json

import numpy as np

from dpmamba_jax import data
from dpmamba_jax.data import datasets
from dpmamba_jax import errors


def features(cube: np.ndarray, split: data.Split, window: int = 5) -> np.ndarray:
  """(H*W, 2C): standardised centre pixel and its window x window mean."""
  h, w, _ = cube.shape
  x = data.standardize(cube.reshape(h * w, -1), split.train_idx).reshape(h, w, -1)
  padded = data.pad_cubes([x], window)[0]
  patches = data.gather_patches(padded, np.arange(h * w), w, window)  # (H*W, win, win, C)
  return np.concatenate([x.reshape(h * w, -1), patches.mean(axis=(1, 2))], axis=-1)


def ncm(xtr, ytr, xte, num_classes):
  means = np.stack([xtr[ytr == c].mean(0) for c in range(num_classes)])
  return np.argmin(((xte[:, None] - means[None]) ** 2).sum(-1), axis=1)


def lda(xtr, ytr, xte, num_classes, shrink: float = 0.1):
  means = np.stack([xtr[ytr == c].mean(0) for c in range(num_classes)])
  resid = xtr - means[ytr]
  cov = resid.T @ resid / max(1, len(xtr) - num_classes)
  cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
  prec = np.linalg.inv(cov)
  w = means @ prec  # (C, D)
  b = -0.5 * np.einsum("cd,cd->c", w, means)
  return np.argmax(xte @ w.T + b, axis=1)


def run(seed: int, spec: datasets.DatasetSpec) -> dict[str, dict[str, float]]:
  scene = data.load_scene(spec)
  split = data.make_split(scene.labels, spec.train_per_class, seed, num_classes=spec.num_classes)
  ytr = data.labels_at(scene.labels, split.train_idx)
  yte = data.labels_at(scene.labels, split.test_idx)
  feats = [features(c, split) for c in scene.cubes]
  sets = {m: f for m, f in zip(spec.modalities, feats)}
  sets["fusion"] = np.concatenate(feats, axis=-1)
  out = {}
  for name, f in sets.items():
    out[name] = {}
    for cname, clf in (("ncm", ncm), ("lda", lda)):
      pred = clf(f[split.train_idx], ytr, f[split.test_idx], spec.num_classes)
      out[name][cname] = 100.0 * float((pred == yte).mean())
  return out


@errors.cli_entry
def main(argv=None) -> int:
  ap = errors.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  spec = datasets.get_spec("synthetic")
  runs = [run(s, spec) for s in args.seeds]
  mean = {k: {c: float(np.mean([r[k][c] for r in runs])) for c in runs[0][k]} for k in runs[0]}
  if args.json:
    print(json.dumps({"seeds": args.seeds, "runs": runs, "mean": mean}, indent=1))
    return 0
  print(f"synthetic scene {spec.synthetic.height}x{spec.synthetic.width}, "
        f"{spec.num_classes} classes, bands {spec.bands}, {spec.train_per_class} train/class, "
        f"split seeds {args.seeds}; OA % (centre pixel + 5x5 mean features)")
  print(f"{'input':<8} {'NCM':>7} {'LDA':>7}")
  for k, v in mean.items():
    print(f"{k:<8} {v['ncm']:7.1f} {v['lda']:7.1f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
