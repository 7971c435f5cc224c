"""Chunked (Mamba-2 SSD style) form of the four-direction selective scan, for CPU.

Same maths as `scan.selective_scan`, without gathering the tokens into the four path orders.
Each zigzag path visits the patch one row (directions 0, 2) or one column (1, 3) at a time, so
with chunks of P steps every chunk is one *line* of the raster grid. Per line, the in-chunk part
of the recurrence is a (P, P) matrix applied to that line's tokens,

  M[i, j] = (C_i . B_j) exp(cum_i - cum_j) dt_j   for path order j <= i (else 0),
  cum = inclusive cumsum of dt * A along the path inside the chunk,

and the state carried between chunks is a short recurrence over the P chunks. The two directions
that share lines (0 and 2; 1 and 3) are summed into one matrix, so each SSM costs two small
batched matmuls on (B, P, P, D)-sized arrays plus elementwise work on (B, L, K, R)-sized
coefficients; nothing (B, K, L, D)-sized is materialised. The D skip commutes with the
permutations: sum_k d_k * x.

Layout: `u` is (B, L, D), L = P * P raster order, channels-last; heads split D into R groups.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _line_structure_cached(paths_bytes: bytes, k_dirs: int, p: int):
  paths = np.frombuffer(paths_bytes, np.int32).reshape(k_dirs, p * p)
  orient = np.zeros(k_dirs, np.int32)  # 0: chunks are rows, 1: columns
  chunk_line = np.zeros((k_dirs, p), np.int32)  # line visited by chunk c
  order = np.zeros((k_dirs, p, p), np.int32)  # order[k, line, pos] = step inside its chunk
  for k in range(k_dirs):
    rows, cols = np.divmod(paths[k].reshape(p, p), p)  # (chunk, step)
    if np.all(rows == rows[:, :1]):
      orient[k], line, pos = 0, rows[:, 0], cols
    elif np.all(cols == cols[:, :1]):
      orient[k], line, pos = 1, cols[:, 0], rows
    else:
      return None
    if sorted(line.tolist()) != list(range(p)) or not np.all(np.sort(pos, 1) == np.arange(p)):
      return None
    chunk_line[k] = line
    for c in range(p):
      order[k, line[c], pos[c]] = np.arange(p)
  line_chunk = np.argsort(chunk_line, axis=1).astype(np.int32)  # chunk of each line
  return orient, chunk_line, line_chunk, order


def line_structure(paths: np.ndarray):
  """Static chunk layout of (K, P*P) paths whose P-step chunks are raster rows or columns.

  Returns (orient (K,), chunk_line (K, P), line_chunk (K, P), order (K, P, P)) or None when the
  paths do not have that structure (then `supports` is False).
  """
  paths = np.ascontiguousarray(paths, np.int32)
  k_dirs, length = paths.shape
  p = int(round(np.sqrt(length)))
  if p * p != length:
    return None
  return _line_structure_cached(paths.tobytes(), k_dirs, p)


def supports(paths: np.ndarray) -> bool:
  """True when `selective_scan_chunked` can run these paths (e.g. every `zigzag_paths(p)`)."""
  return line_structure(paths) is not None


def _to_lines(x, orient):
  """(B, P, P, ...) raster -> line layout (B, line, pos, ...)."""
  return x if orient == 0 else jnp.swapaxes(x, 1, 2)


def _segment_decays(before: np.ndarray, log_a: jax.Array):
  """Cumulative log-decays and the decay between every ordered pair of steps.

  before: (..., I, J) bool, step j comes at or before step i (a static order); log_a:
  (B, ..., J, R) per-step log decays. Returns cum (B, ..., I, R), the inclusive sums along the
  order, and decay (B, ..., I, J, R) = exp(cum_i - cum_j) where before[i, j], else 0.
  """
  # the sums as a 0/1 matmul; HIGHEST keeps them float32 where the default matmul precision is
  # lower
  cum = jnp.einsum("...ij,b...jr->b...ir", before.astype(np.float32), log_a,
                   precision=jax.lax.Precision.HIGHEST)
  seg = cum[..., :, None, :] - cum[..., None, :, :]  # (B, ..., I, J, R)
  return cum, jnp.exp(jnp.where(before[..., None], seg, -jnp.inf))


def _recur_chunks(log_decay, h):
  """Hend[c] = exp(log_decay[c]) Hend[c-1] + h[c] over the P chunks (axis 1), in closed form.

  log_decay: (B, C, R); h: (B, C, R, Dh, N). Hend[c] = sum_{c' <= c} exp(T_c - T_c') h[c'] with
  T the inclusive cumsum of log_decay: one small (C, C) matrix per (B, R) and one einsum, no
  loop (a lax.scan over the chunks is a device loop on GPU, a launch or more per chunk).
  """
  c = log_decay.shape[1]
  _, w = _segment_decays(np.tril(np.ones((c, c), bool)), log_decay)  # (B, c, c', R)
  return jnp.einsum("bcer,berdn->bcrdn", w, h, precision=jax.lax.Precision.HIGHEST)


def selective_scan_chunked(u: jax.Array, x_proj: jax.Array, dt_bias: jax.Array,
                           a_log: jax.Array, d_skip: jax.Array, paths: np.ndarray) -> jax.Array:
  """Chunked form of `scan.selective_scan` (same arguments, same result up to rounding).

  Args:
    u: (B, L, D) tokens, L = P * P in row-major pixel order.
    x_proj: (K, D, R + 2N); dt_bias, a_log: (K, R); d_skip: (K, D); paths: (K, L) static with
      `supports(paths)` (every chunk of P steps is one raster row or column).

  Returns:
    (B, L, D) float32.
  """
  struct = line_structure(paths)
  if struct is None:
    raise ValueError("selective_scan_chunked needs paths whose P-step chunks are rows/columns")
  orient, chunk_line, line_chunk, order = struct
  bsz, length, dim = u.shape
  k_dirs, r_heads = a_log.shape
  n_state = (x_proj.shape[-1] - r_heads) // 2
  head_dim = dim // r_heads
  p = chunk_line.shape[1]
  f32 = jnp.float32
  u = u.astype(f32)
  x_proj = x_proj.astype(f32)

  x_img = u.reshape(bsz, p, p, dim)  # (B, row, col, D)
  # all per-token coefficients at once, in raster order
  z = jnp.einsum("bijd,kde->kbije", x_img, x_proj)  # (K, B, P, P, R+2N)
  a_head = -jnp.exp(a_log.astype(f32))  # (K, R)
  x_lines = [x_img, jnp.swapaxes(x_img, 1, 2)]  # per orientation, (B, line, pos, D)
  x_lines = [x.reshape(bsz, p, p, r_heads, head_dim) for x in x_lines]

  mats = [None, None]  # per orientation: summed in-chunk matrices (B, line, R, P, P)
  inter = [None, None]  # per orientation: inter-chunk output (B, line, pos, R, Dh)
  for k in range(k_dirs):
    o = int(orient[k])
    zk = _to_lines(z[k], o)  # (B, line, pos, E)
    dt = jax.nn.softplus(zk[..., :r_heads] + dt_bias[k].astype(f32))  # (B, line, pos, R)
    b_in = zk[..., r_heads:r_heads + n_state]  # (B, line, pos, N)
    c_out = zk[..., r_heads + n_state:]  # (B, line, pos, N)
    da = dt * a_head[k]  # (B, line, pos, R)
    before = order[k][:, None, :] <= order[k][:, :, None]  # [line, i, j]: j visited <= i
    # cum along the path (B, line, pos, R); in-chunk matrix M[i, j] = (C_i . B_j)
    # exp(cum_i - cum_j) dt_j for j <= i: decay is its (B, line, i, j, R) exp factor
    cum, decay = _segment_decays(before, da)
    total = da.sum(axis=2)  # (B, line, R)

    cb = jnp.einsum("blin,bljn->blij", c_out, b_in)  # (B, line, i, j)
    m = jnp.transpose(decay * cb[..., None] * dt[:, :, None, :, :], (0, 1, 4, 2, 3))
    mats[o] = m if mats[o] is None else mats[o] + m  # (B, line, R, i, j)

    # chunk end states, carried across chunks in path order
    w = jnp.exp(total[:, :, None, :] - cum) * dt  # (B, line, pos, R)
    h_line = jnp.einsum("bljr,bljn,bljrd->blrdn", w, b_in, x_lines[o])  # (B, line, R, Dh, N)
    h_chunk = h_line[:, chunk_line[k]]  # (B, chunk, R, Dh, N)
    h_end = _recur_chunks(total[:, chunk_line[k]], h_chunk)  # (B, chunk, R, Dh, N)
    h_in = jnp.pad(h_end[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))  # state entering c
    h_in = h_in[:, line_chunk[k]]  # (B, line, R, Dh, N)
    v = jnp.exp(cum)[..., None] * c_out[:, :, :, None, :]  # (B, line, pos, R, N)
    y_in = jnp.einsum("blirn,blrdn->blird", v, h_in)  # (B, line, pos, R, Dh)
    inter[o] = y_in if inter[o] is None else inter[o] + y_in

  outs = []
  for o in (0, 1):
    if mats[o] is None:
      continue
    y = jnp.einsum("blrij,bljrd->blird", mats[o], x_lines[o]) + inter[o]
    y = y.reshape(bsz, p, p, dim)
    outs.append(y if o == 0 else jnp.swapaxes(y, 1, 2))
  y = sum(outs) + x_img * d_skip.astype(f32).sum(axis=0)
  return y.reshape(bsz, length, dim)
