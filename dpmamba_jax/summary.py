"""Trainable parameter counts of the teacher and the student, per component.

  python -m dpmamba_jax.summary --dataset trento [--json]
  python -m dpmamba_jax.summary --bands 48,4,1 --patch-size 9
  python -m dpmamba_jax.summary --method mshnet --dataset trento   (a comparison method's models)

Counts cover nnx.Param only (BatchNorm running statistics are reported separately). Nothing is
allocated: the model is built abstractly with nnx.eval_shape.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
from flax import nnx

from dpmamba_jax import config as config_lib
from dpmamba_jax import errors
from dpmamba_jax import method as method_lib
from dpmamba_jax import methods
from dpmamba_jax.data import datasets
from dpmamba_jax.errors import UserError
from dpmamba_jax.model.network import ModelConfig, abstract_model


def component_counts(cfg: ModelConfig) -> dict:
  """{"components": {name: n}, "block_detail": {name: n}, "total": n, "batch_stats": n}.

  Components: ``embed.{m}``, ``block.{d}``, ``head`` (LayerNorm + Linear), ``prompts``.
  ``block_detail`` splits each block into ``block.{d}.cross`` and ``block.{d}.m{m}``.
  """
  model = abstract_model(cfg)
  comps: dict[str, int] = OrderedDict()
  for m in range(cfg.num_modalities):
    comps[f"embed.{m}"] = 0
  for d in range(cfg.depth):
    comps[f"block.{d}"] = 0
  comps["head"] = 0
  comps["prompts"] = 0
  detail: dict[str, int] = OrderedDict()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    n = int(np.prod(var.shape))
    top = path[0]
    if top == "embed":
      comps[f"embed.{path[1]}"] += n
    elif top == "blocks":
      comps[f"block.{path[1]}"] += n
      per_modality = isinstance(path[3], int)  # ln1/ln3/af/conv/ssm/out_proj are lists over m
      sub = f"block.{path[1]}." + (f"m{path[3]}" if per_modality else "cross")
      detail[sub] = detail.get(sub, 0) + n
    elif top in ("head", "head_norm"):
      comps["head"] += n
    elif top == "prompts":
      comps["prompts"] += n
    else:  # a new top-level module: still counted
      comps[top] = comps.get(top, 0) + n
  stats = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)))
  return {"components": dict(comps), "block_detail": dict(sorted(detail.items())),
          "total": sum(comps.values()), "batch_stats": stats}


def summarize(cfg: ModelConfig) -> dict:
  """Teacher (prompts off) and student (prompts on) counts for the same backbone config."""
  return {"config": cfg.replace(prompts=False).to_dict(),
          "teacher": component_counts(cfg.replace(prompts=False)),
          "student": component_counts(cfg.replace(prompts=True))}


def format_summary(summary: dict, title: str, modality_names=None) -> str:
  """Human-readable table of `summarize`'s result."""
  cfg = summary["config"]
  t, s = summary["teacher"], summary["student"]
  lines = [f"DPMamba {title}: bands {tuple(cfg['bands'])}, patch {cfg['patch_size']}, "
           f"hidden {cfg['hidden']}, depth {cfg['depth']}, d_state {cfg['d_state']}, "
           f"out {cfg['out_dim']}",
           f"{'component':<28}{'teacher':>12}{'student':>12}"]
  for name in s["components"]:
    label = name
    if name.startswith("embed.") and modality_names:
      label = f"{name} ({modality_names[int(name.split('.')[1])]})"
    lines.append(f"{label:<28}{t['components'].get(name, 0):>12,}{s['components'][name]:>12,}")
    if name.startswith("block."):
      for sub, n in s["block_detail"].items():
        if sub.startswith(name + "."):
          lines.append(f"{'  ' + sub:<28}{t['block_detail'].get(sub, 0):>12,}{n:>12,}")
  lines.append(f"{'total trainable':<28}{t['total']:>12,}{s['total']:>12,}")
  lines.append(f"{'BatchNorm running stats':<28}{t['batch_stats']:>12,}{s['batch_stats']:>12,}")
  return "\n".join(lines)


def method_counts(name: str, dataset: str) -> dict:
  """{"method", "dataset", "bands", "patch_size", "models": {stage model: {"params",
  "batch_stats"}}} of a comparison method's models at its settings for `dataset` (abstract)."""
  cfg, spec = config_lib.resolve({"method": name, "dataset": dataset}, methods.defaults)
  meth = methods.get(name)
  shapes = method_lib.Shapes.of(spec, cfg.patch_size)
  why = meth.check(shapes)
  if why:
    raise UserError(f"--method {name}: {why}")
  stages = meth.stages(cfg, shapes)

  def build_all() -> dict:  # one trace: later stages read the earlier (abstract) models
    models: dict = {}
    for stage in stages:
      models[stage.model] = stage.build({k: models[k] for k in stage.reads}, shapes, 0)[0]
    return models

  out: dict = OrderedDict()
  abstract = nnx.eval_shape(build_all)
  for stage in stages:
    model = abstract[stage.model]
    out[stage.model] = {
        "params": sum(int(np.prod(v.shape)) for _, v in
                      nnx.to_flat_state(nnx.state(model, nnx.Param))),
        "batch_stats": sum(int(np.prod(v.shape)) for _, v in
                           nnx.to_flat_state(nnx.state(model, nnx.BatchStat)))}
  return {"method": name, "dataset": spec.name, "bands": list(shapes.bands),
          "patch_size": shapes.patch_size, "models": dict(out)}


def format_method_counts(counts: dict) -> str:
  lines = [f"{methods.get(counts['method']).title} on {counts['dataset']}: bands "
           f"{tuple(counts['bands'])}, patch {counts['patch_size']}",
           f"{'model (stage)':<28}{'trainable':>12}{'BN stats':>12}"]
  for name, c in counts["models"].items():
    lines.append(f"{name:<28}{c['params']:>12,}{c['batch_stats']:>12,}")
  return "\n".join(lines)


def _parse_ints(text: str, name: str) -> tuple[int, ...]:
  try:
    vals = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise UserError(f"{name} {text!r}: expected comma-separated ints, e.g. 63,1") from None
  if not vals:
    raise UserError(f"{name} {text!r}: expected at least one int")
  return vals


@errors.cli_entry
def main(argv=None) -> int:
  ap = errors.ArgumentParser(prog="python -m dpmamba_jax.summary", description=__doc__.split("\n")[0])
  ap.add_argument("--dataset", help="dataset name (trento, houston, augsburg, ...)")
  ap.add_argument("--bands", help="comma-separated model bands per modality (instead of --dataset)")
  ap.add_argument("--patch-size", type=int, help="patch size P (default: the dataset's)")
  ap.add_argument("--hidden", type=int, default=None)
  ap.add_argument("--depth", type=int, default=None)
  ap.add_argument("--method", default="dpmamba", metavar="NAME",
                  help=f"training method: {', '.join(config_lib.METHODS)} (dpmamba)")
  ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
  args = ap.parse_args(argv)
  if args.method != "dpmamba":
    methods.get(args.method)  # a UserError listing the methods
    if not args.dataset or args.bands or args.hidden or args.depth or args.patch_size:
      raise UserError(f"--method {args.method}: give --dataset NAME only (the method's own "
                      "settings for it are counted)")
    counts = method_counts(args.method, args.dataset)
    print(json.dumps(counts, indent=1) if args.json else format_method_counts(counts))
    return 0
  over = {k: v for k, v in (("hidden", args.hidden), ("depth", args.depth)) if v is not None}
  names = None
  if args.dataset:
    spec = datasets.get_spec(args.dataset)
    if args.bands:
      over["bands"] = _parse_ints(args.bands, "--bands")
    if args.patch_size:
      over["patch_size"] = args.patch_size
    cfg = ModelConfig.for_dataset(spec, **over)
    title, names = spec.name, spec.modalities
  elif args.bands:
    if not args.patch_size:
      raise UserError("--bands needs --patch-size P")
    cfg = ModelConfig(bands=_parse_ints(args.bands, "--bands"), patch_size=args.patch_size, **over)
    title = "custom"
  else:
    raise UserError("give --dataset NAME or --bands B0,B1,... --patch-size P")
  result = summarize(cfg)
  if args.json:
    print(json.dumps({"dataset": title, **result}, indent=1))
  else:
    print(format_summary(result, title, names))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
