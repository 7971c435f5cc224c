"""Numerical parity with the authors' PyTorch DPMamba (golden vectors, see <parity dir>/README.md).

Runs over every ``*.npz`` in $DPMAMBA_PARITY_DIR (default <repo>/../shared/parity) that has a
``meta/json`` key. All shapes and the configuration come from the file: nothing is hard-coded
to one patch size, batch, band count or class count. Skips when the directory is absent.
"""
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpmamba_jax.model import scan, torch_import

REPO = pathlib.Path(__file__).resolve().parents[1]
PARITY_DIR = pathlib.Path(os.environ.get("DPMAMBA_PARITY_DIR", REPO.parent / "shared" / "parity"))

# Tolerances: README §6 suggests atol 2e-5 (or rtol 1e-5 + atol 1e-5) for per-pixel
# intermediates and atol 1e-5 for head_pooled; the issue asks <= 1e-5 on the standalone SSM and
# <= 1e-4 on V. The measured errors are printed (pytest -s).
TOL_PIXEL = dict(atol=2e-5, rtol=1e-5)
TOL_SSM = dict(atol=1e-5, rtol=0.0)  # the bound for the standalone SSM module
TOL_POOLED = dict(atol=1e-5, rtol=0.0)
TOL_V = dict(atol=1e-4, rtol=0.0)
TOL_LOGITS = dict(atol=1e-4, rtol=0.0)


def _golden_files():
  if not PARITY_DIR.is_dir():
    return []
  out = []
  for f in sorted(PARITY_DIR.glob("*.npz")):
    with np.load(f, allow_pickle=False) as z:
      if "meta/json" in z.files and "input/x0" in z.files:  # forward files, not the _train ones
        out.append(f)
  return out


FILES = _golden_files()
if FILES:
  PARAMS = [pytest.param(f, id=f.stem) for f in FILES]
else:
  PARAMS = [pytest.param(None, marks=pytest.mark.skip(
      reason=f"no golden parity files (*.npz with meta/json) in {PARITY_DIR}; "
             "set DPMAMBA_PARITY_DIR"))]


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1) if np.ndim(a) == 4 else np.asarray(a)


def _check(name, got, want, tol):
  """Asserts closeness; returns and prints the max abs error."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape} vs golden {want.shape}"
  err = float(np.abs(got - want).max())
  print(f"parity {name}: max abs err {err:.3g} (|golden| max {np.abs(want).max():.3g})")
  ok = np.abs(got - want) <= tol["atol"] + tol["rtol"] * np.abs(want)
  assert ok.all(), f"{name}: max abs err {err:.3g} exceeds atol {tol['atol']} rtol {tol['rtol']}"
  return err


def _forward_fn(model):
  graphdef = nnx.graphdef(model)

  @jax.jit
  def forward(state, xs, mask):
    details = {}
    v = nnx.merge(graphdef, state)(xs, mask, details=details)
    return v, details

  return lambda xs, mask: forward(nnx.state(model), xs, mask)


class Golden:
  """One golden file, its imported teacher/student and their outputs (computed once)."""

  def __init__(self, path):
    with np.load(path, allow_pickle=False) as z:
      self.d = {k: z[k] for k in z.files}
    self.meta = json.loads(str(self.d["meta/json"]))
    self.num_modalities = sum(1 for k in self.d if re.fullmatch(r"input/x\d+", k))
    self.xs = [jnp.asarray(_nhwc(self.d[f"input/x{m}"])) for m in range(self.num_modalities)]
    self.scenarios = sorted(k[len("input/"):] for k in self.d if k.startswith("input/mask_"))
    p = int(self.meta["patch"])
    with jax.default_matmul_precision("highest"):
      self.teacher, self.t_cfg = torch_import.import_state_dict(
          self.d, prefix="teacher/", patch_size=p, source=f"{path}[teacher/]")
      self.student, self.s_cfg = torch_import.import_state_dict(
          self.d, prefix="student/", source=f"{path}[student/]")
      self.v_teacher, self.det_teacher = _forward_fn(self.teacher)(self.xs, None)
      run_s = _forward_fn(self.student)
      self.v_student = {"complete": run_s(self.xs, None)[0]}
      self.det_student = {}
      for sc in self.scenarios:
        mask = jnp.asarray(self.d[f"input/{sc}"])
        self.v_student[sc], self.det_student[sc] = run_s(self.xs, mask)


@pytest.fixture(scope="module", params=PARAMS)
def golden(request):
  return Golden(request.param)


def test_config_from_arrays_matches_meta(golden):
  meta, cfg = golden.meta, golden.t_cfg
  assert cfg.bands == tuple(meta["bands"])
  assert cfg.patch_size == meta["patch"] == golden.s_cfg.patch_size
  assert (cfg.hidden, cfg.depth, cfg.d_state) == (meta["hidden"], meta["depth"], meta["d_state"])
  assert cfg.num_modalities == meta["modalities"] == golden.num_modalities
  assert not cfg.prompts and golden.s_cfg.prompts


def test_zigzag_paths_exact(golden):
  sizes = sorted({int(m.group(1)) for k in golden.d for m in [re.match(r"zigzag/P(\d+)/", k)] if m})
  assert golden.meta["patch"] in sizes
  for p in sizes:
    paths = scan.zigzag_paths(p)
    inv = scan.inverse_paths(paths)
    for k in range(4):
      np.testing.assert_array_equal(paths[k], golden.d[f"zigzag/P{p}/path{k}"], err_msg=f"P{p} {k}")
      np.testing.assert_array_equal(inv[k], golden.d[f"zigzag/P{p}/inv{k}"], err_msg=f"P{p} {k}")


def test_standalone_ssm(golden):
  d = golden.d
  module = golden.meta.get("ssm_module", "Modality_Aware_Mamba.0.IMSM.0")
  pre = f"teacher/{module}."
  x_proj = d[pre + "x_proj_weight"].transpose(0, 2, 1)  # (K, D, R+2N)
  a_log, dt_bias = d[pre + "A_logs"], d[pre + "dt_projs_bias"]
  d_skip = d[pre + "Ds"].reshape(a_log.shape[0], -1)  # (K, D)
  assert not np.any(d[pre + "initial_state"])
  u = _nhwc(d["input/ssm_u"])
  b, p, _, c = u.shape
  with jax.default_matmul_precision("highest"):
    y = jax.jit(lambda u: scan.selective_scan(u, x_proj, dt_bias, a_log, d_skip,
                                              scan.zigzag_paths(p)))(u.reshape(b, p * p, c))
  _check("ssm_y", np.asarray(y).reshape(b, p, p, c), _nhwc(d["output/ssm_y"]), TOL_SSM)


def test_teacher_intermediates(golden):
  pre = "intermediate/teacher/"
  keys = [k for k in golden.d if k.startswith(pre)]
  assert any("block0_detail" in k for k in keys) and any("head_pooled" in k for k in keys)
  for key in sorted(keys):
    name = key[len(pre):]
    tol = TOL_POOLED if name == "head_pooled" else TOL_PIXEL
    _check(f"teacher/{name}", golden.det_teacher[name], _nhwc(golden.d[key]), tol)


def test_student_intermediates(golden):
  for sc in golden.scenarios:
    pre = f"intermediate/student_{sc}/"
    for key in sorted(k for k in golden.d if k.startswith(pre)):
      name = key[len(pre):]
      tol = TOL_POOLED if name == "head_pooled" else TOL_PIXEL
      _check(f"student_{sc}/{name}", golden.det_student[sc][name], _nhwc(golden.d[key]), tol)


def test_head_outputs(golden):
  d = golden.d
  _check("V_teacher", golden.v_teacher, d["output/V_teacher"], TOL_V)
  _check("V_student_complete", golden.v_student["complete"], d["output/V_student_complete"], TOL_V)
  assert golden.scenarios, "no input/mask_* scenarios in the golden file"
  for sc in golden.scenarios:
    _check(f"V_student_{sc}", golden.v_student[sc], d[f"output/V_student_{sc}"], TOL_V)


def _logits(v, z, scale):
  v = np.asarray(v, np.float64)
  z = np.asarray(z, np.float64)
  v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
  z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)
  return scale * v @ z.T


def test_logits_and_predictions_exact(golden):
  d = golden.d
  z, scale = d["input/Z_text"], float(d["loss/logit_scale"])
  outs = {"teacher": golden.v_teacher,
          **{f"student_{k}": v for k, v in golden.v_student.items()}}
  for name in ("teacher", "student_mask_cycle"):
    if f"output/logits_{name}" in d:
      _check(f"logits_{name}", _logits(outs[name], z, scale), d[f"output/logits_{name}"],
             TOL_LOGITS)
  checked = 0
  for name, v in outs.items():
    key = f"output/pred_{name}"
    if key in d:
      pred = _logits(v, z, scale).argmax(axis=1)
      np.testing.assert_array_equal(pred, d[key], err_msg=name)
      checked += 1
  assert checked == len(outs)


def test_export_reproduces_state_dict(golden):
  """torch_import's inverse maps the imported teacher/student back to the file's arrays."""
  for who, model in (("teacher", golden.teacher), ("student", golden.student)):
    ref = torch_import.strip_prefix(golden.d, f"{who}/")
    out = torch_import.export_state_dict(model)
    assert sorted(out) == sorted(ref), who
    for k in ref:
      np.testing.assert_array_equal(out[k], ref[k], err_msg=f"{who}/{k}")
