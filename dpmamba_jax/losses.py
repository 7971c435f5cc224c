"""DPMamba losses (reference-spec §5): L_CA, L_ICRC, L_FC, L_TBD, the KL ablation, prediction.

All functions are pure and jit-able. Shapes: B batch, D feature size, C classes, k = B // C samples
per class. The group losses need a class-balanced batch (exactly k samples of every class, any
order); `group_by_class` regroups it into k groups of one sample per class (spec §5.2).

The logit scale is the constant 12.5 (= 1 / 0.08): the authors' criterion holds it as a parameter but
never optimises it (spec §7.1 item 7). Every loss takes `scale` as a keyword for parity tests only.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

LOGIT_SCALE = 12.5
_NORM_EPS = 1e-8      # row norms are clamped here before dividing
_PEARSON_EPS = 1e-8   # added to the Pearson denominator


def _l2_normalize(x: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, _NORM_EPS)


def cosine_logits(v: jax.Array, z: jax.Array, scale: float = LOGIT_SCALE) -> jax.Array:
  """Scaled cosine similarities `scale * norm(v) @ norm(z).T`.

  Args:
    v: (..., n, D) visual features (any leading batch axes).
    z: (C, D) text features.
    scale: the logit scale s.

  Returns:
    (..., n, C) float32 logits.
  """
  v = _l2_normalize(jnp.asarray(v, jnp.float32))
  z = _l2_normalize(jnp.asarray(z, jnp.float32))
  return scale * jnp.einsum("...nd,cd->...nc", v, z, precision=jax.lax.Precision.HIGHEST)


def group_by_class(v: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Regroups a class-balanced batch into k groups of one sample per class (spec §5.2).

  Group n's row c is the n-th sample (in batch order) of class c. Requires exactly
  k = B // num_classes samples of every class; this is checked only for concrete numpy labels
  (under jit it is the sampler's contract).

  Args:
    v: (B, D) features.
    labels: (B,) int class labels in [0, num_classes).
    num_classes: C (static).

  Returns:
    (k, C, D) grouped features.
  """
  b, d = v.shape
  if b % num_classes:
    raise ValueError(f"batch size {b} is not a multiple of num_classes {num_classes}")
  k = b // num_classes
  if isinstance(labels, np.ndarray):
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
    if counts.shape[0] != num_classes or np.any(counts != k):
      raise ValueError(f"group_by_class needs {k} samples per class, got counts {counts.tolist()}")
  order = jnp.argsort(jnp.asarray(labels), stable=True)  # (B,) class-sorted, batch order within class
  grouped = v[order].reshape(num_classes, k, d)  # (C, k, D)
  return grouped.transpose(1, 0, 2)  # (k, C, D)


def _cross_entropy_diag(logits: jax.Array) -> jax.Array:
  """Mean over rows of CE(logits[..., i, :], target i). logits (..., C, C) -> (...)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.diagonal(logp, axis1=-2, axis2=-1), axis=-1)


def clip_loss(v: jax.Array, labels: jax.Array, z: jax.Array, *,
              scale: float = LOGIT_SCALE) -> jax.Array:
  """L_CA: the symmetric CLIP loss per group, averaged over the k groups (spec §5.1, §5.3).

  Args:
    v: (B, D) visual features (class-balanced batch).
    labels: (B,) int labels.
    z: (C, D) text features.

  Returns:
    () float32.
  """
  groups = group_by_class(v, labels, z.shape[0])  # (k, C, D)
  logits = cosine_logits(groups, z, scale)  # (k, C, C): rows samples, columns texts
  per_group = 0.5 * (_cross_entropy_diag(logits) + _cross_entropy_diag(jnp.swapaxes(logits, -1, -2)))
  return jnp.mean(per_group)


def _pearson_rows(x: jax.Array, y: jax.Array) -> jax.Array:
  """Pearson correlation of matching rows. x, y (..., n, m) -> (..., n)."""
  xc = x - jnp.mean(x, axis=-1, keepdims=True)
  yc = y - jnp.mean(y, axis=-1, keepdims=True)
  num = jnp.sum(xc * yc, axis=-1)
  den = jnp.linalg.norm(xc, axis=-1) * jnp.linalg.norm(yc, axis=-1) + _PEARSON_EPS
  return num / den


def _dist(a: jax.Array, b: jax.Array) -> jax.Array:
  """1 - mean_i pearson(softmax(a[i]), softmax(b[i])). a, b (..., n, m) -> (...)."""
  pa = jax.nn.softmax(a, axis=-1)
  pb = jax.nn.softmax(b, axis=-1)
  return 1.0 - jnp.mean(_pearson_rows(pa, pb), axis=-1)


def relation_loss(v_s: jax.Array, v_t: jax.Array, labels: jax.Array, z: jax.Array, *,
                  scale: float = LOGIT_SCALE) -> jax.Array:
  """L_ICRC: DIST-style relation loss on both orientations of the group logits (spec §5.4).

  Args:
    v_s: (B, D) student features.
    v_t: (B, D) teacher features (same samples).
    labels: (B,) int labels.
    z: (C, D) text features.

  Returns:
    () float32: mean over groups of DIST(S_s, S_t) + DIST(S_s.T, S_t.T).
  """
  c = z.shape[0]
  s_s = cosine_logits(group_by_class(v_s, labels, c), z, scale)  # (k, C, C)
  s_t = cosine_logits(group_by_class(v_t, labels, c), z, scale)  # (k, C, C)
  inter = _dist(s_s, s_t)  # (k,) over texts, per sample
  intra = _dist(jnp.swapaxes(s_s, -1, -2), jnp.swapaxes(s_t, -1, -2))  # (k,) over samples, per text
  return jnp.mean(inter + intra)


def feature_loss(v_s: jax.Array, v_t: jax.Array) -> jax.Array:
  """L_FC: mean over all B x D entries of (v_t - v_s)^2. v_s, v_t (B, D) -> ()."""
  diff = jnp.asarray(v_t, jnp.float32) - jnp.asarray(v_s, jnp.float32)
  return jnp.mean(jnp.square(diff))


def kl_distill_loss(v_s: jax.Array, v_t: jax.Array, z: jax.Array, temperature: float = 4.0, *,
                    scale: float = LOGIT_SCALE) -> jax.Array:
  """Variant-1 ablation: the authors' (unused) DistillKL on the whole-batch logits.

  With y = cosine_logits(v, z) over the whole batch (B, C) and p_t = softmax(y_t / T):
  `sum_{B x C} p_t (log p_t - log_softmax(y_s / T)) * T^2 / B`.

  Args:
    v_s: (B, D) student features.
    v_t: (B, D) teacher features.
    z: (C, D) text features.
    temperature: T.

  Returns:
    () float32.
  """
  y_s = cosine_logits(v_s, z, scale) / temperature  # (B, C)
  y_t = cosine_logits(v_t, z, scale) / temperature  # (B, C)
  log_p_t = jax.nn.log_softmax(y_t, axis=-1)
  log_p_s = jax.nn.log_softmax(y_s, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s))
  return kl * temperature**2 / v_s.shape[0]


def teacher_loss(v: jax.Array, labels: jax.Array, z: jax.Array, *,
                 scale: float = LOGIT_SCALE) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pre-training loss L_pre = L_CA (spec §5.3).

  Args:
    v: (B, D) teacher features. labels: (B,). z: (C, D).

  Returns:
    (loss (), {"clip": (), "total": ()}).
  """
  loss = clip_loss(v, labels, z, scale=scale)
  return loss, {"clip": loss, "total": loss}


def student_loss(v_s: jax.Array, v_t: jax.Array, labels: jax.Array, z: jax.Array,
                 distill: Literal["tbd", "kl"] = "tbd", *,
                 scale: float = LOGIT_SCALE) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Student loss L = L_CA + L_TBD (L_TBD = L_FC + L_ICRC), or L_CA + KL for the ablation.

  The teacher features are treated as constants (stop_gradient).

  Args:
    v_s: (B, D) student features. v_t: (B, D) frozen teacher features. labels: (B,). z: (C, D).
    distill: "tbd" (the method) or "kl" (Variant 1, DistillKL with T = 4).

  Returns:
    (loss (), dict). "tbd": keys clip, relation, feature, tbd, total. "kl": keys clip, kl, total.
  """
  v_t = jax.lax.stop_gradient(v_t)
  clip = clip_loss(v_s, labels, z, scale=scale)
  if distill == "tbd":
    rel = relation_loss(v_s, v_t, labels, z, scale=scale)
    feat = feature_loss(v_s, v_t)
    tbd = rel + feat
    total = clip + tbd
    return total, {"clip": clip, "relation": rel, "feature": feat, "tbd": tbd, "total": total}
  if distill == "kl":
    kl = kl_distill_loss(v_s, v_t, z, 4.0, scale=scale)
    total = clip + kl
    return total, {"clip": clip, "kl": kl, "total": total}
  raise ValueError(f"distill must be 'tbd' or 'kl', got {distill!r}")


def predict(v: jax.Array, z: jax.Array) -> jax.Array:
  """Class prediction: argmax of the cosine logits. v (n, D), z (C, D) -> (n,) int32 (0-based)."""
  return jnp.argmax(cosine_logits(v, z), axis=-1).astype(jnp.int32)
