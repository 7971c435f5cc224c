"""Modality masks: training-time sampling (spec §3.2) and evaluation scenarios (spec §3.3).

A mask row has one entry per modality, 1 = present, 0 = missing. The all-missing row is never
produced.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def candidate_masks(num_modalities: int) -> np.ndarray:
  """Every modality mask with at least one modality present, in the spec §3.2 order.

  Ordered by the number of missing modalities, then lexicographically by the positions of
  the missing ones: M=2 -> [1,1], [0,1], [1,0]; M=3 -> [1,1,1], [0,1,1], [1,0,1], [1,1,0],
  [0,0,1], [0,1,0], [1,0,0].

  Returns:
    (2**M - 1, M) float32 array.
  """
  m = int(num_modalities)
  if m < 1:
    raise ValueError(f"num_modalities must be >= 1, got {m}")
  rows = []
  for n_missing in range(m):  # never m: all-missing is excluded
    for missing in itertools.combinations(range(m), n_missing):
      row = np.ones((m,), np.float32)
      row[list(missing)] = 0.0
      rows.append(row)
  return np.stack(rows)


def tiled_masks(batch_size: int, num_modalities: int) -> np.ndarray:
  """The unshuffled (B, M) mask block: each candidate B // n times, the first B % n once more."""
  cands = candidate_masks(num_modalities)  # (n, M)
  n = cands.shape[0]
  reps = np.full((n,), batch_size // n, np.int64)
  reps[: batch_size % n] += 1
  return np.repeat(cands, reps, axis=0)  # (B, M)


def sample_masks(key: jax.Array, batch_size: int, num_modalities: int) -> jax.Array:
  """Training masks for one batch: stratified over all non-empty subsets, then shuffled.

  Jit-able: `batch_size` and `num_modalities` are Python ints (static); the shuffle uses
  `jax.random.permutation`, so masks are independent of the labels.

  Returns:
    (B, M) float32.
  """
  block = jnp.asarray(tiled_masks(batch_size, num_modalities))  # (B, M)
  return jax.random.permutation(key, block, axis=0, independent=False)


def random_subsets(key: jax.Array, batch_size: int, num_modalities: int) -> jax.Array:
  """Per-sample keep masks, each drawn independently and uniformly from the 2**M - 1 non-empty
  modality subsets (the comparison methods' `modality_drop` with p = [0, 0]; M = 2: [1,0],
  [0,1], [1,1] with probability 1/3 each). Jit-able. Returns (B, M) float32."""
  code = jax.random.randint(key, (batch_size,), 1, 2 ** num_modalities)  # (B,) in [1, 2^M)
  bits = (code[:, None] >> jnp.arange(num_modalities)[None, :]) & 1
  return bits.astype(jnp.float32)


def scenario_name(modalities: Sequence[str], mask_row: np.ndarray | None) -> str:
  """"complete" or "without:" + "+".join(missing names), e.g. "without:HSI+SAR"."""
  if mask_row is None or bool(np.all(np.asarray(mask_row) > 0)):
    return "complete"
  missing = [name for name, keep in zip(modalities, np.asarray(mask_row)) if keep <= 0]
  return "without:" + "+".join(missing)


def eval_scenarios(modalities: Sequence[str]) -> list[tuple[str, np.ndarray | None]]:
  """Evaluation scenarios: complete (mask None), then every proper non-empty subset missing.

  M=2 ("HSI", "LiDAR") -> [("complete", None), ("without:HSI", [0,1]), ("without:LiDAR", [1,0])].

  Returns:
    list of (name, mask_row) with mask_row an (M,) float32 array, or None for complete.
  """
  cands = candidate_masks(len(modalities))
  out: list[tuple[str, np.ndarray | None]] = [("complete", None)]
  for row in cands[1:]:
    out.append((scenario_name(modalities, row), row))
  return out


def scenario_file_stem(name: str) -> str:
  """A file-name friendly form of a scenario name: "without:HSI+SAR" -> "without-HSI+SAR"."""
  return name.replace(":", "-").replace("/", "_").replace(" ", "_")
