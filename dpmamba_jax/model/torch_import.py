"""The authors' PyTorch state-dict names and layouts <-> this model's NNX state.

Names are those of the reference ``DPMamba`` module (parity README, "State-dict names"). Layouts:
conv OIHW -> HWIO, linear (out, in) -> (in, out), attention score (1, D, 1, 1) -> (D, 1),
SSM ``x_proj_weight`` (K, R+2N, D) -> (K, D, R+2N), ``Ds`` (K, R, D/R) -> (K, D), prompts
(D, P, P) -> (P, P, D). ``initial_state`` (the reference's carried-over SSM state, spec §2.8) and
``num_batches_tracked`` are accepted and ignored: this model always starts the scan from zero.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpmamba_jax.errors import UserError
from dpmamba_jax.model.network import DPMamba, ModelConfig

Path = tuple
IGNORED_SUFFIXES = (".initial_state", ".num_batches_tracked")

# kind -> (torch array -> jax array, jax shape -> torch shape)
_LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda a: a, lambda s: tuple(s)),
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1])),
    "linear": (lambda a: a.T, lambda s: (s[1], s[0])),
    "score": (lambda a: a.reshape(a.shape[0], -1).T, lambda s: (s[1], s[0], 1, 1)),
    "x_proj": (lambda a: a.transpose(0, 2, 1), lambda s: (s[0], s[2], s[1])),
    "prompt": (lambda a: a.transpose(1, 2, 0), lambda s: (s[2], s[0], s[1])),
}
_INVERSE: dict[str, Callable] = {
    "same": lambda a: a,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "linear": lambda a: a.T,
    "score": lambda a: a.T.reshape(a.shape[1], a.shape[0], 1, 1),
    "x_proj": lambda a: a.transpose(0, 2, 1),
    "prompt": lambda a: a.transpose(2, 0, 1),
}


def name_map(cfg: ModelConfig) -> dict[str, tuple[Path, str]]:
  """torch name -> (NNX state path, layout kind) for every trainable array and running stat."""
  out: dict[str, tuple[Path, str]] = {}

  def ln(torch_prefix, path):
    out[f"{torch_prefix}.weight"] = (path + ("scale",), "same")
    out[f"{torch_prefix}.bias"] = (path + ("bias",), "same")

  def conv(torch_prefix, path, kind="conv"):
    out[f"{torch_prefix}.weight"] = (path + ("kernel",), kind)
    out[f"{torch_prefix}.bias"] = (path + ("bias",), "same")

  def ssm(torch_prefix, path):
    out[f"{torch_prefix}.x_proj_weight"] = (path + ("x_proj",), "x_proj")
    out[f"{torch_prefix}.A_logs"] = (path + ("a_log",), "same")
    out[f"{torch_prefix}.Ds"] = (path + ("d_skip",), "ds")
    out[f"{torch_prefix}.dt_projs_bias"] = (path + ("dt_bias",), "same")

  m_count = cfg.num_modalities
  for m in range(m_count):
    conv(f"patch_embedding.{m}.0", ("embed", m, "conv"))
    bn = ("embed", m, "bn")
    out[f"patch_embedding.{m}.1.weight"] = (bn + ("scale",), "same")
    out[f"patch_embedding.{m}.1.bias"] = (bn + ("bias",), "same")
    out[f"patch_embedding.{m}.1.running_mean"] = (bn + ("mean",), "same")
    out[f"patch_embedding.{m}.1.running_var"] = (bn + ("var",), "same")
    ln(f"norm.{m}", ("embed", m, "norm"))
    if cfg.prompts:
      out[f"prompt_spe_m.{m}"] = (("prompts", m), "prompt")
  for d in range(cfg.depth):
    t, j = f"Modality_Aware_Mamba.{d}", ("blocks", d)
    for m in range(m_count):
      ln(f"{t}.LN1.{m}", j + ("ln1", m))
      ln(f"{t}.LN3.{m}", j + ("ln3", m))
      conv(f"{t}.AttFusion.{m}.attention_layer", j + ("af", m, "score"), "score")
      conv(f"{t}.Conv2D.{m}.0", j + ("conv", m))
      ssm(f"{t}.IMSM.{m}", j + ("ssm", m))
      conv(f"{t}.out_proj.{m}", j + ("out_proj", m), "linear")
    if m_count >= 2:
      ln(f"{t}.LN2", j + ("ln2",))
      conv(f"{t}.Cat_AttFusion.attention_layer", j + ("cross_af", "score"), "score")
      conv(f"{t}.Cat_Conv2D.0", j + ("cross_conv",))
      ssm(f"{t}.Cat_IMSM", j + ("cross_ssm",))
      conv(f"{t}.Cat_proj", j + ("cross_proj",), "linear")
  ln("project.norm", ("head_norm",))
  conv("project.head", ("head",), "linear")
  return out


def _to_torch_shape(kind: str, jax_shape, cfg: ModelConfig):
  if kind == "ds":
    r = cfg.heads_per_direction
    return (jax_shape[0], r, jax_shape[1] // r)
  return _LAYOUTS[kind][1](jax_shape)


def _to_jax(kind: str, arr: np.ndarray, jax_shape) -> np.ndarray:
  if kind == "ds":
    return arr.reshape(jax_shape)
  return _LAYOUTS[kind][0](arr)


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
  """Keys under `prefix` (e.g. "teacher/"), with it removed; also drops a DataParallel "module."."""
  out = {}
  for k, v in state_dict.items():
    if prefix and not k.startswith(prefix):
      continue
    k = k[len(prefix):]
    if k.startswith("module."):
      k = k[len("module."):]
    out[k] = v
  return out


def _shape(a) -> tuple:
  return tuple(np.shape(a))


def infer_config(state_dict: Mapping[str, np.ndarray], *, patch_size: int | None = None,
                 **overrides) -> ModelConfig:
  """ModelConfig from a reference state dict (already without prefix).

  bands from ``patch_embedding.{m}.0.weight``, depth from ``Modality_Aware_Mamba.{d}``, heads and
  d_state from the SSM arrays, out_dim from ``project.head.weight``, prompts / P from
  ``prompt_spe_m.{m}``. A teacher (no prompts) needs `patch_size`.
  """
  sd = state_dict
  bands = []
  while f"patch_embedding.{len(bands)}.0.weight" in sd:
    w = sd[f"patch_embedding.{len(bands)}.0.weight"]
    if np.ndim(w) != 4:
      raise UserError(f"state dict key 'patch_embedding.{len(bands)}.0.weight' has shape "
                      f"{_shape(w)}, expected (hidden, bands, 3, 3)")
    bands.append(int(np.shape(w)[1]))
  if not bands:
    raise UserError("state dict has no 'patch_embedding.0.0.weight': not a DPMamba state dict "
                    f"(first keys: {sorted(sd)[:3]}); wrong --prefix?")
  hidden = int(np.shape(sd["patch_embedding.0.0.weight"])[0])
  blocks = {int(m.group(1)) for k in sd for m in [re.match(r"Modality_Aware_Mamba\.(\d+)\.", k)] if m}
  depth = max(blocks) + 1 if blocks else 0
  kw: dict = dict(bands=tuple(bands), hidden=hidden, depth=depth)
  if depth:
    a_key, x_key = "Modality_Aware_Mamba.0.IMSM.0.A_logs", "Modality_Aware_Mamba.0.IMSM.0.x_proj_weight"
    for key in (a_key, x_key):
      if key not in sd:
        raise UserError(f"state dict is missing key '{key}'")
    r = int(np.shape(sd[a_key])[-1])
    kw.update(heads_per_direction=r, d_state=max(1, (int(np.shape(sd[x_key])[1]) - r) // 2))
  if "project.head.weight" in sd:
    kw["out_dim"] = int(np.shape(sd["project.head.weight"])[0])
  prompts = "prompt_spe_m.0" in sd
  kw["prompts"] = prompts
  if prompts:
    p = int(np.shape(sd["prompt_spe_m.0"])[-1])
    if patch_size is not None and int(patch_size) != p:
      raise UserError(f"--patch-size {patch_size} does not match the prompts' P = {p} "
                      f"('prompt_spe_m.0' has shape {_shape(sd['prompt_spe_m.0'])})")
    kw["patch_size"] = p
  elif patch_size is None:
    raise UserError("state dict has no prompts ('prompt_spe_m.0'), so the patch size is unknown: "
                    "pass --patch-size P")
  else:
    kw["patch_size"] = int(patch_size)
  kw.update(overrides)
  return ModelConfig(**kw)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig,
                       *, source: str = "state dict") -> tuple[dict[Path, np.ndarray], list[str]]:
  """Reference names/layouts -> {NNX path: float32 array}; also returns the ignored keys.

  Raises UserError naming the key for a missing, unexpected or mis-shaped array.
  """
  names = name_map(cfg)
  abstract = dict(nnx.to_flat_state(nnx.state(nnx.eval_shape(
      lambda: DPMamba(cfg, rngs=nnx.Rngs(0))))))
  missing = [k for k in names if k not in state_dict]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise UserError(f"{source}: missing key '{missing[0]}'{more} for config bands={cfg.bands} "
                    f"depth={cfg.depth} prompts={cfg.prompts}")
  ignored = [k for k in state_dict if k not in names and k.endswith(IGNORED_SUFFIXES)]
  unexpected = [k for k in state_dict if k not in names and k not in ignored]
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise UserError(f"{source}: unexpected key '{unexpected[0]}'{more} for config "
                    f"bands={cfg.bands} depth={cfg.depth} prompts={cfg.prompts}")
  out = {}
  for key, (path, kind) in names.items():
    arr = np.asarray(state_dict[key])
    jax_shape = tuple(abstract[path].shape)
    want = tuple(_to_torch_shape(kind, jax_shape, cfg))
    if arr.shape != want:
      raise UserError(f"{source}: key '{key}' has shape {arr.shape}, expected {want}")
    if not np.issubdtype(arr.dtype, np.floating):
      raise UserError(f"{source}: key '{key}' has dtype {arr.dtype}, expected a float array")
    out[path] = np.ascontiguousarray(_to_jax(kind, arr, jax_shape), dtype=np.float32)
  return out, ignored


def load_state_dict(model: DPMamba, state_dict: Mapping[str, np.ndarray], *,
                    source: str = "state dict") -> list[str]:
  """Overwrites `model`'s parameters and running stats from a reference state dict (no prefix).

  Returns the ignored keys (initial_state, num_batches_tracked).
  """
  arrays, ignored = convert_state_dict(state_dict, model.cfg, source=source)
  flat = nnx.to_flat_state(nnx.state(model))
  paths = {p for p, _ in flat}
  not_set = sorted(paths - set(arrays), key=str)
  if not_set:  # every model variable must come from the file
    raise UserError(f"{source}: no key maps to model variable {'/'.join(map(str, not_set[0]))}")
  new = nnx.from_flat_state([(p, jnp.asarray(arrays[p])) for p, _ in flat])
  nnx.update(model, new)
  return ignored


def import_state_dict(state_dict: Mapping[str, np.ndarray], *, prefix: str = "",
                      patch_size: int | None = None, source: str = "state dict",
                      **overrides) -> tuple[DPMamba, ModelConfig]:
  """Builds a DPMamba (config inferred from shapes) holding the reference weights."""
  sd = strip_prefix(state_dict, prefix)
  if not sd:
    raise UserError(f"{source}: no keys start with prefix {prefix!r}")
  cfg = infer_config(sd, patch_size=patch_size, **overrides)
  model = DPMamba(cfg, rngs=nnx.Rngs(0))
  load_state_dict(model, sd, source=source)
  return model, cfg


def export_state_dict(model: DPMamba) -> dict[str, np.ndarray]:
  """This model's state in the reference's names and layouts (the inverse of load_state_dict).

  ``initial_state`` is written as zeros and ``num_batches_tracked`` as 0, as the reference has them.
  """
  cfg = model.cfg
  flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
  out = {}
  for key, (path, kind) in name_map(cfg).items():
    a = flat[path]
    if kind == "ds":
      r = cfg.heads_per_direction
      out[key] = a.reshape(a.shape[0], r, a.shape[1] // r)
    else:
      out[key] = _INVERSE[kind](a)
    out[key] = np.ascontiguousarray(out[key], np.float32)
    if key.endswith(".x_proj_weight"):
      k = cfg.heads_per_direction
      out[key[:-len("x_proj_weight")] + "initial_state"] = np.zeros(
          (1, 4 * k, cfg.hidden // k, cfg.d_state), np.float32)
    if key.endswith(".running_var"):
      out[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out
