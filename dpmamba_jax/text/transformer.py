"""Transformer maths shared by the CLIP and MiniLM text towers, in float64 numpy."""
from __future__ import annotations

import numpy as np

from dpmamba_jax.errors import UserError

# Both towers in float64 numpy: a few class texts, once per run (then cached), so no compile,
# and the features are the same on every backend. Weights stay float32; numpy promotes.

def layer_norm(x: np.ndarray, scale, bias, eps: float) -> np.ndarray:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """Softmax attention. q, k, v: (N, L, H, Dh); keep: bool, broadcasts to (N, H, Lq, Lk).

  Returns (N, L, H * Dh)."""
  logits = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(keep, logits, -1e30)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  n, length = q.shape[:2]
  return np.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, length, -1)


def activation(name: str, source: str):
  """The named activation function; UserError for one the towers do not use."""
  from scipy.special import erf, expit  # slow to import: only when a tower runs
  acts = {"quick_gelu": lambda v: v * expit(1.702 * v),
          "gelu": lambda v: 0.5 * v * (1.0 + erf(v / np.sqrt(2.0)))}
  if name not in acts:
    raise UserError(f"{source}: hidden_act {name!r} not supported; expected one of {sorted(acts)}")
  return acts[name]
