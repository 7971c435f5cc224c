"""Host and XLA set-up for the command-line tools; call before any JAX computation.

XLA flags for the CPU backend, glibc's huge-page malloc tunable (the CLIs re-exec themselves
once with it), malloc_trim after every compile, JAX's persistent compilation cache and the
multi-controller initialisation of a several-host run.

A CLI imports this module first and restarts itself (`reexec_with_hugepage_malloc`) before its
heavy imports, so jax is imported inside the functions that need it: importing it takes about a
second, which a restart would pay twice.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import pkgutil
import platform
import sys
import warnings

from dpmamba_jax import errors


def cache_dir(name: str, own_env: str) -> str:
  """$<own_env>, else $DPMAMBA_CACHE_DIR/<name>, else ~/.cache/dpmamba_jax/<name> (absolute)."""
  d = os.environ.get(own_env)
  if not d:
    root = os.environ.get("DPMAMBA_CACHE_DIR") or os.path.join("~", ".cache", "dpmamba_jax")
    d = os.path.join(root, name)
  return os.path.abspath(os.path.expanduser(d))


def compile_cache_dir() -> str:
  """$DPMAMBA_XLA_CACHE_DIR, else $DPMAMBA_CACHE_DIR/xla, else ~/.cache/dpmamba_jax/xla."""
  return cache_dir("xla", "DPMAMBA_XLA_CACHE_DIR")


# XLA:CPU's YNNPACK reduce fusions are several times slower than XLA's own reductions for this
# model (docs/performance.md; tools/bench.py --xla-flags measures both).
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def accelerator_plugin() -> str | None:
  """The installed JAX accelerator plugin (e.g. 'xla_cuda13') that JAX will use, else None.

  Looked up without starting a backend (XLA reads $XLA_FLAGS once, when the first backend
  starts). None when $JAX_PLATFORMS puts cpu first.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms.split(",")[0].strip() == "cpu":
    return None
  try:
    import jax_plugins  # the namespace package of the plugin wheels; absent without any
  except ImportError:
    return None
  names = sorted(m.name for m in pkgutil.iter_modules(jax_plugins.__path__))
  return names[0] if names else None


def cpu_xla_flags() -> str:
  """CPU_XLA_FLAGS where the CPU is the backend, "" where an accelerator plugin is installed
  (the flag means nothing there, and an XLA that no longer knows it refuses to start)."""
  return "" if accelerator_plugin() else CPU_XLA_FLAGS


def setup_cpu_flags() -> None:
  """Host-side settings for the CLIs; call before any jax work.

  Adds `cpu_xla_flags()` to $XLA_FLAGS unless the user set that flag, and returns the
  compiler's freed memory to the OS after every XLA compile (`release_memory_after_compiles`).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  extra = cpu_xla_flags()
  if extra and "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
  release_memory_after_compiles()


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """Joins a multi-controller run (`jax.distributed.initialize`); call before any JAX work.

  With no arguments JAX finds the coordinator in the environment (Slurm, Open MPI, TPU pods);
  otherwise all three are needed. On CPU-only hosts the cross-process collectives go through
  gloo (XLA:CPU has no other built-in implementation).
  """
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise errors.UserError("--coordinator, --num-processes and --process-id: give all three "
                           "or none (none: found in the environment, e.g. Slurm)")
  if all(given) and not 0 <= process_id < num_processes:
    raise errors.UserError(f"--process-id {process_id}: expected 0 <= id < --num-processes "
                           f"{num_processes}")
  import jax  # after the re-exec (module docstring)
  if accelerator_plugin() is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)


def primary_process() -> bool:
  """True on process 0 of a multi-controller run (and in a single-process run): the one that
  prints and appends to log.jsonl. The other processes run the same computation silently."""
  import jax  # after the re-exec (module docstring)
  return jax.process_index() == 0


def single_process() -> bool:
  """True unless this is one of several processes of a multi-controller run."""
  import jax  # after the re-exec (module docstring)
  return jax.process_count() == 1


# glibc serves every large allocation with a fresh mmap and unmaps it when it is freed, so
# XLA:CPU's temporary buffer of each call is faulted in again, 4 KB at a time, on every call.
# With this tunable glibc asks for transparent huge pages on those mappings (512x fewer faults;
# docs/performance.md). glibc reads $GLIBC_TUNABLES only when a process starts.
HUGEPAGE_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def hugepage_malloc_env(environ: dict | None = None) -> dict | None:
  """`environ` (default os.environ) plus HUGEPAGE_MALLOC_TUNABLE in $GLIBC_TUNABLES.

  None where it does not apply: not glibc >= 2.35 (the tunable's first release), transparent
  huge pages set to "never", an accelerator plugin installed (host memory is not the step's
  memory there), the tunable already set, or $DPMAMBA_HUGEPAGE_MALLOC=0.
  """
  env = dict(os.environ if environ is None else environ)
  tunables = env.get("GLIBC_TUNABLES", "")
  if env.get("DPMAMBA_HUGEPAGE_MALLOC", "1") == "0" or "glibc.malloc.hugetlb" in tunables:
    return None
  libc, version = platform.libc_ver()
  try:
    if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
      return None
    with open(_THP_ENABLED) as f:
      if "[never]" in f.read():
        return None
  except (OSError, ValueError):
    return None
  if accelerator_plugin():
    return None
  env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGEPAGE_MALLOC_TUNABLE) if t)
  return env


def reexec_with_hugepage_malloc() -> None:
  """For a CLI's `__main__`, before any work: restart the same command line once with
  `hugepage_malloc_env()` (same process id; the restarted process finds the tunable set and
  goes on). Does nothing where that env does not apply or the command cannot be replayed."""
  env = hugepage_malloc_env()
  argv = list(getattr(sys, "orig_argv", []))
  if env is None or len(argv) < 2 or argv[1] == "-":
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
  except OSError:
    return


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# libc.malloc_trim once the listener is installed (looked up per event, so tests can swap it)
_malloc_trim = None


def release_memory_after_compiles() -> bool:
  """After each XLA compile, glibc's malloc_trim(0) hands the compiler's freed heap back.

  Compiling a train step leaves hundreds of MB of freed-but-held heap in the process; without the
  trim the step's own buffers come on top of it (peak RSS, docs/performance.md). Runs once per
  compile (a few ms). No-op (False) where libc has no malloc_trim.
  """
  global _malloc_trim  # the process-wide libc handle, installed once per process
  if _malloc_trim is not None:  # installed already
    return True
  try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return False
  import jax.monitoring  # after the re-exec (module docstring)

  def on_event(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT and _malloc_trim is not None:
      _malloc_trim(0)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  return True


def setup_compile_cache(enabled: bool = True) -> str | None:
  """Turns on JAX's persistent compilation cache (compiled steps are reused across runs)."""
  if not enabled:
    return None
  import jax  # after the re-exec (module docstring)
  d = compile_cache_dir()
  try:
    os.makedirs(d, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # A full disk under the cache costs only the entries JAX cannot write (it warns and goes on),
  # one warning per program: dropped. The run's own writes report a full disk themselves.
  warnings.filterwarnings("ignore", message=r"Error writing persistent compilation cache entry "
                          r"(.|\n)*(No space left on device|Disk quota exceeded)")
  return d
