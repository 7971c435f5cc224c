"""Datasets defined in a YAML file: a user's own scene, no code edit.

  python -m dpmamba_jax.train --dataset-file scene.yaml

The file (paths relative to it; docs/own-data.md has every field, the README a worked example)::

  name: my-scene                    # runs/<name>/seed<S> by default
  modalities:                       # model order; the first is the hyperspectral one
    - name: HSI
      file: hsi.tif                 # or files: [band1.tif, band2.tif, ...] (stacked in order)
      pca: 30                       # optional: whitened-PCA components
      key: HSI_data                 # optional: the array's name in a .mat / .npz
      nodata: 0                     # optional: overrides the file's own nodata value
    - name: LiDAR
      file: dsm.tif
  labels: gt.tif                    # 0 = unlabelled, 1..C; optional: `label_key`
  classes: [Trees, Grass, Roads]    # class c = label value c
  class_texts: texts.txt            # one per class: a list, or a .txt (one per line) / .json / .yaml
  palette: [[0, 128, 0], [120, 220, 60], [128, 128, 128]]   # optional
  train:                            # optional: the training settings that differ
    patch_size: 11
    batch_size: 60                  # a multiple of the class count
    train_per_class: 40
    epochs: 100

`classes` may also be a list of mappings {name, text, color}. `load_dataset_file` turns the file
into the same `DatasetSpec` as the built-in datasets, so everything downstream has one path;
every missing or inconsistent field is a one-line UserError naming the file and the field.
Band counts are read from the files' headers (a .mat / .npz is read whole for it).
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import yaml

from dpmamba_jax import fileio
from dpmamba_jax.data import datasets
from dpmamba_jax.data import io
from dpmamba_jax.errors import UserError

_TOP_KEYS = ("name", "modalities", "labels", "label_key", "classes", "class_texts", "palette",
             "train", "text_key", "source")
_MODALITY_KEYS = ("name", "file", "files", "key", "pca", "nodata")
# `train:` keys: the DatasetSpec recipe (config.resolve fills the run config from them)
_TRAIN_KEYS = ("patch_size", "batch_size", "train_per_class", "epochs", "warmup_epochs", "lr",
               "weight_decay", "grad_clip", "betas_pretrain", "betas_distill", "eps")
_FLOAT_KEYS = ("lr", "weight_decay", "grad_clip", "eps")
DEFAULT_PATCH_SIZE = 11
DEFAULT_PER_CLASS_IN_BATCH = 10  # batch_size default: classes x 10 (the authors' Houston k)


def is_dataset_file(path) -> bool:
  return str(path).lower().endswith((".yaml", ".yml"))


def _read_yaml(path: str) -> dict:
  if not os.path.isfile(path):
    what = fileio.what_is(path)
    raise UserError(f"dataset file {path}: " + (
        "not found" if what == "not found" else f"is {what}; expected a YAML file"))
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a YAML "
                    "dataset file") from None
  except yaml.YAMLError as e:
    msg = " ".join(str(e).split())[:200]
    raise UserError(f"{path}: cannot parse as YAML ({msg})") from None
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a YAML mapping with name, modalities, labels, classes, "
                    f"class_texts; got {type(data).__name__}")
  unknown = [k for k in data if k not in _TOP_KEYS]
  if unknown:
    raise UserError(f"{path}: unknown key {unknown[0]!r}; expected some of {', '.join(_TOP_KEYS)}")
  return data


class _Fields:
  """Typed access to one mapping of the file, errors naming file and field."""

  def __init__(self, path: str, where: str = ""):
    self.path, self.where = path, where

  def fail(self, field: str, msg: str) -> UserError:
    return UserError(f"{self.path}: {self.where}{field}: {msg}")

  def string(self, d: dict, field: str, required: bool = True) -> Optional[str]:
    v = d.get(field)
    if v is None:
      if required:
        raise self.fail(field, "missing; expected a string")
      return None
    if not isinstance(v, (str, int, float)) or isinstance(v, bool) or not str(v).strip():
      raise self.fail(field, f"{v!r}; expected a non-empty string")
    return str(v).strip()

  def integer(self, d: dict, field: str, lo: int, required: bool = False) -> Optional[int]:
    v = d.get(field)
    if v is None:
      if required:
        raise self.fail(field, f"missing; expected an int >= {lo}")
      return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
      raise self.fail(field, f"{v!r}; expected an int >= {lo}")
    return int(v)

  def path_of(self, value, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
      raise self.fail(field, f"{value!r}; expected a file path (relative to the dataset file)")
    p = os.path.expanduser(value.strip())
    return os.path.abspath(p if os.path.isabs(p) else os.path.join(os.path.dirname(self.path), p))


def _modalities(path: str, raw, scene_only: bool) -> list[dict]:
  top = _Fields(path)
  if not isinstance(raw, list) or not raw:
    raise top.fail("modalities", "missing or empty; expected a list of {name, file or files}")
  out, seen = [], {}
  for i, m in enumerate(raw):
    f = _Fields(path, f"modalities[{i}].")
    if not isinstance(m, dict):
      raise f.fail("", f"{m!r}; expected a mapping with name and file (or files)")
    unknown = [k for k in m if k not in _MODALITY_KEYS]
    if unknown:
      raise f.fail(unknown[0], f"unknown key; expected some of {', '.join(_MODALITY_KEYS)}")
    name = f.string(m, "name")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
      raise f.fail("name", f"{name!r}; expected letters, digits, '-' or '_' (e.g. HSI, LiDAR)")
    if name.lower() in seen:
      raise f.fail("name", f"{name!r} is also modalities[{seen[name.lower()]}]; expected "
                           "distinct modality names")
    seen[name.lower()] = i
    if ("file" in m) == ("files" in m):
      raise f.fail("file", "give exactly one of file: PATH or files: [PATH, ...]")
    files = [m["file"]] if "file" in m else m["files"]
    if not isinstance(files, list) or not files:
      raise f.fail("files", f"{files!r}; expected a non-empty list of file paths")
    files = [f.path_of(p, "files" if "files" in m else "file") for p in files]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing and not scene_only:
      what = fileio.what_is(missing[0])
      raise f.fail("file", f"{missing[0]}: " + ("file not found" if what == "not found" else
                                                f"is {what}"))
    nodata = m.get("nodata")
    if nodata is not None:
      if isinstance(nodata, str) and nodata.strip().lower() == "nan":
        nodata = float("nan")
      elif isinstance(nodata, bool) or not isinstance(nodata, (int, float)):
        raise f.fail("nodata", f"{nodata!r}; expected a number or nan")
      nodata = float(nodata)
    key = f.string(m, "key", required=False)
    pca = f.integer(m, "pca", 1)
    out.append(dict(name=name, files=tuple(files), key=key, pca=pca, nodata=nodata,
                    present=not missing))
  return out


def _class_texts(path: str, raw, n: int) -> list[str]:
  f = _Fields(path)
  if isinstance(raw, str):
    src = f.path_of(raw, "class_texts")
    if not os.path.isfile(src):
      raise f.fail("class_texts", f"{src}: file not found")
    try:
      with open(src, encoding="utf-8") as fh:
        text = fh.read()
    except UnicodeDecodeError as e:
      raise UserError(f"{src}: not UTF-8 text ({e.reason}); expected the class texts") from None
    if src.lower().endswith(".txt"):
      raw = [line.strip() for line in text.splitlines() if line.strip()]
    else:
      try:
        raw = json.loads(text) if src.lower().endswith(".json") else yaml.safe_load(text)
      except (ValueError, yaml.YAMLError) as e:
        raise UserError(f"{src}: cannot parse ({' '.join(str(e).split())[:160]}); expected a "
                        "list of class texts") from None
    where = src
  else:
    where = f"{path}: class_texts"
  if (not isinstance(raw, list) or not all(isinstance(t, str) and t.strip() for t in raw)):
    raise UserError(f"{where}: expected a list of non-empty strings, one per class")
  if len(raw) != n:
    raise UserError(f"{where}: {len(raw)} class texts for the {n} classes; expected one per class")
  return [t.strip() for t in raw]


def _classes(path: str, d: dict) -> tuple[list[str], list[str], Optional[list]]:
  """(names, texts, colours or None) from `classes` (+ `class_texts`, `palette`)."""
  f = _Fields(path)
  raw = d.get("classes")
  if not isinstance(raw, list) or not raw:
    raise f.fail("classes", "missing or empty; expected the class names in label order "
                            "(label value 1 = the first)")
  names, texts, colours = [], [], []
  for i, c in enumerate(raw):
    cf = _Fields(path, f"classes[{i}].")
    if isinstance(c, dict):
      unknown = [k for k in c if k not in ("name", "text", "color")]
      if unknown:
        raise cf.fail(unknown[0], "unknown key; expected name, text, color")
      names.append(cf.string(c, "name"))
      texts.append(cf.string(c, "text", required=False))
      colours.append(c.get("color"))
    else:
      if not isinstance(c, str) or not c.strip():
        raise cf.fail("", f"{c!r}; expected a class name or {{name, text, color}}")
      names.append(c.strip())
      texts.append(None)
      colours.append(None)
  dup = [n for i, n in enumerate(names) if n in names[:i]]
  if dup:
    raise f.fail("classes", f"{dup[0]!r} is listed twice; expected distinct class names")
  if d.get("class_texts") is not None:
    if any(t is not None for t in texts):
      raise f.fail("class_texts", "given twice (also as classes[].text); keep one")
    texts = _class_texts(path, d["class_texts"], len(names))
  elif any(t is None for t in texts):
    i = next(i for i, t in enumerate(texts) if t is None)
    raise f.fail("class_texts", f"missing (class {names[i]!r} has no text); expected a list or "
                                "a file of one description per class, or classes[].text")
  if d.get("palette") is not None:
    if any(c is not None for c in colours):
      raise f.fail("palette", "given twice (also as classes[].color); keep one")
    colours = d["palette"]
    if not isinstance(colours, list) or len(colours) != len(names):
      raise f.fail("palette", f"expected one [r, g, b] per class ({len(names)})")
  if all(c is None for c in colours):
    return names, texts, None
  for i, c in enumerate(colours):
    if (not isinstance(c, (list, tuple)) or len(c) != 3
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in c)):
      raise f.fail("palette" if d.get("palette") is not None else f"classes[{i}].color",
                   f"{c!r}; expected [r, g, b] with ints 0..255 for every class")
  return names, texts, [tuple(c) for c in colours]


def _train_settings(path: str, raw) -> dict:
  f = _Fields(path, "train.")
  if raw is None:
    return {}
  if not isinstance(raw, dict):
    raise UserError(f"{path}: train: expected a mapping of training settings "
                    f"({', '.join(_TRAIN_KEYS)})")
  out = {}
  for k, v in raw.items():
    if k not in _TRAIN_KEYS:
      raise f.fail(str(k), f"unknown training setting; expected some of {', '.join(_TRAIN_KEYS)} "
                           "(other run settings go to --config / --set)")
    if k.startswith("betas"):
      if (not isinstance(v, list) or len(v) != 2
          or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in v)):
        raise f.fail(k, f"{v!r}; expected [beta1, beta2]")
      out[k] = tuple(float(b) for b in v)
    elif k in _FLOAT_KEYS:
      if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise f.fail(k, f"{v!r}; expected a number")
      out[k] = float(v)
    else:
      out[k] = f.integer(raw, k, 0 if k == "warmup_epochs" else 1)
  return out


def load_dataset_file(path, *, scene_only: bool = False) -> datasets.DatasetSpec:
  """The DatasetSpec of a YAML dataset file (module docstring).

  Args:
    path: the .yaml file; relative paths inside it are relative to its folder.
    scene_only: for `predict`: labels, classes and texts may be absent, and so may a modality's
      files (that modality is then missing); the band count of such a modality is 0.

  Raises:
    UserError (one line naming the file and field) for a missing, unknown or inconsistent field:
    duplicate modality or class names, class texts or palette not one per class, a batch size
    not a multiple of the classes, missing files, band counts unlike `pca` allows.
  """
  path = os.path.abspath(os.fspath(path))
  d = _read_yaml(path)
  f = _Fields(path)
  name = f.string(d, "name")
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
    raise f.fail("name", f"{name!r}; expected letters, digits, '.', '-' or '_' (a folder name)")
  mods = _modalities(path, d.get("modalities"), scene_only)
  label_file = None
  if d.get("labels") is not None:
    label_file = f.path_of(d["labels"], "labels")
    if not os.path.isfile(label_file) and not scene_only:
      raise f.fail("labels", f"{label_file}: file not found")
  elif not scene_only:
    raise f.fail("labels", "missing; expected the label map file (0 = unlabelled, 1..C)")
  if scene_only and d.get("classes") is None:
    names, texts, palette = [], [], None
  else:
    names, texts, palette = _classes(path, d)
  bands = []
  for m in mods:
    if not m["present"]:
      bands.append(0)
      continue
    got = io.probe_bands(m["files"], m["key"])
    if m["pca"] is not None and m["pca"] > got:
      raise UserError(f"{path}: modalities[{mods.index(m)}].pca: {m['pca']} components from the "
                      f"{got} bands of {' + '.join(m['files'])}; expected at most {got}")
    bands.append(got)
  train = _train_settings(path, d.get("train"))
  n = len(names)
  batch = train.pop("batch_size", None)
  if n and batch is None:
    batch = n * min(DEFAULT_PER_CLASS_IN_BATCH, train.get("train_per_class", 40))
  if n and batch % n:
    raise f.fail("train.batch_size", f"{batch}; expected a multiple of the {n} classes")
  patch = train.pop("patch_size", DEFAULT_PATCH_SIZE)
  if patch % 2 == 0:
    raise f.fail("train.patch_size", f"{patch}; expected an odd int (a patch is centred on its "
                                     "pixel)")
  return datasets.DatasetSpec(
      name=name, modalities=tuple(m["name"] for m in mods), bands=tuple(bands),
      pca=tuple(m["pca"] for m in mods), class_names=tuple(names), patch_size=patch,
      batch_size=batch or 1, text_key=f.string(d, "text_key", required=False) or "",
      file_stems=tuple(() for _ in mods), folder_names=(),
      source=f.string(d, "source", required=False) or f"the dataset file {path}",
      palette=tuple(palette) if palette else (), modality_files=tuple(m["files"] for m in mods),
      modality_keys=tuple(m["key"] for m in mods),
      modality_nodata=tuple(m["nodata"] for m in mods), label_file=label_file,
      label_key=f.string(d, "label_key", required=False), class_texts=tuple(texts),
      definition=path, **train)

