"""The run configuration: one frozen dataclass resolved from the dataset spec, a config file,
`--set key=value` overrides and the command-line flags (in that order; later wins).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, Callable, Optional, Sequence, Union

import yaml

from dpmamba_jax import errors
from dpmamba_jax.data import dataset_file as dataset_file_lib
from dpmamba_jax.data import datasets
from dpmamba_jax.data import subsets
from dpmamba_jax.model import network

STAGES = ("all", "pretrain", "distill")
# honest: this project's protocol. reference: the authors' training and evaluation protocol where
# it differs (raw inputs, the test set includes the training pixels, their LR schedule with its
# off-by-one, masked samples in the student's BatchNorm statistics), for comparisons with the paper.
PROTOCOLS = ("honest", "reference")
# What `protocol: reference` sets (resolve): RunConfig keys, and the train-step switches it implies
# (train.py reads them from `protocol`).
REFERENCE_KEYS = {"normalize": "none", "include_train_in_test": True}
NORMALIZE = ("none", "standard")
MODEL_PRESETS = ("paper", "tiny")
# The training methods (methods.py registers one Method per name; tests/test_methods.py checks
# that the two lists agree): DPMamba and the comparison methods of the paper's Table 1.
MAX_SEED = 2**30                         # seeds + offsets stay within int32 (jax PRNG keys)
MAX_EVAL_BATCH = 65536                   # one batch's patches and activations fit in memory
METHODS = ("dpmamba", "shaspec", "dgdnet", "mshnet", "hct", "sal2rn", "crosshl")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one training run depends on. Saved as <workdir>/config.json.

  Keys left None take the dataset spec's value (see `resolve`).
  """
  method: str = "dpmamba"                # METHODS; a comparison method's own settings come
                                         # first (methods.py, configs/peers/)
  dataset: str = "synthetic"
  dataset_file: Optional[str] = None     # a YAML dataset definition (data/dataset_file.py)
  data_dir: Optional[str] = None
  workdir: Optional[str] = None          # default runs/<dataset>/seed<seed>
  seed: int = 0
  stage: str = "all"                     # all | a stage of the method (dpmamba: pretrain,
                                         # distill): that stage, the earlier ones loaded
  protocol: str = "honest"               # honest | reference (the authors' protocol, PROTOCOLS)
  teacher_ckpt: Optional[str] = None     # teacher save_model dir (default <workdir>/teacher)
  # Data.
  split_file: Optional[str] = None       # official_split.npz-style maps or a saved split.npz
  include_train_in_test: bool = False    # the authors test on all labelled pixels (spec §7.1.2)
  normalize: str = "standard"            # standard (z-score on train pixels) | none (the authors)
  pca_fit: str = "all"                   # all pixels (the authors) | train
  pca: Optional[str] = None              # None: the dataset's PCA; raw: every band; N: the
                                         # first modality's N PCA components; raw+N: its bands,
                                         # then N components (data.pca_override)
  train_per_class: Optional[int] = None
  synthetic_height: Optional[int] = None  # override the built-in scene's size (tests, demos)
  synthetic_width: Optional[int] = None
  # Text.
  text_encoder: Optional[str] = None     # clip | minilm | random (None = text.py's default)
  clip_weights: Optional[str] = None
  # Optimisation (spec §6).
  epochs_pretrain: Optional[int] = None
  epochs_distill: Optional[int] = None
  warmup_epochs: Optional[int] = None
  batch_size: Optional[int] = None
  lr: Optional[float] = None
  weight_decay: Optional[float] = None
  grad_clip: Optional[float] = None
  eps: Optional[float] = None
  betas_pretrain: Optional[tuple[float, float]] = None
  betas_distill: Optional[tuple[float, float]] = None
  # The comparison methods' optimisers (steps.plain_optim_config; DPMamba: AdamW + its schedule)
  optimizer: str = "adamw"               # adamw | adam | sgd
  momentum: float = 0.0                  # sgd
  nesterov: bool = False                 # sgd
  lr_schedule: str = "constant"          # per epoch: constant | step | cosine
  lr_min: float = 0.0                    # cosine: the floor
  lr_cosine_extra: int = 0               # cosine: its length is the stage's epochs + this
  lr_step_epochs: int = 0                # step: lr x lr_gamma every N epochs
  lr_gamma: float = 1.0
  modality_dropout: bool = False         # comparison methods: per-sample dropout over every
                                         # non-empty modality subset while training
  distill: str = "tbd"                   # tbd (the method) | kl (ablation Variant 1)
  prompts: bool = True                   # student prompts; false = Variant-3 (zero-filled)
  # Ablations (model/ablations.py, data/subsets.py); the defaults are the paper's method.
  modalities: Optional[str] = None       # e.g. HSI: train/test on these only (HSI-Net); None = all
  backbone: str = "mamba"                # mamba | vit (Variant-2a)
  fusion: str = "af"                     # af | add (Variant-2b)
  mixer: str = "mism"                    # mism | dwconv (Variant-2c)
  # Model.
  model: str = "paper"                   # paper | tiny (ModelConfig.tiny widths, for tests)
  patch_size: Optional[int] = None
  hidden: Optional[int] = None
  depth: Optional[int] = None
  d_state: Optional[int] = None
  heads_per_direction: Optional[int] = None
  af_dropout: Optional[float] = None
  scan_impl: Optional[str] = None        # auto | recurrent | associative: how, not what (resumable)
  # Bookkeeping.
  log_every: int = 10                    # epochs between log lines
  ckpt_every: int = 25                   # epochs between training checkpoints
  eval_batch: int = 512
  eval_subsample: int = 0                # 0: every test pixel; N: a fixed random N of them (grids)
  maps: Union[bool, str] = True          # true: the method's own model's maps (DPMamba: the
                                         # student); false: none; all: every scored model's
  compile_cache: bool = True
  data_parallel: bool = True             # shard batches over all devices when there are several

  @property
  def authors_lr_off_by_one(self) -> bool:
    """`protocol: reference` runs the authors' LR schedule with its off-by-one (spec §7.1.13)."""
    return self.protocol == "reference"

  @property
  def student_bn_stats(self) -> str:
    """Which samples enter the student's embedding BatchNorm statistics (DPMamba's bn_stats):
    the authors' "all" under `protocol: reference`, else "present" (spec §7.1.12)."""
    return "all" if self.protocol == "reference" else "present"

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


_HINTS: dict[str, Any] | None = None


def _hints() -> dict[str, Any]:
  global _HINTS  # cache of typing.get_type_hints (immutable)
  if _HINTS is None:
    _HINTS = typing.get_type_hints(RunConfig)
  return _HINTS


def field_names() -> list[str]:
  return [f.name for f in dataclasses.fields(RunConfig)]


def _parse_bool(v) -> bool:
  if isinstance(v, bool):
    return v
  s = str(v).strip().lower()
  if s in ("1", "true", "yes", "on"):
    return True
  if s in ("0", "false", "no", "off"):
    return False
  raise ValueError("expected true/false")


MAPS_EXPECTED = ("true (the method's own model), false (no maps) or all (every scored model, "
                 "DPMamba's teacher too)")


def parse_maps(value: Any) -> Union[bool, str]:
  """The `maps` key: True, False or "all" from a bool or a string (true/false/yes/no/on/off/1/0,
  all); ValueError otherwise."""
  if isinstance(value, str) and value.strip().lower() == "all":
    return "all"
  try:
    return _parse_bool(value)
  except ValueError:
    raise ValueError(f"expected {MAPS_EXPECTED}") from None


def coerce(key: str, value: Any, where: str = "--set") -> Any:
  """Converts `value` (a string from the CLI, or a YAML/JSON value) to the type of `key`."""
  hints = _hints()
  if key not in hints:
    raise errors.UserError(f"{where}: unknown config key {key!r}; expected one of "
                           f"{', '.join(field_names())}")
  if key == "maps":  # true / false / all
    try:
      return parse_maps(value)
    except ValueError as e:
      raise errors.UserError(f"{where}: maps={value!r}: {e}") from None
  tp = hints[key]
  args = typing.get_args(tp)
  optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
  base = next((a for a in args if a is not type(None)), tp) if optional else tp
  try:
    if optional and (value is None or (isinstance(value, str) and
                                       value.strip().lower() in ("none", "null", ""))):
      return None
    if base is bool:
      return _parse_bool(value)
    if base is int:
      if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an int")
      return int(value)
    if base is float:
      if isinstance(value, bool):
        raise ValueError("expected a float")
      return float(value)
    if base is str:
      if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("expected a string")
      return str(value)
    if typing.get_origin(base) is tuple:
      items = value.split(",") if isinstance(value, str) else list(value)
      n = len(typing.get_args(base))
      if len(items) != n:
        raise ValueError(f"expected {n} comma-separated numbers")
      return tuple(float(x) for x in items)
  except (TypeError, ValueError) as e:
    raise errors.UserError(f"{where}: {key}={value!r}: {e} ({_type_name(tp)})") from None
  raise errors.UserError(f"{where}: {key}: unsupported type {tp}")


def _type_name(tp) -> str:
  return str(tp).replace("typing.", "")


def load_config_file(path: str) -> dict:
  """Reads a YAML or JSON mapping of RunConfig keys."""
  if not os.path.isfile(path):
    raise errors.UserError(f"--config {path}: no such file")
  with open(path) as f:
    text = f.read()
  try:
    if path.endswith(".json"):
      d = json.loads(text)
    else:
      d = yaml.safe_load(text)
  except Exception as e:  # noqa: BLE001 - any parse error is the user's file
    msg = " ".join(str(e).split())
    raise errors.UserError(f"--config {path}: cannot parse ({msg})") from None
  if d is None:
    d = {}
  if not isinstance(d, dict):
    raise errors.UserError(f"--config {path}: expected a mapping of config keys, got "
                           f"{type(d).__name__}")
  return {k: coerce(k, v, where=path) for k, v in d.items()}


def parse_sets(items: Sequence[str]) -> dict:
  out = {}
  for item in items or ():
    if "=" not in item:
      raise errors.UserError(f"--set {item!r}: expected key=value")
    k, v = item.split("=", 1)
    out[k.strip()] = coerce(k.strip(), v, where=f"--set {item}")
  return out


def _with_pca(spec, value: str):
  """`spec` with the `pca` key applied: raw (every band of every modality), N (the first
  modality, HSI, reduced to N whitened-PCA components) or raw+N (its bands, then N components)."""
  keep, _, count = value.strip().rpartition("+") if "+" in value else ("", "", value.strip())
  if count == "raw" and not keep:
    return dataclasses.replace(spec, pca=tuple(None for _ in spec.pca), pca_keeps_bands=False)
  if keep in ("", "raw") and count.isdigit() and int(count) >= 1:
    n = int(count)
    if n > spec.bands[0]:
      raise errors.UserError(f"config pca={value}: {n} PCA components from the "
                             f"{spec.modalities[0]}'s {spec.bands[0]} bands; expected at most "
                             f"{spec.bands[0]}")
    return dataclasses.replace(spec, pca=(n,) + tuple(None for _ in spec.pca[1:]),
                               pca_keeps_bands=keep == "raw")
  raise errors.UserError(f"config pca={value!r}: expected raw (every band), N (the first "
                         f"modality's N PCA components) or raw+N (its bands, then N components)")


def resolve(overrides: dict, method_defaults: Callable[[str, str], dict] | None = None
            ) -> tuple[RunConfig, Any]:
  """Fills every None key from the dataset spec and validates. Returns (config, spec).

  method_defaults(method, dataset) -> the keys a comparison method sets before `overrides`
  (methods.defaults); a key of `overrides` wins.
  """
  d = dict(overrides)
  method = d.get("method", "dpmamba")
  if method not in METHODS:
    raise errors.UserError(f"method {method!r}: unknown; expected one of {', '.join(METHODS)}")
  if method_defaults is not None:
    name = d.get("dataset") if not d.get("dataset_file") else None
    d = {**method_defaults(method, name or ""), **d}
  if d.get("protocol") == "reference":
    for k, v in REFERENCE_KEYS.items():
      if d.get(k, v) != v:
        raise errors.UserError(f"config {k}={d[k]!r} contradicts protocol=reference (which "
                               f"sets {k}={v!r}); drop one of them")
      d[k] = v
  if d.get("dataset_file"):
    d["dataset_file"] = os.path.abspath(os.path.expanduser(d["dataset_file"]))
    if d.get("data_dir"):
      raise errors.UserError(f"data_dir={d['data_dir']!r} with dataset_file="
                             f"{d['dataset_file']!r}: the dataset file names its files; drop "
                             "data_dir (or edit the paths in the file)")
    spec = dataset_file_lib.load_dataset_file(d["dataset_file"])
  else:
    spec = datasets.get_spec(d.get("dataset", "synthetic"))
  d["dataset"] = spec.name
  if d.get("modalities"):  # single-modality nets etc.: the spec restricted to these
    mods = subsets.parse_modalities(d["modalities"], spec)
    d["modalities"] = None if mods == spec.modalities else ",".join(mods)
    spec = subsets.restrict_spec(spec, mods)
  if d.get("pca") is not None:
    d["pca"] = str(d["pca"])
    spec = _with_pca(spec, d["pca"])
  fill = dict(train_per_class=spec.train_per_class, batch_size=spec.batch_size,
              lr=spec.lr, weight_decay=spec.weight_decay, grad_clip=spec.grad_clip, eps=spec.eps,
              betas_pretrain=tuple(spec.betas_pretrain), betas_distill=tuple(spec.betas_distill),
              patch_size=spec.patch_size, epochs_pretrain=spec.epochs,
              epochs_distill=spec.epochs)
  for k, v in fill.items():
    if d.get(k) is None:
      d[k] = v
  if d.get("warmup_epochs") is None:
    # Keep the paper's warmup fraction (30 of 500) when the epoch count is changed.
    e = min(d["epochs_pretrain"], d["epochs_distill"])
    d["warmup_epochs"] = (spec.warmup_epochs if e == spec.epochs
                          else int(round(spec.warmup_epochs * e / spec.epochs)))
  for k in ("data_dir", "split_file", "teacher_ckpt", "clip_weights", "dataset_file"):
    if d.get(k):  # absolute, so that `evaluate` and resumes work from any directory
      d[k] = os.path.abspath(os.path.expanduser(d[k]))
  if d.get("workdir") is None:
    d["workdir"] = os.path.join("runs", spec.name, f"seed{d.get('seed', 0)}")
  cfg = RunConfig(**d)
  _validate(cfg, spec)
  return cfg, spec


def _validate(cfg: RunConfig, spec) -> None:
  def bad(key, expected):
    raise errors.UserError(f"config {key}={getattr(cfg, key)!r}: expected {expected}")
  if cfg.method not in METHODS:
    bad("method", " | ".join(METHODS))
  if cfg.method == "dpmamba" and cfg.stage not in STAGES:
    bad("stage", " | ".join(STAGES))
  if cfg.optimizer not in ("adamw", "adam", "sgd"):
    bad("optimizer", "adamw | adam | sgd")
  if not (math.isfinite(cfg.momentum) and 0.0 <= cfg.momentum < 1.0):
    bad("momentum", "a float in [0, 1)")
  if cfg.lr_schedule not in ("constant", "step", "cosine"):
    bad("lr_schedule", "constant | step | cosine")
  if not (math.isfinite(cfg.lr_min) and cfg.lr_min >= 0):
    bad("lr_min", "a finite float >= 0")
  for k in ("lr_step_epochs", "lr_cosine_extra"):
    if getattr(cfg, k) < 0:
      bad(k, "an int >= 0")
  if not (math.isfinite(cfg.lr_gamma) and 0.0 < cfg.lr_gamma <= 1.0):
    bad("lr_gamma", "a float in (0, 1]")
  if cfg.protocol not in PROTOCOLS:
    bad("protocol", " | ".join(PROTOCOLS))
  if cfg.normalize not in NORMALIZE:
    bad("normalize", " | ".join(NORMALIZE))
  if cfg.pca_fit not in ("all", "train"):
    bad("pca_fit", "all | train")
  if cfg.distill not in ("tbd", "kl"):
    bad("distill", "tbd | kl")
  if cfg.model not in MODEL_PRESETS:
    bad("model", " | ".join(MODEL_PRESETS))
  for k, allowed in (("backbone", ("mamba", "vit")), ("fusion", ("af", "add")),
                     ("mixer", ("mism", "dwconv"))):
    if getattr(cfg, k) not in allowed:
      bad(k, " | ".join(allowed))
  for k in ("epochs_pretrain", "epochs_distill", "warmup_epochs"):
    if getattr(cfg, k) < 0:
      bad(k, "an int >= 0")
  if cfg.maps not in (True, False, "all") or not isinstance(cfg.maps, (bool, str)):
    bad("maps", MAPS_EXPECTED)
  if cfg.eval_subsample < 0:
    bad("eval_subsample", "an int >= 0 (0 = every test pixel)")
  for k in ("batch_size", "train_per_class", "patch_size", "log_every", "ckpt_every",
            "eval_batch"):
    if getattr(cfg, k) < 1:
      bad(k, "an int >= 1")
  if not 0 <= cfg.seed <= MAX_SEED:
    bad("seed", f"an int from 0 to {MAX_SEED} (stage seeds are offsets of it)")
  if cfg.eval_batch > MAX_EVAL_BATCH:
    bad("eval_batch", f"at most {MAX_EVAL_BATCH} (one batch's patches and activations are held "
                      "in memory at once)")
  if cfg.patch_size % 2 == 0:
    bad("patch_size", "an odd int (a patch is centred on its pixel)")
  balanced = cfg.method == "dpmamba"  # the balanced sampler's k = B // C per class
  if balanced and cfg.batch_size % spec.num_classes:
    bad("batch_size", f"a multiple of the {spec.num_classes} classes")
  if not balanced and cfg.batch_size > spec.num_classes * cfg.train_per_class:
    bad("batch_size", f"at most classes x train_per_class = "
        f"{spec.num_classes * cfg.train_per_class}")
  if balanced and cfg.batch_size // spec.num_classes > cfg.train_per_class:
    bad("batch_size", f"at most classes x train_per_class = "
        f"{spec.num_classes * cfg.train_per_class}")
  for k, lowest, expected in (("lr", 0.0, "a finite float > 0"),
                              ("eps", 0.0, "a finite float > 0"),
                              ("grad_clip", 0.0 if cfg.method == "dpmamba" else None,
                               "a finite float > 0" if cfg.method == "dpmamba"
                               else "a finite float >= 0 (0 = no clipping)"),
                              ("weight_decay", None, "a finite float >= 0")):
    v = getattr(cfg, k)
    if not math.isfinite(v) or (v <= lowest if lowest is not None else v < 0):
      bad(k, expected)
  for k in ("betas_pretrain", "betas_distill"):
    if not all(0.0 <= b < 1.0 for b in getattr(cfg, k)):  # NaN fails both comparisons
      bad(k, "two floats in [0, 1)")
  if cfg.af_dropout is not None and not 0.0 <= cfg.af_dropout < 1.0:
    bad("af_dropout", "a float in [0, 1)")
  try:  # the model's own checks (hidden, depth, heads, d_state, ...), now rather than after loading
    model_config(cfg, spec, out_dim=1)
  except errors.UserError as e:
    raise errors.UserError(str(e).replace("ModelConfig.", "config ", 1)) from None
  for k in ("synthetic_height", "synthetic_width"):
    if getattr(cfg, k) is not None and spec.synthetic is None:
      bad(k, "unset unless --dataset synthetic")
    if getattr(cfg, k) is not None and getattr(cfg, k) < 1:
      bad(k, "an int >= 1")


def steps_per_epoch(cfg: RunConfig, num_classes: int) -> int:
  """len(train) // B with k = B // C per class (spec §1.6)."""
  k = cfg.batch_size // num_classes
  return max(1, cfg.train_per_class // k)


def model_config(cfg: RunConfig, spec, out_dim: int, *, prompts: bool = False):
  """The ModelConfig of this run (bands after PCA, patch size, text width as out_dim)."""
  return model_config_for(cfg, spec.model_bands, out_dim, prompts=prompts)


def model_config_for(cfg: RunConfig, bands: Sequence[int], out_dim: int, *,
                     prompts: bool = False):
  """The DPMamba ModelConfig of run `cfg` for inputs of `bands` (after PCA) per modality."""
  if cfg.model == "tiny":
    base = network.ModelConfig.tiny()
    kw = dict(hidden=base.hidden, depth=base.depth, d_state=base.d_state,
              heads_per_direction=base.heads_per_direction, af_dropout=base.af_dropout,
              scan_impl=base.scan_impl)
  else:
    kw = {}
  for k in ("hidden", "depth", "d_state", "heads_per_direction", "af_dropout", "scan_impl",
            "backbone", "fusion", "mixer"):
    if getattr(cfg, k) is not None:
      kw[k] = getattr(cfg, k)
  return network.ModelConfig(bands=tuple(bands), patch_size=cfg.patch_size,
                               out_dim=int(out_dim), prompts=prompts, **kw)


def read_saved_config(path: str, recovery: str) -> dict:
  """A workdir's config.json as a dict; a damaged file is a one-line UserError ending in
  `recovery` (what the caller's user can do about it)."""
  def damaged(why):
    return errors.UserError(f"{path}: damaged ({why}); {recovery}")
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise damaged(f"not valid JSON: {' '.join(str(e).split())}") from None
  if not isinstance(saved, dict):
    raise damaged(f"a JSON {type(saved).__name__}, expected an object")
  return saved


def describe(cfg: RunConfig) -> str:
  """The resolved config, one `key: value` per line."""
  width = max(len(k) for k in field_names())
  return "\n".join(f"  {k:<{width}} : {v}" for k, v in cfg.to_dict().items())
