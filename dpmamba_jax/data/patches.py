"""Patches around pixels (padding, gather on host or device) and the class-balanced sampler."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpmamba_jax.errors import UserError


# --------------------------------------------------------------------------------------------------
# Patches


def check_patch_size(patch_size: int, shape: Sequence[int], where: str = "patch_size") -> None:
  """UserError unless 1 <= patch_size <= min(H, W)."""
  h, w = int(shape[0]), int(shape[1])
  if patch_size < 1 or patch_size > min(h, w):
    raise UserError(f"{where}: patch size {patch_size} does not fit the {h}x{w} scene; expected "
                    f"1..{min(h, w)}")


def pad_cubes(cubes: Sequence[np.ndarray], patch_size: int) -> list[np.ndarray]:
  """Pads every (H, W, C) cube by patch_size // 2 on each side with numpy mode 'symmetric'.

  'symmetric' repeats the edge pixel: [a b c] -> [b a | a b c | c b] (spec §1.3).
  """
  check_patch_size(patch_size, cubes[0].shape)
  p = patch_size // 2
  return [np.pad(c, ((p, p), (p, p), (0, 0)), mode="symmetric") for c in cubes]


def gather_patches(padded, flat_idx, width: int, patch_size: int):
  """Patches centred on flat pixel indices, from a cube padded by pad_cubes.

  Works on numpy arrays (one fancy index with (N, P, P) row / column grids) and on jax arrays,
  also inside jax.jit with traced indices (one (P, P, C) dynamic slice per pixel, vmapped: XLA
  copies whole contiguous rows, ~4x faster on CPU than the element-wise gather a fancy index
  becomes). No Python loop per pixel.

  Args:
    padded: (H + 2*(P//2), W + 2*(P//2), C) padded cube (numpy or jax).
    flat_idx: (N,) flat raster indices r * width + c into the unpadded scene.
    width: W of the unpadded scene.
    patch_size: P.

  Returns:
    (N, P, P, C): out[n, i, j] = padded[r_n + i, c_n + j], so the pixel sits at (P//2, P//2).
  """
  if isinstance(padded, jax.Array) or isinstance(flat_idx, jax.Array):
    padded, idx = jnp.asarray(padded), jnp.asarray(flat_idx)
    block = (patch_size, patch_size, padded.shape[2])
    return jax.vmap(lambda k: jax.lax.dynamic_slice(padded, (k // width, k % width, 0), block))(idx)
  idx = np.asarray(flat_idx)
  r, c = idx // width, idx % width  # (N,)
  off = np.arange(patch_size)
  rows = r[:, None, None] + off[None, :, None]  # (N, P, 1)
  cols = c[:, None, None] + off[None, None, :]  # (N, 1, P)
  return np.asarray(padded)[rows, cols]  # (N, P, P, C)


def gather_patch_rings(padded_plus1: jax.Array, flat_idx: jax.Array, width: int,
                       patch_size: int):
  """The pixels just outside each `gather_patches` patch, inside jax.jit.

  Args:
    padded_plus1: a pad_cubes cube with one more zero pixel on each side,
      (H + 2*(P//2) + 2, W + 2*(P//2) + 2, C).
    flat_idx: (N,) flat raster indices into the unpadded scene (as `gather_patches`).
    width, patch_size: W of the unpadded scene, P.

  Returns:
    (top, bottom, left, right): the rows above and below the patch, (N, P + 2, C) (columns
    -1 .. P of the patch), and the columns left and right of it, (N, P, C) (rows 0 .. P-1).
  """
  cube, idx, p = jnp.asarray(padded_plus1), jnp.asarray(flat_idx), patch_size
  c = cube.shape[2]

  def ring(k):
    r, col = k // width, k % width  # the patch's top-left in padded_plus1 is (r + 1, col + 1)
    top = jax.lax.dynamic_slice(cube, (r, col, 0), (1, p + 2, c))[0]
    bottom = jax.lax.dynamic_slice(cube, (r + p + 1, col, 0), (1, p + 2, c))[0]
    left = jax.lax.dynamic_slice(cube, (r + 1, col, 0), (p, 1, c))[:, 0]
    right = jax.lax.dynamic_slice(cube, (r + 1, col + p + 1, 0), (p, 1, c))[:, 0]
    return top, bottom, left, right

  return jax.vmap(ring)(idx)


# --------------------------------------------------------------------------------------------------
# Class-balanced sampler


class BalancedSampler:
  """Class-balanced, class-sorted training batches (spec §1.6).

  Every batch holds exactly k = batch_size // C samples of each class, class 0 first. Each class
  walks through an endless stream of seeded permutations of its samples (permutation j of class c
  comes from np.random.default_rng([seed, c, j])); epoch e takes the next steps * k entries. With
  equal class sizes n and n % k == 0 (40 and k = 20 in the paper), every training sample appears
  exactly once per epoch, reshuffled within its class each epoch. The batches of an epoch depend
  only on (seed, epoch), so training can resume at any epoch.
  """

  def __init__(self, train_labels, num_classes: int, batch_size: int, seed: int):
    """train_labels: (N,) 0-based classes of the training set."""
    labels = np.asarray(train_labels).astype(np.int64)
    self.num_classes = int(num_classes)
    self.k = int(batch_size) // self.num_classes
    if self.k < 1:
      raise UserError(f"batch size {batch_size} is smaller than the {num_classes} classes; "
                      f"expected a multiple of the class count")
    if seed < 0:
      raise UserError(f"sampler seed {seed}; expected a non-negative integer")
    self.seed = int(seed)
    self.members = [np.flatnonzero(labels == c) for c in range(self.num_classes)]
    empty = [c for c, m in enumerate(self.members) if len(m) == 0]
    if empty:
      raise UserError(f"training set has no sample of class {empty[0]}")
    self.steps = max(1, min(len(m) for m in self.members) // self.k)

  @property
  def batch_size(self) -> int:
    return self.k * self.num_classes

  def _stream(self, c: int, start: int, count: int) -> np.ndarray:
    n = len(self.members[c])
    j0, j1 = start // n, (start + count - 1) // n
    perms = [np.random.default_rng([self.seed, c, j]).permutation(n) for j in range(j0, j1 + 1)]
    s = start - j0 * n
    return np.concatenate(perms)[s:s + count]

  def epoch(self, epoch: int) -> np.ndarray:
    """(steps, k * C) indices into the training set, class-sorted within each batch."""
    per = self.steps * self.k
    cols = [self.members[c][self._stream(c, epoch * per, per)].reshape(self.steps, self.k)
            for c in range(self.num_classes)]
    return np.concatenate(cols, axis=1)  # (steps, C * k)


class ShuffleSampler:
  """Uniformly shuffled training batches (the comparison methods' DataLoader(shuffle=True)).

  Epoch e is the permutation np.random.default_rng([seed, e]).permutation(N) in ceil(N / B)
  batches of B; the last batch is filled up with the first samples of the same permutation, so
  every batch has one shape (one compile) and every sample is seen at least once per epoch.
  """

  def __init__(self, num_train: int, batch_size: int, seed: int):
    if num_train < 1:
      raise UserError("training set is empty")
    if batch_size < 1 or batch_size > num_train:
      raise UserError(f"batch size {batch_size}: expected 1 to the {num_train} training samples")
    if seed < 0:
      raise UserError(f"sampler seed {seed}; expected a non-negative integer")
    self.num_train, self.batch_size, self.seed = int(num_train), int(batch_size), int(seed)
    self.steps = -(-self.num_train // self.batch_size)

  def epoch(self, epoch: int) -> np.ndarray:
    """(steps, B) indices into the training set."""
    perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
    fill = self.steps * self.batch_size - self.num_train
    return np.concatenate([perm, perm[:fill]]).reshape(self.steps, self.batch_size)
