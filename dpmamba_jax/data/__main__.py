"""`python -m dpmamba_jax.data --dataset NAME --data-dir DIR [--json]`: load, validate and
summarise a dataset (shapes, value ranges, class counts, split sizes)."""
from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np

from dpmamba_jax import errors
from dpmamba_jax.data import dataset_file
from dpmamba_jax.data import datasets
from dpmamba_jax.data.io import DATA_DIR_ENV, Scene, load_scene
from dpmamba_jax.data.patches import check_patch_size
from dpmamba_jax.data.preprocessing import Split, labels_at, make_split, split_from_maps
from dpmamba_jax.errors import UserError


# --------------------------------------------------------------------------------------------------
# Inspect CLI


def _parse_overrides(items: Sequence[str], what: str) -> dict[str, str]:
  out = {}
  for it in items or ():
    if "=" not in it:
      raise UserError(f"--{what} {it!r}; expected NAME=VALUE, e.g. HSI=HSI_data")
    k, v = it.split("=", 1)
    out[k] = v
  return out


def inspect_scene(scene: Scene, split: Split, split_desc: dict) -> dict:
  """JSON-able summary: shapes, value ranges, class counts, split sizes."""
  spec = scene.spec
  h, w = scene.shape
  mods = []
  for i, (name, cube, nodata) in enumerate(zip(spec.modalities, scene.cubes,
                                                scene.nodata_masks())):
    values = cube if nodata is None else cube[~nodata]  # nodata pixels are in no statistic
    stats = ({"min": float(values.min()), "max": float(values.max()),
              "mean": float(values.mean()), "std": float(values.std())} if values.size
             else dict.fromkeys(("min", "max", "mean", "std"), float("nan")))
    mods.append({
        "name": name, "source": scene.files[i] if i < len(scene.files) else scene.source,
        "shape": list(cube.shape), "bands": int(cube.shape[-1]),
        "model_bands": spec.model_bands[i], "pca": spec.pca[i], **stats,
        "nodata_pixels": 0 if nodata is None else int(nodata.sum())})
  counts = scene.class_counts()
  train_lab = np.bincount(labels_at(scene.labels, split.train_idx), minlength=spec.num_classes)
  return {
      "dataset": spec.name, "source": scene.source, "height": h, "width": w,
      "modalities": mods,
      "classes": [{"index": c + 1, "name": n, "count": int(counts[c]), "train": int(train_lab[c])}
                  for c, n in enumerate(spec.class_names)],
      "counts": [int(x) for x in counts],
      "labelled": int(counts.sum()), "unlabelled": int(h * w - counts.sum()),
      "split": {**split_desc, "train": int(split.train_idx.size),
                "test": int(split.test_idx.size)},
      "patch_size": spec.patch_size, "batch_size": spec.batch_size,
  }


def _format_text(info: dict) -> str:
  lines = [f"dataset {info['dataset']}  ({info['source']})",
           f"scene {info['height']}x{info['width']}, "
           f"{' + '.join(str(m['bands']) for m in info['modalities'])} bands, "
           f"patch {info['patch_size']}, batch {info['batch_size']}"]
  for m in info["modalities"]:
    pca = f" -> PCA {m['pca']}" if m["pca"] else ""
    lines.append(f"  {m['name']:<6} {'x'.join(map(str, m['shape']))}{pca}  "
                 f"min {m['min']:.4g}  max {m['max']:.4g}  mean {m['mean']:.4g}  "
                 f"std {m['std']:.4g}"
                 + (f"  ({m['nodata_pixels']} nodata px)" if m["nodata_pixels"] else "")
                 + f"  [{m['source']}]")
  lines.append(f"classes ({len(info['classes'])}; {info['labelled']} labelled, "
               f"{info['unlabelled']} unlabelled):")
  for c in info["classes"]:
    lines.append(f"  {c['index']:>2} {c['name']:<24} {c['count']:>8}  train {c['train']}")
  s = info["split"]
  lines.append(f"split ({s['kind']}): train {s['train']}, test {s['test']}"
               f"{' (includes train)' if s['include_train_in_test'] else ''}")
  return "\n".join(lines)


@errors.cli_entry
def main(argv=None) -> int:
  ap = errors.ArgumentParser(prog="python -m dpmamba_jax.data",
                               description="Load, validate and summarise a dataset.")
  ap.add_argument("--dataset", default="synthetic", help=f"one of {', '.join(datasets.DATASETS)}")
  ap.add_argument("--dataset-file", default=None, metavar="YAML",
                  help="a dataset defined in a YAML file (data/dataset_file.py) instead")
  ap.add_argument("--data-dir", default=None,
                  help=f"dataset folder (default ${DATA_DIR_ENV}/<name>, else ./data/<name>)")
  ap.add_argument("--key", action="append", default=[], metavar="NAME=KEY",
                  help="array key override, NAME = a modality (HSI, LiDAR, SAR) or 'labels'")
  ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH",
                  help="file override, NAME = a modality or 'labels'")
  ap.add_argument("--seed", type=int, default=None, help="split seed (default: the spec's)")
  ap.add_argument("--per-class", type=int, default=None,
                  help="training pixels per class (default: the spec's)")
  ap.add_argument("--split-maps", default=None,
                  help="fixed split from train/test label maps (.npz/.mat with keys train, test)")
  ap.add_argument("--include-train-in-test", action="store_true",
                  help="test on every labelled pixel, as the authors do")
  ap.add_argument("--json", action="store_true", help="print JSON")
  args = ap.parse_args(argv)
  if args.per_class is not None and args.per_class < 1:
    raise UserError(f"--per-class {args.per_class}: expected an int >= 1 (training pixels per "
                    f"class)")
  if args.seed is not None and args.seed < 0:
    raise UserError(f"--seed {args.seed}: expected a non-negative int")
  spec = (dataset_file.load_dataset_file(args.dataset_file) if args.dataset_file
          else datasets.get_spec(args.dataset))
  scene = load_scene(spec, args.data_dir, keys=_parse_overrides(args.key, "key"),
                     files=_parse_overrides(args.file, "file"))
  check_patch_size(spec.patch_size, scene.shape, f"dataset {spec.name}")
  if args.split_maps:
    split = split_from_maps(args.split_maps, labels=scene.labels,
                            include_train_in_test=args.include_train_in_test)
    desc = {"kind": f"maps {args.split_maps}"}
  else:
    seed = spec.seed if args.seed is None else args.seed
    per = spec.train_per_class if args.per_class is None else args.per_class
    split = make_split(scene.labels, per, seed, num_classes=spec.num_classes,
                       include_train_in_test=args.include_train_in_test,
                       class_names=spec.class_names, label_source=scene.label_source)
    desc = {"kind": f"random {per}/class", "seed": seed, "per_class": per}
  desc["include_train_in_test"] = bool(args.include_train_in_test)
  info = inspect_scene(scene, split, desc)
  if args.json:
    print(json.dumps(info, indent=1))
  else:
    print(_format_text(info))
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
