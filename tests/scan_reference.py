"""Test references for the selective scan (dpmamba_jax.model.scan), written independently of it.

selective_scan_numpy: a plain float64 loop over (direction, step).
selective_scan_sequential: the same recurrence in jax, one lax.scan over the L path positions per
  direction (differentiable by autodiff, float32).
linear_recurrence_sequential: h_t = a_t * h_{t-1} + b_t as one lax.scan (autodiff gradients).

Only zigzag_paths / inverse_paths come from the package (callers pass the paths).
"""
import jax
import jax.numpy as jnp
import numpy as np

from dpmamba_jax.model.scan import inverse_paths


def selective_scan_numpy(u, x_proj, dt_bias, a_log, d_skip, paths) -> np.ndarray:
  """Plain float64 loop over (direction, step) of the same recurrence; a test reference."""
  u = np.asarray(u, np.float64)
  x_proj = np.asarray(x_proj, np.float64)
  bsz, length, dim = u.shape
  k_dirs, r_heads = np.shape(a_log)
  n_state = (x_proj.shape[-1] - r_heads) // 2
  head_dim = dim // r_heads
  a_head = -np.exp(np.asarray(a_log, np.float64))
  out = np.zeros((bsz, length, dim))
  for k in range(k_dirs):
    h = np.zeros((bsz, r_heads, head_dim, n_state))
    for t in range(length):
      p = paths[k][t]
      x = u[:, p, :]  # (B, D)
      z = x @ x_proj[k]  # (B, R+2N)
      dt = np.logaddexp(0.0, z[:, :r_heads] + dt_bias[k])  # softplus, (B, R)
      bb, cc = z[:, r_heads:r_heads + n_state], z[:, r_heads + n_state:]
      xh = x.reshape(bsz, r_heads, head_dim)
      h = (np.exp(dt * a_head[k])[:, :, None, None] * h
           + dt[:, :, None, None] * xh[..., None] * bb[:, None, None, :])
      y = np.einsum("brdn,bn->brd", h, cc).reshape(bsz, dim) + d_skip[k] * x
      out[:, p, :] += y
  return out


def selective_scan_sequential(u, x_proj, dt_bias, a_log, d_skip, paths) -> jax.Array:
  """Four-direction selective scan, one jax.lax.scan over the path positions per direction.

  u: (B, L, D) tokens in raster order; x_proj (K, D, R + 2N); dt_bias, a_log (K, R); d_skip
  (K, D); paths (K, L) static numpy. Returns (B, L, D) float32: the directions' outputs put back
  in raster order and summed.
  """
  paths = np.asarray(paths, np.int32)
  inv = inverse_paths(paths)
  u = jnp.asarray(u, jnp.float32)
  bsz, length, dim = u.shape
  k_dirs, r_heads = np.shape(a_log)
  n_state = (np.shape(x_proj)[-1] - r_heads) // 2
  head_dim = dim // r_heads
  out = jnp.zeros((bsz, length, dim), jnp.float32)
  for k in range(k_dirs):
    xs = u[:, paths[k], :]  # (B, L, D), path order
    z = jnp.einsum("bld,de->ble", xs, jnp.asarray(x_proj[k], jnp.float32))  # (B, L, R+2N)
    dt = jax.nn.softplus(z[..., :r_heads] + dt_bias[k])  # (B, L, R)
    b_in = z[..., r_heads:r_heads + n_state]  # (B, L, N)
    c_out = z[..., r_heads + n_state:]  # (B, L, N)
    a_head = -jnp.exp(jnp.asarray(a_log[k], jnp.float32))  # (R,)
    x_h = xs.reshape(bsz, length, r_heads, head_dim)  # (B, L, R, Dh)

    def step(h, inputs, a_head=a_head):
      x_t, dt_t, b_t, c_t = inputs  # (B, R, Dh), (B, R), (B, N), (B, N)
      h = (jnp.exp(dt_t * a_head)[:, :, None, None] * h
           + dt_t[:, :, None, None] * x_t[..., None] * b_t[:, None, None, :])  # (B, R, Dh, N)
      y_t = jnp.einsum("brdn,bn->brd", h, c_t)  # (B, R, Dh)
      return h, y_t

    time_first = lambda a: jnp.moveaxis(a, 1, 0)  # (B, L, ...) -> (L, B, ...)
    h0 = jnp.zeros((bsz, r_heads, head_dim, n_state), jnp.float32)
    _, ys = jax.lax.scan(step, h0, (time_first(x_h), time_first(dt), time_first(b_in),
                                    time_first(c_out)))  # (L, B, R, Dh)
    y = jnp.moveaxis(ys, 0, 1).reshape(bsz, length, dim) + d_skip[k] * xs  # path order
    out = out + y[:, inv[k], :]  # raster order
  return out


def linear_recurrence_sequential(a, b, axis: int) -> jax.Array:
  """h_t = a_t * h_{t-1} + b_t along `axis`, h_{-1} = 0, as one lax.scan; a broadcasts to b."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  axis = axis % b.ndim
  a = jnp.broadcast_to(a, jnp.broadcast_shapes(a.shape, b.shape))
  a_t, b_t = jnp.moveaxis(a, axis, 0), jnp.moveaxis(b, axis, 0)

  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h

  _, hs = jax.lax.scan(step, jnp.zeros_like(b_t[0]), (a_t, b_t))
  return jnp.moveaxis(hs, 0, axis)
