"""Zigzag scan paths and the selective SSM core (spec §2.6-2.8): the model's scan, in one file.

The SSM is the reference's Mamba-2 SSD module without in/out projections: per scan direction k a
projection of each token to (Δ per head, B, C), Δ = softplus(raw + bias), one scalar
A = -exp(A_log) per head, a per-channel D skip, state size N and a zero initial state. The four
directions are evaluated along their zigzag paths, put back in raster order and summed.

Layout: tokens are channels-last, ``u`` is (B, L, D) with L = P * P in row-major pixel order.
Per direction, the D channels are split into R heads of D / R channels (channel c -> head c // Dh).

Two formulations compute the same function (`selective_scan(impl=...)`, a run-time choice):
"recurrent" (one lax.scan over the path positions with a hand-written VJP; the CPU default) and
"associative" (one jax.lax.associative_scan over all directions and heads; the default on GPU).
Without a gradient on a CPU, the recurrent loop runs as a C++ kernel (model/cpu_kernels.cc).
A sequential lax.scan reference and a float64 numpy loop live in tests/scan_reference.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpmamba_jax.model import cpu_kernels

NUM_DIRECTIONS = 4
# selective_scan implementations: "auto" is "recurrent" on CPU and "associative" elsewhere.
SELECTIVE_SCAN_IMPLS = ("auto", "recurrent", "associative")


@functools.lru_cache(maxsize=None)
def _zigzag_paths_cached(p: int) -> np.ndarray:
  n = p
  i = np.arange(n)[:, None]  # outer loop index
  j = np.arange(n)[None, :]  # inner loop index
  col = np.where(i % 2 == 0, j, n - 1 - j)  # path0 / path2 column rule, (n, n)
  row = np.where(j % 2 == 0, i, n - 1 - i)  # path1 / path3 row rule, indexed [i, j]
  path0 = (i * n + col).reshape(-1)
  path1 = (row * n + j).T.reshape(-1)  # outer loop is j
  path2 = ((n - 1 - i) * n + (n - 1 - col)).reshape(-1)
  path3 = ((n - 1 - row) * n + (n - 1 - j)).T.reshape(-1)
  paths = np.stack([path0, path1, path2, path3]).astype(np.int32)
  paths.setflags(write=False)
  return paths


def zigzag_paths(p: int) -> np.ndarray:
  """The four zigzag scan orders of a p x p patch (spec §2.7).

  Args:
    p: patch side, >= 1.

  Returns:
    (4, p*p) int32: row k lists the row-major pixel indices in the order direction k visits them
    (row snake, column snake, and the two mirrored snakes from the bottom-right corner).
  """
  if int(p) < 1:
    raise ValueError(f"patch size must be >= 1, got {p}")
  return _zigzag_paths_cached(int(p))


def inverse_paths(paths: np.ndarray) -> np.ndarray:
  """Inverse permutations: ``inv[k, paths[k, t]] = t``. (K, L) -> (K, L) int32."""
  paths = np.asarray(paths)
  if not (np.sort(paths, axis=1) == np.arange(paths.shape[1])).all():
    raise ValueError(f"scan paths: each of the {paths.shape[0]} rows must be a permutation of "
                     f"0..{paths.shape[1] - 1}")
  inv = np.empty_like(paths)
  rows = np.arange(paths.shape[0])[:, None]
  inv[rows, paths] = np.arange(paths.shape[1])[None, :]
  return inv.astype(np.int32)


@functools.lru_cache(maxsize=None)
def _path_ops(paths_bytes: bytes, k_dirs: int, length: int, axis: int):
  """(gather, merge) for fixed paths along token axis `axis`, each the other's transpose.

  For axis 1: gather (B, L, D) -> (B, K, L, D), xs[:, k, t] = u[:, paths[k, t]]; merge
  (B, K, L, D) -> (B, L, D), out[:, p] = sum_k y[:, k, inv[k, p]]. For axis 0 the same on
  time-major (L, B, D) tokens, with (K, L, B, D) per-direction arrays.
  Custom VJPs keep the backward pass a gather too (XLA's scatter-add is slow on CPU and gets
  constant-folded at compile time for fixed indices).
  """
  paths = np.frombuffer(paths_bytes, np.int32).reshape(k_dirs, length)
  if not np.all(np.sort(paths, axis=1) == np.arange(length)):
    raise ValueError(f"every scan path must be a permutation of range({length})")
  inv = inverse_paths(paths)
  flat_paths = paths.reshape(-1)  # (K*L,) numpy: a compile-time constant
  flat_inv = (inv + np.arange(k_dirs)[:, None] * length).reshape(-1)  # (K*L,)

  def split_kl(x):  # (..., K*L, ...) at axis -> (..., K, L, ...)
    return x.reshape(x.shape[:axis] + (k_dirs, length) + x.shape[axis + 1:])

  def gather_impl(u):
    return split_kl(jnp.take(u, flat_paths, axis=axis))

  def merge_impl(y):
    y = y.reshape(y.shape[:axis] + (k_dirs * length,) + y.shape[axis + 2:])
    return split_kl(jnp.take(y, flat_inv, axis=axis)).sum(axis=axis)

  gather = jax.custom_vjp(gather_impl)
  gather.defvjp(lambda u: (gather_impl(u), None), lambda _, g: (merge_impl(g),))
  merge = jax.custom_vjp(merge_impl)
  merge.defvjp(lambda y: (merge_impl(y), None), lambda _, g: (gather_impl(g),))
  return gather, merge


def path_ops(paths: np.ndarray, axis: int = 1):
  """Cached (gather, merge) functions for a (K, L) path array and token axis; see `_path_ops`."""
  paths = np.ascontiguousarray(paths, np.int32)
  return _path_ops(paths.tobytes(), *paths.shape, axis)


def _combine(left, right):
  """Composition of h -> a h + b maps: applying `left` then `right`."""
  a_l, b_l = left
  a_r, b_r = right
  return a_l * a_r, a_r * b_l + b_r


def _assoc_scan(a, b, axis, reverse=False):
  _, h = jax.lax.associative_scan(_combine, (a, b), axis=axis, reverse=reverse)
  return h


def _shift(x, axis, step):
  """Shift along axis by `step` (+1: x[t-1] at t, -1: x[t+1] at t), zero-filled."""
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  if step > 0:
    pad[axis] = (1, 0)
    return jnp.pad(jax.lax.slice_in_dim(x, 0, n - 1, axis=axis), pad)
  pad[axis] = (0, 1)
  return jnp.pad(jax.lax.slice_in_dim(x, 1, n, axis=axis), pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linrec_associative(a, b, axis):
  return _assoc_scan(a, b, axis)


def _linrec_fwd(a, b, axis):
  h = _assoc_scan(a, b, axis)
  return h, (a, h)


def _linrec_bwd(axis, res, g):
  # The adjoint of a linear recurrence is the same recurrence run backwards:
  # lam_t = g_t + a_{t+1} lam_{t+1};  dL/db_t = lam_t;  dL/da_t = lam_t * h_{t-1}.
  a, h = res
  lam = _assoc_scan(_shift(a, axis, -1), g, axis, reverse=True)
  grad_a = lam * _shift(h, axis, +1)
  bcast = tuple(i for i, (na, nb) in enumerate(zip(a.shape, grad_a.shape)) if na == 1 and nb != 1)
  return grad_a.sum(axis=bcast, keepdims=True).astype(a.dtype), lam


_linrec_associative.defvjp(_linrec_fwd, _linrec_bwd)


def linear_recurrence(a: jax.Array, b: jax.Array, *, axis: int) -> jax.Array:
  """h_t = a_t * h_{t-1} + b_t along `axis` with h_{-1} = 0.

  `a` must broadcast against `b` (same rank; it may have size-1 axes); the result has b's shape.
  One jax.lax.associative_scan, and one reversed scan for the gradient (a custom VJP).
  """
  if a.ndim != b.ndim:
    raise ValueError(f"a {a.shape} and b {b.shape} must have the same rank")
  return _linrec_associative(a, b, axis % b.ndim)


def resolve_impl(impl: str) -> str:
  """The selective-scan implementation that `impl` runs on the current default backend."""
  if impl not in SELECTIVE_SCAN_IMPLS:
    raise ValueError(f"scan impl must be one of {SELECTIVE_SCAN_IMPLS}, got {impl!r}")
  if impl == "auto":
    impl = "recurrent" if jax.default_backend() == "cpu" else "associative"
  return impl


def selective_scan(u: jax.Array, x_proj: jax.Array, dt_bias: jax.Array, a_log: jax.Array,
                   d_skip: jax.Array, paths: np.ndarray, *, impl: str = "associative",
                   time_major: bool = False) -> jax.Array:
  """Four-direction selective SSM over a flattened patch, summed in raster order (spec §2.6).

  Args:
    u: (B, L, D) tokens in row-major pixel order.
    x_proj: (K, D, R + 2N) per-direction projection; columns [0, R) are the Δ pre-activations of
      the R heads, [R, R+N) are B and [R+N, R+2N) are C.
    dt_bias: (K, R) added to Δ before the softplus.
    a_log: (K, R); A = -exp(a_log), one scalar per head.
    d_skip: (K, D) skip weight per direction and channel.
    paths: (K, L) int scan orders (numpy, static), e.g. ``zigzag_paths(P)``.
    time_major: u (and the result) are (L, B, D) instead of (B, L, D), the layout both
      implementations work in.
    impl: "associative" (one associative_scan over all directions and heads), "recurrent"
      (`selective_scan_recurrent`: one lax.scan step per path position) or "auto" ("recurrent"
      on the CPU backend, where it is the fastest, else "associative").

  Returns:
    (B, L, D) float32: sum over directions of the outputs, in raster order ((L, B, D) when
    time_major).
  """
  # both work time-major: the scan axis L leads, so its slices are whole (B, ...) slabs, and the
  # blocks' (P, P, B, h) features need no transpose
  if not time_major:
    return jnp.swapaxes(selective_scan(jnp.swapaxes(u, 0, 1), x_proj, dt_bias, a_log, d_skip,
                                       paths, impl=impl, time_major=True), 0, 1)
  if resolve_impl(impl) == "recurrent":
    return selective_scan_recurrent(u, x_proj, dt_bias, a_log, d_skip, paths)
  return selective_scan_associative(u, x_proj, dt_bias, a_log, d_skip, paths)


def selective_scan_associative(u: jax.Array, x_proj: jax.Array, dt_bias: jax.Array,
                               a_log: jax.Array, d_skip: jax.Array, paths: np.ndarray) -> jax.Array:
  """`selective_scan` on time-major tokens (L, B, D) as one associative scan over the (K, L)
  gathered paths; the state is (K, L, B, R, Dh, N). Other arguments as `selective_scan`."""
  gather, merge = path_ops(paths, axis=0)
  length, bsz, dim = u.shape
  k_dirs, r_heads = a_log.shape
  n_state = (x_proj.shape[-1] - r_heads) // 2
  head_dim = dim // r_heads
  u = u.astype(jnp.float32)

  xs = gather(u)  # (K, L, B, D)
  z = jnp.einsum("klbd,kde->klbe", xs, x_proj.astype(jnp.float32))  # (K, L, B, R+2N)
  dt = jax.nn.softplus(z[..., :r_heads] + dt_bias[:, None, None, :])  # (K, L, B, R)
  b_in = z[..., r_heads:r_heads + n_state]  # (K, L, B, N)
  c_out = z[..., r_heads + n_state:]  # (K, L, B, N)
  a_head = -jnp.exp(a_log.astype(jnp.float32))  # (K, R)

  x_h = xs.reshape(k_dirs, length, bsz, r_heads, head_dim)  # (K, L, B, R, Dh)
  decay = jnp.exp(dt * a_head[:, None, None, :])[..., None, None]  # (K, L, B, R, 1, 1)
  drive = (dt[..., None, None] * x_h[..., None]
           * b_in[:, :, :, None, None, :])  # (K, L, B, R, Dh, N)
  h = linear_recurrence(decay, drive, axis=1)  # (K, L, B, R, Dh, N)
  # contraction over N as multiply + sum: a dot_general with K*L*B batch dims is slow on CPU
  y = (h * c_out[:, :, :, None, None, :]).sum(axis=-1).reshape(k_dirs, length, bsz, dim)
  y = y + d_skip[:, None, None, :] * xs  # (K, L, B, D)

  return merge(y)  # back to raster order, summed over directions: (L, B, D)


def selective_scan_recurrent(u_tm: jax.Array, x_proj: jax.Array, dt_bias: jax.Array,
                             a_log: jax.Array, d_skip: jax.Array, paths: np.ndarray) -> jax.Array:
  """`selective_scan` on time-major tokens as one lax.scan over the L path positions.

  u_tm: (L, B, D) tokens in raster order, time-major -> (L, B, D). With the tokens time-major
  the K tokens a step visits (one per direction) are K contiguous (B, D) slabs (a cheap row
  gather), the per-step work is elementwise on (K, B, D) arrays and each direction's output is
  added into its token's slab in place. No (B, K, L, D) array exists, which is why this form is
  the faster one on CPU. Other arguments as `selective_scan`.
  """
  length, bsz, dim = u_tm.shape
  k_dirs, r_heads = a_log.shape
  n_state = (x_proj.shape[-1] - r_heads) // 2
  f32 = jnp.float32
  u_tm = u_tm.astype(f32)
  # one plain (L*B, D) @ (D, K*E) matmul: an einsum with K ahead of B in its output makes XLA:CPU
  # transpose the whole (L*B, D) input first
  w_all = jnp.swapaxes(x_proj.astype(f32), 0, 1).reshape(dim, -1)  # (D, K*E)
  # The loop gets the same (L*B, D) array as the matmul: given the (L, B, D) view instead, XLA
  # fuses a cheap producer (the shifted grouped conv) into both and computes it twice.
  u_flat = u_tm.reshape(length * bsz, dim)
  z = (u_flat @ w_all).reshape(length, bsz, k_dirs, -1)  # (L, B, K, E)
  dt = jax.nn.softplus(z[..., :r_heads] + dt_bias.astype(f32))  # (L, B, K, R)
  decay = jnp.exp(dt * -jnp.exp(a_log.astype(f32)))  # (L, B, K, R)
  b_in = z[..., r_heads:r_heads + n_state]  # (L, B, K, N)
  c_out = z[..., r_heads + n_state:]  # (L, B, K, N)
  recurrence = _recurrence_fn(np.ascontiguousarray(paths, np.int32).tobytes(), k_dirs, length)
  return recurrence(u_flat, decay, dt, b_in, c_out, d_skip.astype(f32)).reshape(length, bsz, dim)


def _head_state_sum_matrix(r_heads: int, head_dim: int, n_state: int) -> np.ndarray:
  """0/1 matrix (R Dh N, R N) that sums a flattened (R, Dh, N) product over Dh."""
  f32 = np.float32
  return np.kron(np.kron(np.eye(r_heads, dtype=f32), np.ones((head_dim, 1), f32)),
                 np.eye(n_state, dtype=f32))


# The recurrent scan's VJP keeps every step's state up to this many bytes per scan; above it,
# only the state entering each segment (see `_recurrence_fn`): less memory at Trento's shapes for
# a second pass of the cheap state update in the backward (docs/performance.md).
SCAN_STATES_KEPT_MAX_BYTES = 24 << 20


def state_segment_length(length: int) -> int:
  """Steps per segment when the recurrent scan's VJP recomputes states: a divisor S of `length`
  with S + length / S smallest (the patch side P for L = P * P)."""
  divisors = [d for d in range(1, length + 1) if length % d == 0]
  return min(divisors, key=lambda d: (d + length // d, -d))


@functools.lru_cache(maxsize=None)
def _recurrence_fn(paths_bytes: bytes, k_dirs: int, length: int):
  """The core of `selective_scan_recurrent` for fixed paths, with a hand-written VJP.

  recurrence(u_flat (L*B, D), decay, dt (L, B, K, R), b_in, c_out (L, B, K, N), d_skip (K, D))
  -> (L*B, D), tokens time-major (row l*B + b is token l of sample b). Direction k at step t
  visits token paths[k, t]:
    h_k = decay h_k + dt B x;  out[token] += C . h_k + d_k x.
  The VJP walks the steps backwards (adjoint lam_t = C_t g_t + decay_{t+1} lam_{t+1}). It needs
  every step's state: the forward keeps them all, (L, K, B, R, Dh, N), when that is at most
  SCAN_STATES_KEPT_MAX_BYTES; otherwise only the state entering each segment of S =
  `state_segment_length(L)` steps (a patch row for L = P * P), (L / S, K, B, R, Dh, N), and the
  backward recomputes a segment's S states before walking back through them. Autodiff through
  lax.scan would also keep each step's gathered tokens and coefficients. Without a gradient, where
  the program runs on a CPU and the C++ kernels are built, the forward is one call of
  `cpu_kernels.zigzag_scan_forward` instead of the loop.
  """
  # numpy constants only: this closure is cached across traces, so it must not hold jax arrays
  paths = np.frombuffer(paths_bytes, np.int32).reshape(k_dirs, length)
  inv_t = inverse_paths(paths).T  # (L, K): inv[k, token] = step at which direction k visits it
  dirs = np.arange(k_dirs)
  seg = state_segment_length(length)
  seg_steps = np.arange(length, dtype=np.int32).reshape(length // seg, seg)  # (L / S, S)

  def split_heads(x, r_heads):  # (K, B, D) -> (K, B, R, Dh, 1)
    k, b, d = x.shape
    return x.reshape(k, b, r_heads, d // r_heads, 1)

  def at_step(t, decay, dt, b_in, c_out):
    """Direction k's coefficients at its token of step t: (K, B, R, 1, 1) x2, (K, B, 1, 1, N) x2."""
    tok = jnp.asarray(paths)[:, t]
    heads = lambda a: a[tok, :, dirs][..., None, None]
    state = lambda a: a[tok, :, dirs][:, :, None, None, :]
    return tok, heads(decay), heads(dt), state(b_in), state(c_out)

  def advance(h, t, u_tm, decay, dt, b_in, c_out):
    """The state update of step t: h (K, B, R, Dh, N) -> (h_t, tok, c, x_t (K, B, R, Dh, 1))."""
    tok, a, delta, b, c = at_step(t, decay, dt, b_in, c_out)
    x_t = split_heads(u_tm[tok], decay.shape[-1])
    return a * h + delta * b * x_t, tok, c, x_t

  def forward(u_flat, decay, dt, b_in, c_out, d_skip, keep):
    """-> (out (L*B, D), states): keep "none" (None), "all" (each step's state, after it) or
    "segments" (the state entering each segment)."""
    bsz, dim = decay.shape[1], u_flat.shape[-1]
    r_heads, n_state = decay.shape[-1], b_in.shape[-1]
    d_k = split_heads(d_skip[:, None, :], r_heads)  # (K, 1, R, Dh, 1)

    def step(carry, t):
      h, out = carry  # (K, B, R, Dh, N), (L, B, D)
      # reshaped inside the body: an (L, B, D) view made outside is a second loop input, and
      # XLA would again compute u's producer twice
      h, tok, c, x_t = advance(h, t, u_flat.reshape(length, bsz, dim), decay, dt, b_in, c_out)
      y_t = (h * c).sum(-1, keepdims=True) + d_k * x_t
      return (h, out.at[tok].add(y_t.reshape(k_dirs, bsz, dim))), (h if keep == "all" else None)

    def segment(carry, steps):  # -> the state entering the segment
      return jax.lax.scan(step, carry, steps)[0], carry[0]

    h0 = jnp.zeros((k_dirs, bsz, r_heads, dim // r_heads, n_state), u_flat.dtype)
    out0 = jnp.zeros((length, bsz, dim), u_flat.dtype)
    if keep == "segments":
      (_, out), states = jax.lax.scan(segment, (h0, out0), seg_steps)
    else:
      (_, out), states = jax.lax.scan(step, (h0, out0), jnp.arange(length))
    return out.reshape(length * bsz, dim), states

  @jax.custom_vjp
  def recurrence(u_flat, decay, dt, b_in, c_out, d_skip):
    # without a gradient: the C++ kernel where the program runs on a CPU
    return cpu_kernels.cpu_or_xla(
        lambda *args: forward(*args, "none")[0],
        lambda built: functools.partial(cpu_kernels.zigzag_scan_forward, built.zigzag_scan, paths),
        u_flat, decay, dt, b_in, c_out, d_skip)

  def fwd(u_flat, decay, dt, b_in, c_out, d_skip):
    states_bytes = (length * k_dirs * decay.shape[1] * u_flat.shape[-1] * b_in.shape[-1]
                    * u_flat.dtype.itemsize)
    # one-step segments (L = 1) would keep as many states as "all", so keep all
    keep = "all" if states_bytes <= SCAN_STATES_KEPT_MAX_BYTES or seg == 1 else "segments"
    out, states = forward(u_flat, decay, dt, b_in, c_out, d_skip, keep)
    return out, (u_flat, decay, dt, b_in, c_out, d_skip, states)

  def bwd(res, g_out):
    u_flat, decay, dt, b_in, c_out, d_skip, states = res  # (L or L / S, K, B, R, Dh, N)
    bsz, dim = decay.shape[1], u_flat.shape[-1]
    u_tm = u_flat.reshape(length, bsz, dim)
    g_out = g_out.reshape(length, bsz, dim)
    r_heads = decay.shape[-1]
    to_head_state = _head_state_sum_matrix(*states.shape[3:])

    def back_step(carry, t, h_t, h_prev):
      # lam_{t+1} (K, B, R, Dh, N) and decay_{t+1} (K, B, R, 1, 1), not their product: carrying
      # the product made XLA copy the carry on every step.
      lam_next, a_next, g_u = carry
      tok, a, delta, b, c = at_step(t, decay, dt, b_in, c_out)
      x_t = split_heads(u_tm[tok], r_heads)  # (K, B, R, Dh, 1)
      g_y = split_heads(g_out[tok], r_heads)
      lam = g_y * c + a_next * lam_next  # dL/dh_t
      g_x = (lam * delta * b).sum(-1)  # (K, B, R, Dh)
      g_u = g_u.at[tok].add(g_x.reshape(k_dirs, bsz, dim))
      # d decay, d dt (K, B, R), d b_in, d c_out (K, B, N) from three sums over Dh, of lam h_prev,
      # lam x and g_y h, as one matmul with a 0/1 matrix (as plain sums XLA:CPU emits them inside
      # the loop as scalar code); d dt and d b_in both come from the second, weighted by b and
      # by delta.
      sums = (jnp.stack([lam * h_prev, lam * x_t, g_y * h_t]).reshape(3, k_dirs * bsz, -1)
              @ to_head_state).reshape(3, k_dirs, bsz, r_heads, -1)  # (3, K, B, R, N)
      b_n, delta_r = b[:, :, :, 0], delta[..., 0]  # (K, B, 1, N), (K, B, R, 1)
      g_coef = jnp.concatenate([sums[0].sum(-1), (sums[1] * b_n).sum(-1),
                                (sums[1] * delta_r).sum(-2), sums[2].sum(-2)], -1)
      return (lam, a, g_u), g_coef  # (K, B, 2R + 2N)

    def back_through(carry, steps, hs, h_start):
      """The backward over `steps` given their states hs (S, ...) and the state before them."""
      def body(carry, i):
        h_prev = jnp.where(i > 0, hs[jnp.maximum(i - 1, 0)], h_start)
        return back_step(carry, jnp.asarray(steps)[i], hs[i], h_prev)
      return jax.lax.scan(body, carry, jnp.arange(len(steps)), reverse=True)

    def recompute(h, t):  # the forward's state update only
      h = advance(h, t, u_tm, decay, dt, b_in, c_out)[0]
      return h, h

    def segment(carry, inputs):
      steps, h_start = inputs
      return back_through(carry, steps, jax.lax.scan(recompute, h_start, steps)[1], h_start)

    # the skip term's gradients need no path order: every direction visits every token once
    init = (jnp.zeros_like(states[0]), jnp.zeros(states.shape[1:4] + (1, 1), states.dtype),
            g_out * d_skip.sum(0))
    if states.shape[0] == length:  # every step's state kept (fwd never segments with S == 1)
      (_, _, g_u), g_coefs = back_through(init, np.arange(length), states,
                                          jnp.zeros_like(states[0]))
    else:
      (_, _, g_u), g_coefs = jax.lax.scan(segment, init, (seg_steps, states), reverse=True)
      g_coefs = g_coefs.reshape((length,) + g_coefs.shape[2:])  # (T, K, B, 2R + 2N)
    # per-step (T, K, B, .) -> per-token (L, B, K, .): token l of direction k was step inv[k, l]
    g_coefs = jnp.swapaxes(g_coefs[inv_t, dirs[None, :]], 1, 2)
    g_decay, g_dt, g_b, g_c = jnp.split(
        g_coefs, np.cumsum([r_heads, r_heads, b_in.shape[-1]]), axis=-1)
    g_d = jnp.broadcast_to((g_out * u_tm).sum((0, 1)), d_skip.shape)
    return g_u.reshape(u_flat.shape), g_decay, g_dt, g_b, g_c, g_d

  recurrence.defvjp(fwd, bwd)
  return recurrence
