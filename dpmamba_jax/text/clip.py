"""The CLIP text tower in float64 numpy, its weight formats and the seeded random tower.

The maths and parameter names are those of transformers' `FlaxCLIPTextModelWithProjection`
(which transformers 5 no longer ships). Weights come from a local file only: a Hugging Face
folder (`flax_model.msgpack` or `model.safetensors`, plus `config.json`) or an OpenAI-format
text-tower state dict (`.npz`, `.safetensors`, or `.pth`/`.pt` through torch with
`weights_only=True`), e.g. the authors' `text_encoder.pth`.
"""
from __future__ import annotations

import os
import re
import struct
import tokenize
import zipfile
import zlib
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np
from flax import serialization
from safetensors import SafetensorError
from safetensors.numpy import load_file

from dpmamba_jax import fileio
from dpmamba_jax.errors import UserError
from dpmamba_jax.text import tokenizer
from dpmamba_jax.text import transformer

EXPECTED_WEIGHTS = ("expected an OpenAI-format CLIP text state dict (.npz, .safetensors, .pth/.pt) "
                    "or a Hugging Face CLIP folder (flax_model.msgpack, model.safetensors or "
                    "pytorch_model.bin, with config.json)")
WEIGHT_FILES = ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin")
# What numpy's .npz reader raises on a damaged or foreign file (found by damaging files;
# NotImplementedError is zipfile's "zip file version 14.5").
_NPZ_ERRORS = (OSError, EOFError, ValueError, SyntaxError, tokenize.TokenError, zlib.error,
               zipfile.BadZipFile, struct.error, NotImplementedError)


def _unreadable(path: str, what: str, e: BaseException) -> UserError:
  msg = " ".join(str(e).split())
  if len(msg) > 160:
    msg = msg[:157] + "..."
  name = type(e).__name__ if type(e).__name__ != "error" else f"{type(e).__module__}.error"
  return UserError(f"{path}: cannot be read as {what} ({name}{': ' + msg if msg else ''}); "
                   f"{EXPECTED_WEIGHTS}")


def _real_array(value, source: str, name: str) -> np.ndarray:
  """A weight as a float32 array; UserError unless it holds real numbers."""
  arr = np.asarray(value)
  if arr.dtype.name == "bfloat16":  # ml_dtypes (as safetensors gives it once jax is imported)
    return arr.astype(np.float32)
  if arr.dtype.kind not in "iuf":
    raise UserError(f"{source}: {name} has dtype {arr.dtype}; expected a tensor of real numbers "
                    f"(float)")
  return arr.astype(np.float32)

def clip_text_config(**overrides):
  """The ViT-B/32 (also ViT-B/16, RN101) CLIP text-tower config, built locally (no hub)."""
  from transformers import CLIPTextConfig  # heavy (seconds): only where a config is built
  kw = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
            num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
            hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
            bos_token_id=tokenizer.SOT, eos_token_id=tokenizer.EOT, pad_token_id=0)
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
  heads = int(config.num_attention_heads)
  if heads < 1 or config.hidden_size % heads:
    raise UserError(f"{source}: num_attention_heads {heads} does not divide hidden_size "
                    f"{config.hidden_size}; expected a divisor")
  out = {}
  for k, shape in expected.items():
    arr = _real_array(flat[k], source, "/".join(k))
    if arr.shape != shape:
      raise UserError(f"{source}: {'/'.join(k)} has shape {arr.shape}, expected {shape}")
    if not np.isfinite(arr).all():
      raise UserError(f"{source}: {'/'.join(k)} holds NaN/Inf values; expected finite weights")
    out[k] = arr
  return _unflat(out)


def _openai_prefix(sd: Mapping[str, Any], source: str) -> str:
  hits = [k for k in sd if k.endswith("token_embedding.weight") and "visual" not in k]
  if len(hits) != 1:
    keys = list(sd)
    shown = ", ".join(map(str, keys[:5])) + (", ..." if len(keys) > 5 else "") or "none"
    raise UserError(f"{source}: not an OpenAI CLIP text state dict (expected one "
                    f"'token_embedding.weight' key, found {len(hits)}; keys: {shown})")
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

  def get(name, ndim=None):
    key = p + name
    if key not in state_dict:
      raise UserError(f"{source}: missing key {key!r}; expected a complete OpenAI-format CLIP "
                      f"text state dict")
    arr = _real_array(state_dict[key], source, key)
    if ndim is not None and arr.ndim != ndim:
      raise UserError(f"{source}: {key} has shape {arr.shape}; expected {ndim} dimensions")
    return arr

  tok = get("token_embedding.weight", 2)  # (V, W)
  vocab, width = tok.shape
  layer_ids = sorted({int(m.group(1)) for k in state_dict
                      if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))})
  if not layer_ids or layer_ids != list(range(len(layer_ids))):
    raise UserError(f"{source}: no contiguous transformer.resblocks.<i> keys under prefix {p!r}")
  proj = get("text_projection", 2)  # (W, E)
  pos = get("positional_embedding", 2)  # (L, W)
  heads = num_heads or max(1, width // 64)
  fc = get("transformer.resblocks.0.mlp.c_fc.weight", 2)  # (4W, W)
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
    for name, arr, want in (("in_proj_weight", w_in, (3 * width, width)),
                            ("in_proj_bias", b_in, (3 * width,))):
      if arr.shape != want:
        raise UserError(f"{source}: {p}{b}attn.{name} has shape {arr.shape}, expected {want}")
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


def hf_torch_to_flax(state_dict: Mapping[str, Any], source: str = "state dict") -> dict:
  """Hugging Face PyTorch-named CLIP(text) weights -> Flax param tree (text parts only)."""
  flat = {}
  for name, value in state_dict.items():
    parts = name.split(".")
    if parts[0] not in ("text_model", "text_projection") or parts[-1] == "position_ids":
      continue  # vision tower, logit_scale, buffers
    arr = _real_array(value, source, name)
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


def clip_weights_file(path: str) -> str:
  """The file whose sha256 identifies the CLIP weights at `path` (a file or an HF folder)."""
  if os.path.isdir(path):
    for name in WEIGHT_FILES:
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise UserError(f"{path}: folder holds no CLIP weights (none of {', '.join(WEIGHT_FILES)}); "
                    f"{EXPECTED_WEIGHTS}")
  if not os.path.isfile(path):
    raise UserError(f"{path}: CLIP weights not found; {EXPECTED_WEIGHTS}")
  if not path.lower().endswith((".npz", ".safetensors", ".pth", ".pt", ".bin")):
    raise UserError(f"{path}: unsupported CLIP weights file type; {EXPECTED_WEIGHTS}")
  return path


def _torch_load(path: str) -> dict:
  return fileio.read_torch_state_dict(path, skip_non_tensors=True)


def _load_safetensors(path: str) -> dict:
  try:
    return load_file(path)
  except SafetensorError as e:  # a damaged / foreign file ("header too large", ...)
    raise _unreadable(path, ".safetensors", e) from e
  except TypeError as e:  # a dtype numpy lacks, e.g. "data type 'bfloat16' not understood"
    raise UserError(f"{path}: holds tensors numpy cannot read ({' '.join(str(e).split())}); "
                    f"expected float32 / float16 weights (convert bfloat16 to float32)") from e
  except OSError as e:
    raise _unreadable(path, ".safetensors", e) from e


def _load_npz(path: str) -> dict:
  with open(path, "rb") as f:
    head = f.read(4)
  if head not in (b"PK\x03\x04", b"PK\x05\x06"):
    what = "is empty (0 bytes)" if not head else "is not a .npz archive (not a zip file)"
    raise UserError(f"{path}: {what}; {EXPECTED_WEIGHTS}")
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except _NPZ_ERRORS as e:
    raise _unreadable(path, ".npz", e) from e


def _load_msgpack(path: str) -> Mapping:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    tree = serialization.msgpack_restore(raw)
  except (ValueError, TypeError, msgpack.UnpackException) as e:  # UnicodeDecodeError, ExtraData, ...
    raise _unreadable(path, "Flax msgpack", e) from e
  if not isinstance(tree, Mapping):
    raise UserError(f"{path}: holds a {type(tree).__name__}, not a parameter tree; "
                    f"{EXPECTED_WEIGHTS}")
  tree = tree.get("params", tree)
  if not isinstance(tree, Mapping):
    raise UserError(f"{path}: 'params' is a {type(tree).__name__}, not a parameter tree; "
                    f"{EXPECTED_WEIGHTS}")
  return tree


def _hf_config(path: str):
  from transformers import CLIPTextConfig  # heavy (seconds): only for HF folders
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    return CLIPTextConfig.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, TypeError) as e:  # not JSON, JSON of another shape
    msg = " ".join(str(e).split())[:160]
    raise UserError(f"{os.path.join(path, 'config.json')}: not a readable CLIP config "
                    f"({type(e).__name__}: {msg}); expected the config.json of a Hugging Face "
                    f"CLIP (text) model") from e


def load_clip_text_weights(path: str, *, num_heads: int | None = None):
  """Loads CLIP text-tower weights from a local file or Hugging Face folder.

  Returns:
    (params, CLIPTextConfig, weights sha256).
  """
  wfile = clip_weights_file(path)
  digest = fileio.sha256_file(wfile)
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
      config = _hf_config(path)
    else:
      config = clip_text_config()
    if wfile.endswith(".msgpack"):
      tree = _load_msgpack(wfile)
      params = {k: tree[k] for k in ("text_model", "text_projection") if k in tree}
    elif wfile.endswith(".safetensors"):
      sd = _load_safetensors(wfile)
      if any(k.endswith((".kernel", ".scale", ".embedding")) for k in sd):  # saved by Flax
        tree = _unflat({tuple(k.split(".")): v for k, v in sd.items()})
        params = {k: tree[k] for k in ("text_model", "text_projection") if k in tree}
      else:
        params = hf_torch_to_flax(sd, wfile)
    else:
      params = hf_torch_to_flax(_torch_load(wfile), wfile)
    return _check_params(params, config, path), config, digest
  lower = path.lower()
  if lower.endswith(".npz"):
    sd = _load_npz(path)
  elif lower.endswith(".safetensors"):
    sd = _load_safetensors(path)
  else:  # .pth / .pt / .bin (clip_weights_file refused the other types)
    sd = _torch_load(path)
  params, config = openai_to_flax(sd, num_heads=num_heads, source=path)
  return params, config, digest


def _clip_text_apply(params: Mapping, ids: np.ndarray, *, num_heads: int, eps: float,
                     act: str) -> np.ndarray:
  """The CLIP text tower: (N, L) ids -> (N, E) EOT-pooled, projected features (float64).

  Pre-LN causal transformer: x += attn(LN1(x)); x += fc2(act(fc1(LN2(x)))); final LN; the row at
  argmax(ids) (the EOT token) @ text_projection. Same maths as transformers'
  FlaxCLIPTextModelWithProjection (tests compare them where that class exists).
  """
  tm = params["text_model"]
  n, length = ids.shape
  activation = transformer.activation(act, "CLIP text config")

  def norm(x, p):
    return transformer.layer_norm(x, p["scale"], p["bias"], eps)

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
    x = x + dense(transformer.attention(q, k, v, causal), a["out_proj"])
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
    words = tokenizer.split_words(tokenizer.clean_text(text))[:context_length - 2]
    ids = [zlib.crc32(w.encode("utf-8")) % (tokenizer.SOT - 1) + 1 for w in words]
    ids = [tokenizer.SOT] + ids + [tokenizer.EOT]
    out[row, :len(ids)] = ids
  return out
