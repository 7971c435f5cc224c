"""Shared test setup: CPU by default, and locations of the optional ../shared assets."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def parity_dir() -> pathlib.Path:
  """Golden parity vectors: $DPMAMBA_PARITY_DIR or <repo>/../shared/parity."""
  return pathlib.Path(os.environ.get("DPMAMBA_PARITY_DIR", SHARED_DIR / "parity"))


def shared_data_dir() -> pathlib.Path:
  """Semi-real scenes: <repo>/../shared/data."""
  return SHARED_DIR / "data"
