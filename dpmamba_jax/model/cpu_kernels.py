"""Two forward passes of the model as C++ XLA:CPU kernels (`cpu_kernels.cc`), built on first use.

XLA:CPU runs `scan.selective_scan_recurrent`'s loop as dozens of small kernels per path position,
and the blocks' grouped 3x3 convs (`conv._shift_conv3x3`) as one elementwise pass over expanded
inputs that leaves the cache; the C++ handlers do each in one cache-friendly pass, several times
faster. They compute the primal only (inference, evaluation, the maps, the teacher's features for
distillation); under a gradient the hand-written VJPs' forward and backward stay in XLA.

The shared library is compiled once per machine with $CXX (else c++, g++ or clang++) against
jaxlib's FFI headers into $DPMAMBA_KERNEL_DIR (else $DPMAMBA_CACHE_DIR/kernels, else
~/.cache/dpmamba_jax/kernels), named by a hash of the source, the jaxlib version, the compiler and
the CPU, and written atomically. Without a compiler, or when the build fails, both stay XLA
programs (the same results to float rounding, slower) and one warning says so.
`DPMAMBA_CPU_KERNELS=0` turns the kernels off (benchmarks, debugging).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from dpmamba_jax import fileio, runtime

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
DISABLE_ENV = "DPMAMBA_CPU_KERNELS"


class Kernels(NamedTuple):
  """The FFI target names the kernels are registered under (CPU platform)."""
  zigzag_scan: str
  grouped_conv3x3: str


# handler symbol in cpu_kernels.cc for each Kernels field
_SYMBOLS = {"zigzag_scan": "DpmambaZigzagScanForward", "grouped_conv3x3": "DpmambaGroupedConv3x3"}


class KernelUnavailable(RuntimeError):
  """The kernels could not be built or loaded here (the reason is the message)."""


def kernel_dir() -> str:
  """$DPMAMBA_KERNEL_DIR, else $DPMAMBA_CACHE_DIR/kernels, else ~/.cache/dpmamba_jax/kernels."""
  return runtime.cache_dir("kernels", "DPMAMBA_KERNEL_DIR")


def compiler() -> str | None:
  """The C++ compiler to build with: $CXX, else the first of c++, g++, clang++ on PATH."""
  if os.environ.get("CXX"):
    return shutil.which(os.environ["CXX"]) or os.environ["CXX"]
  return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def _cpu_identity() -> str:
  """What -march=native depends on: the CPU's model and feature flags (Linux), else the machine."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.machine() + platform.processor()


def _build(cxx: str, library: str) -> None:
  """Compiles SOURCE into `library` (atomically: a temporary file in its folder, then a rename)."""
  os.makedirs(os.path.dirname(library), exist_ok=True)
  tmp = fileio.temp_file(library)
  base = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir(),
          SOURCE, "-o", tmp]
  try:
    for flags in (["-march=native"], []):  # -march=native is not known to every compiler
      done = subprocess.run(base[:1] + flags + base[1:], capture_output=True, text=True)
      if done.returncode == 0:
        os.replace(tmp, library)
        return
    lines = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines()
    raise KernelUnavailable(f"{os.path.basename(cxx)} failed on {SOURCE}: "
                            f"{lines[0].strip() if lines else 'exit ' + str(done.returncode)}")
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def _load() -> Kernels:
  """Builds (once per machine) and registers the kernels."""
  cxx = compiler()
  if cxx is None:
    raise KernelUnavailable("no C++ compiler found (install g++, or set CXX)")
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()[:1]
    with open(SOURCE, "rb") as f:
      source = f.read()
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelUnavailable(f"{cxx}: {e}") from e
  key = hashlib.sha256(b"\0".join([
      source, jaxlib.__version__.encode(), "".join(version).encode(),
      _cpu_identity().encode()])).hexdigest()[:16]
  library = os.path.join(kernel_dir(), f"cpu_kernels_{key}.so")
  if not os.path.exists(library):
    try:
      _build(cxx, library)
    except OSError as e:
      raise KernelUnavailable(f"cannot build {library}: {e.strerror or e}") from e
  try:
    lib = ctypes.CDLL(library)
    handlers = {field: getattr(lib, symbol) for field, symbol in _SYMBOLS.items()}
  except (OSError, AttributeError) as e:
    raise KernelUnavailable(f"cannot load {library}: {e}") from e
  kernels = Kernels(**{field: f"dpmamba_{field}_{key}" for field in _SYMBOLS})
  for field, handler in handlers.items():
    jax.ffi.register_ffi_target(getattr(kernels, field), jax.ffi.pycapsule(handler),
                                platform="cpu")
  return kernels


_BUILD_LOCK = threading.Lock()  # `build_in_background`'s thread and a trace may ask at once


def kernels() -> Kernels | None:
  """The registered kernels, or None (turned off, or unavailable: one warning). Thread-safe: a
  second caller waits for the first one's build."""
  with _BUILD_LOCK:
    return _kernels_once()


@functools.lru_cache(maxsize=None)
def _kernels_once() -> Kernels | None:
  if os.environ.get(DISABLE_ENV, "1") == "0":
    return None
  try:
    return _load()
  except KernelUnavailable as e:
    warnings.warn(f"the CPU kernels are not available ({e}); the scan and the grouped convs run "
                  f"as XLA programs: the same results, inference about 1.6x slower",
                  RuntimeWarning, stacklevel=3)
    return None


kernels.cache_clear = _kernels_once.cache_clear  # as on an lru_cache'd function


def build_in_background() -> threading.Thread:
  """Starts `kernels()` in a thread, so that a command's first build (a C++ compile on one
  core) runs while it loads its data instead of in its first trace. Returns the thread. Not a
  daemon: a command that ends sooner waits for the build, which then leaves no temporary file."""
  thread = threading.Thread(target=kernels, name="cpu-kernels-build")
  thread.start()
  return thread


def cpu_or_xla(xla: Callable, cpu: Callable[[Kernels], Callable], *args):
  """xla(*args), except in a program that runs on a CPU while the kernels are built: then
  cpu(kernels())(*args) (the choice made at lowering, `jax.lax.platform_dependent`)."""
  built = kernels()
  if built is None:
    return xla(*args)
  return jax.lax.platform_dependent(*args, default=xla, cpu=cpu(built))


def zigzag_scan_forward(name: str, paths: np.ndarray, u_flat: jax.Array, decay: jax.Array,
                        dt: jax.Array, b_in: jax.Array, c_out: jax.Array,
                        d_skip: jax.Array) -> jax.Array:
  """One call of the scan kernel `name` (`kernels().zigzag_scan`); arguments as
  `scan._recurrence_fn`'s.

  u_flat (L*B, D), decay and dt (L, B, K, R), b_in and c_out (L, B, K, N), d_skip (K, D), paths
  (K, L) numpy -> (L*B, D) float32, tokens time-major.
  """
  call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(u_flat.shape, jnp.float32),
                          vmap_method="sequential")
  f32 = jnp.float32
  return call(u_flat.astype(f32), decay.astype(f32), dt.astype(f32), b_in.astype(f32),
              c_out.astype(f32), d_skip.astype(f32), jnp.asarray(paths, jnp.int32))


def grouped_conv3x3(name: str, x: jax.Array, kernel: jax.Array, layout: str) -> jax.Array:
  """One call of the conv kernel `name` (`kernels().grouped_conv3x3`): `conv._shift_conv3x3`.

  x (H, W, B, cin) for layout "HWNC" or (B, H, W, cin) for "NHWC"; kernel (3, 3, cin/groups,
  cout), the groups being cin / kernel.shape[2] -> the same layout with cout channels, no bias.
  """
  out_shape = x.shape[:-1] + (kernel.shape[-1],)
  call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")
  return call(x.astype(jnp.float32), kernel.astype(jnp.float32),
              batch_major=layout == "NHWC")
