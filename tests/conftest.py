"""Shared test setup: CPU by default, and locations of the optional ../shared assets."""
import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are tiny: compiling them costs far more than running them, and XLA's CPU
# backend at optimisation level 0 compiles about twice as fast (the same semantics; real runs,
# tools/bench.py and every CLI outside the tests keep the default level). Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
# The C++ CPU kernels (model/cpu_kernels.py) are built once for the whole run, by whichever
# worker needs them first (the build is atomic), not once per worker's private cache.
os.environ.setdefault("DPMAMBA_KERNEL_DIR", str(REPO_ROOT / ".pytest_cache" / "dpmamba-kernels"))


def parity_dir() -> pathlib.Path:
  """Golden parity vectors: $DPMAMBA_PARITY_DIR or <repo>/../shared/parity."""
  return pathlib.Path(os.environ.get("DPMAMBA_PARITY_DIR", SHARED_DIR / "parity"))


def shared_data_dir() -> pathlib.Path:
  """Semi-real scenes: <repo>/../shared/data."""
  return SHARED_DIR / "data"


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory):
  """The text-feature and XLA compile caches ($DPMAMBA_CACHE_DIR/{text,xla}) of the CLIs run in
  this process in a temp folder of its own (each xdist worker has its own), never the user's
  ~/.cache: tests running in parallel share no cache files. Modules that need fresh caches still
  set their own (cli_errors.private_text_cache)."""
  root = tmp_path_factory.mktemp("dpmamba-cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DPMAMBA_CACHE_DIR", str(root))
    mp.delenv("DPMAMBA_XLA_CACHE_DIR", raising=False)
    yield
