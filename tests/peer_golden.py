"""Shared by the comparison methods' parity tests (tests/test_peers_*.py): the tolerance and the
helpers for reading their golden files (../shared/parity/peers/<method>_*.npz)."""
import json

import jax
import numpy as np
from flax import nnx

from conftest import parity_dir

REL = 1e-4  # relative to the largest magnitude of the reference


def assert_close(actual, ref, what: str = "") -> None:
  """Equal up to REL * max|ref| elementwise."""
  ref = np.asarray(ref, np.float32)
  atol = REL * max(float(np.abs(ref).max()), 1e-6)
  np.testing.assert_allclose(np.asarray(actual), ref, rtol=0, atol=atol, err_msg=what)


class KeyRecorder(dict):
  """A dict that remembers which keys were read (an importer that skips a weight shows)."""

  def __init__(self, *a):
    super().__init__(*a)
    self.read = set()

  def __getitem__(self, k):
    self.read.add(k)
    return super().__getitem__(k)


class GoldenFile:
  """One golden file: its arrays by key (`golden["outputs/logits"]`, `.arrays`), `.meta` (the
  "meta/json" entry) and the PyTorch state dict as `.params` ("params/...") and `.buffers`
  ("buffers/..."), keys without their prefix. A test's own Golden adds its inputs and model."""

  def __init__(self, path):
    with np.load(path) as f:
      self.arrays = {k: f[k] for k in f.files if k != "meta/json"}
      self.meta = json.loads(str(f["meta/json"]))
    self.params = self.group("params/")
    self.buffers = self.group("buffers/")

  def group(self, prefix: str) -> dict:
    """The arrays whose keys start with `prefix`, keyed without it."""
    return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}

  def __getitem__(self, key: str) -> np.ndarray:
    return self.arrays[key]


def golden_files(method: str) -> list:
  """The method's golden files, <parity dir>/peers/<method>_*.npz (sorted)."""
  return sorted((parity_dir() / "peers").glob(f"{method}_*.npz"))


def shell(build, fill=np.zeros):
  """The module `build()` returns, traced from shapes only (its random initialisers never run:
  eager jax ops compile once per shape and dominate a test's time), every variable the host
  array fill(shape, dtype), one transfer each."""
  model = nnx.eval_shape(build)
  nnx.update(model, jax.tree.map(lambda s: jax.device_put(fill(s.shape, s.dtype)),
                                 nnx.state(model)))
  return model
