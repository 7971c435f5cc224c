"""Runs or collects the paper's experiment grid and writes its Tables 1-3 (mean ± std over seeds).

  python tools/report.py --runs-root runs/grid --dataset trento \\
      --data-dir ../shared/data/trento-semireal --seeds 0 1 2 --run [--epochs 100]
  python tools/report.py --runs-root runs/grid            # collect only: tables from metrics.json
  python tools/report.py --runs-root runs/table1 --dataset trento \
      --data-dir ../shared/data/trento-semireal --seeds 0 --table1 --run   # with the peers

Grid: datasets x variants x seeds; run (dataset, variant, seed) lives in
<runs-root>/<dataset>/<variant>/seed<s>/ and is a normal `python -m dpmamba_jax.train` run (in a
subprocess) with the variant's `--set` switches (VARIANTS below). With --run, runs whose
metrics.json exists are kept (the train CLI also resumes interrupted ones); the others are
trained and evaluated. Variant-1 and Variant-3 change only the student, so they distill from the
DPMamba run's teacher of the same seed (`--stage distill --teacher-ckpt`): pretraining is
deterministic, so this equals training their own teacher, at half the cost.

Tables (Markdown, written to --out, default <runs-root>/report.md):
  Table 1: single-modality nets, then per scenario the Baseline (teacher, zero-filled) and
    DPMamba; datasets with the same number of modalities side by side. With --table1 (or peer
    --variants) also the paper's comparison methods (`--method`, at their own settings): ShaSpec,
    DGDNet and MSH-Net under the missing-modality scenarios, HCT, Sal2RN and Cross-HL under
    complete modalities, and as extra lines the fusion methods zero-filled and trained with
    modality dropout.
  Table 2: per dataset, Baseline vs DPMamba for every scenario.
  Table 3: the ablation variants and DPMamba over the missing-modality scenarios (plus complete).
Cells are mean ± std (sample std) over the seeds found (a bare value for one run); "—" where no
run is there; "(n=k)" where only k of the requested seeds are there. A note gives the epochs used
when they differ from the paper's 500.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from dpmamba_jax import config, errors, fileio, methods  # noqa: E402
from dpmamba_jax import method as method_lib  # noqa: E402
from dpmamba_jax.data import datasets  # noqa: E402
from dpmamba_jax import masks as masks_lib  # noqa: E402

# name -> (label in the tables, --set switches). Order = run order (dpmamba first: its teacher
# is shared by the student-only variants).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dpmamba": ("DPMamba (ours)", ()),
    "variant1": ("Variant-1 (TBD replaced)", ("distill=kl",)),
    "variant2a": ("Variant-2a (Backbone replaced)", ("backbone=vit",)),
    "variant2b": ("Variant-2b (AF replaced)", ("fusion=add",)),
    "variant2c": ("Variant-2c (MISM replaced)", ("mixer=dwconv",)),
    "variant3": ("Variant-3 (W/o MMAPs)", ("prompts=false",)),
    "hsi-net": ("HSI-Net", ("modalities=HSI",)),
    "lidar-net": ("LiDAR-Net", ("modalities=LiDAR",)),
    "sar-net": ("SAR-Net", ("modalities=SAR",)),
    # the paper's comparison methods (dpmamba_jax/peers/), at their own settings
    "shaspec": ("ShaSpec", ("method=shaspec",)),
    "dgdnet": ("DGDNet", ("method=dgdnet",)),
    "mshnet": ("MSH-Net", ("method=mshnet",)),
    "hct": ("HCT", ("method=hct",)),
    "sal2rn": ("Sal2RN", ("method=sal2rn",)),
    "crosshl": ("Cross-HL", ("method=crosshl",)),
    "hct-dropout": ("HCT + modality dropout", ("method=hct", "modality_dropout=true")),
    "sal2rn-dropout": ("Sal2RN + modality dropout", ("method=sal2rn", "modality_dropout=true")),
    "crosshl-dropout": ("Cross-HL + modality dropout",
                        ("method=crosshl", "modality_dropout=true")),
}
SHARED_TEACHER = ("variant1", "variant3")  # only the student differs from dpmamba
ABLATIONS = ("variant1", "variant2a", "variant2b", "variant2c", "variant3", "dpmamba")
NETS = {"HSI": "hsi-net", "LiDAR": "lidar-net", "SAR": "sar-net"}
MISSING_PEERS = ("shaspec", "dgdnet", "mshnet")    # built for missing modalities
FUSION_PEERS = ("hct", "sal2rn", "crosshl")        # complete inputs; scored zero-filled
DROPOUT_PEERS = tuple(f"{p}-dropout" for p in FUSION_PEERS)
PEERS = MISSING_PEERS + FUSION_PEERS + DROPOUT_PEERS
# --table1: the paper's Table 1 with every comparison method
TABLE1 = ("dpmamba", "hsi-net", "lidar-net", "sar-net") + PEERS
# without --variants or --table1: the DPMamba grid (Tables 1-3 without the comparison methods)
DPMAMBA_GRID = tuple(v for v in VARIANTS if v not in PEERS)
BASELINE = "Baseline (teacher, zero-filled)"
DASH = "—"


def method_of(variant: str) -> str:
  """The --method a variant runs (dpmamba unless its switches name another)."""
  return next((s.split("=", 1)[1] for s in VARIANTS[variant][1] if s.startswith("method=")),
              "dpmamba")


def applicable(variant: str, spec) -> bool:
  """Single-modality nets need their modality (and a multimodal dataset); a comparison method
  needs a dataset it takes (its `check`); the rest always run."""
  for mod, name in NETS.items():
    if variant == name:
      return mod in spec.modalities and spec.num_modalities > 1
  if variant not in VARIANTS:
    return False
  name = method_of(variant)
  if name == "dpmamba":
    return True
  cfg, resolved = config.resolve({"method": name, "dataset": spec.name}, methods.defaults)
  return methods.get(name).check(method_lib.Shapes.of(resolved, cfg.patch_size)) is None


def workdir(root: str, dataset: str, variant: str, seed: int) -> str:
  return os.path.join(root, dataset, variant, f"seed{seed}")


# ----------------------------------------------------------------------------------------------
# Running.


def train_command(root: str, dataset: str, variant: str, seed: int, *, epochs: int | None = None,
                  data_dir: str | None = None, maps: bool = False,
                  extra: Sequence[str] = ()) -> list[str]:
  """The `python -m dpmamba_jax.train` argv of one grid cell."""
  cmd = [sys.executable, "-m", "dpmamba_jax.train", "--dataset", dataset, "--seed", str(seed),
         "--workdir", workdir(root, dataset, variant, seed), "--quiet"]
  if epochs is not None:
    cmd += ["--epochs", str(epochs)]
  if data_dir:
    cmd += ["--data-dir", data_dir]
  for item in VARIANTS[variant][1]:
    cmd += ["--set", item]
  if not maps:
    cmd += ["--set", "maps=false"]
  teacher = os.path.join(workdir(root, dataset, "dpmamba", seed), "teacher")
  if variant in SHARED_TEACHER and os.path.isdir(teacher):
    cmd += ["--stage", "distill", "--teacher-ckpt", teacher]
  return cmd + list(extra)


def run_grid(root: str, dataset_names: Sequence[str], variants: Sequence[str],
             seeds: Sequence[int], *, epochs: int | None = None, data_dir: str | None = None,
             maps: bool = False, extra: Sequence[str] = (),
             log: Callable[[str], None] = print) -> list[str]:
  """Trains + evaluates every missing cell in subprocesses. Returns the cells that failed."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  failed = []
  order = [v for v in VARIANTS if v in variants]
  for dataset in dataset_names:
    spec = datasets.get_spec(dataset)
    for seed in seeds:
      for variant in order:
        if not applicable(variant, spec):
          continue
        wd = workdir(root, dataset, variant, seed)
        if os.path.isfile(os.path.join(wd, "metrics.json")):
          log(f"[{dataset}/{variant}/seed{seed}] done already")
          continue
        cmd = train_command(root, dataset, variant, seed, epochs=epochs, data_dir=data_dir,
                            maps=maps, extra=extra)
        log(f"[{dataset}/{variant}/seed{seed}] {shlex.join(cmd[1:])}")
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc
        if rc != 0:
          failed.append(f"{dataset}/{variant}/seed{seed}")
          log(f"[{dataset}/{variant}/seed{seed}] FAILED (exit {rc}); see {wd}/log.jsonl")
        else:  # ru_maxrss: KiB on Linux
          log(f"[{dataset}/{variant}/seed{seed}] {time.time() - t0:.0f} s, peak RSS "
              f"{usage.ru_maxrss / 2**20:.2f} GB")
  return failed


# ----------------------------------------------------------------------------------------------
# Collecting.


def collect(root: str, dataset_names: Sequence[str], variants: Sequence[str],
            seeds: Sequence[int]) -> dict[tuple[str, str], list[dict]]:
  """{(dataset, variant): [metrics dicts of the seeds found]}."""
  out = {}
  for dataset in dataset_names:
    for variant in variants:
      runs = []
      for seed in seeds:
        path = os.path.join(workdir(root, dataset, variant, seed), "metrics.json")
        if os.path.isfile(path):
          with open(path) as f:
            runs.append(json.load(f))
      out[(dataset, variant)] = runs
  return out


def _values(runs: Sequence[dict], key: str, scenario: str, metric: str) -> list[float]:
  return [float(r[key][scenario][metric]) for r in runs
          if scenario in r.get(key, {}) and metric in r[key][scenario]]


def cell(runs: Sequence[dict], key: str, scenario: str, metric: str, n_seeds: int) -> str:
  """"mean ± std" (sample std), the bare value for a single run (no std), "—" if no run has it,
  "(n=k)" if only k of the n_seeds runs are there."""
  vals = _values(runs, key, scenario, metric)
  if not vals:
    return DASH
  a = np.asarray(vals, np.float64)
  text = f"{a.mean():.2f} ± {np.std(a, ddof=1):.2f}" if a.size > 1 else f"{a[0]:.2f}"
  return text if a.size >= n_seeds else f"{text} (n={a.size})"


def _model_key(variant: str) -> str:
  """The metrics.json key of a variant's scored model: a comparison method's scored key (its
  name); DPMamba's student; a single-modality net's teacher (one modality: no student stage)."""
  if variant in NETS.values():
    return "teacher"
  name = method_of(variant)
  return "student" if name == "dpmamba" else methods.get(name).scored[0].key


def _present(modalities: Sequence[str], row) -> tuple[str, ...]:
  return tuple(modalities) if row is None else tuple(
      m for m, keep in zip(modalities, row) if keep > 0)


# ----------------------------------------------------------------------------------------------
# Tables.

METRICS = (("OA", "OA(%)"), ("AA", "AA(%)"), ("kappa", "κ(×100)"))


def _joined(names: Sequence[str]) -> str:
  out = []
  for n in names:
    if n not in out:
      out.append(n)
  return "/".join(out)


def _scenario_rows(i: int, variants: Sequence[str]) -> list[tuple[str, str, str]]:
  """(label, variant, metrics key) of Table 1's rows for scenario i (0 = complete): the paper's
  methods of that group, then the extra lines (the fusion methods zero-filled or trained with
  modality dropout; the missing-modality methods and the teacher on complete inputs)."""
  def rows(names, suffix=""):
    return [(VARIANTS[v][0] + suffix, v, _model_key(v)) for v in names if v in variants]
  ours = [("DPMamba (ours)", "dpmamba", "student")]
  if i == 0:
    return (rows(FUSION_PEERS) + ours + rows(MISSING_PEERS) + rows(DROPOUT_PEERS) +
            ([("Baseline (teacher)", "dpmamba", "teacher")] if any(
                v in variants for v in PEERS) else []))
  return ([(BASELINE, "dpmamba", "teacher")] + rows(MISSING_PEERS) + ours +
          rows(FUSION_PEERS, " (zero-filled)") + rows(DROPOUT_PEERS, " (zero-filled)"))


def table1(grid: dict, dataset_names: Sequence[str], n_seeds: int,
           variants: Sequence[str] = ()) -> str:
  """Paper Table 1 layout for datasets with the same number of modalities, side by side: the
  single-modality nets, then per missing-modality scenario the zero-filled DPMamba teacher, the
  missing-modality methods and DPMamba, and under complete modalities the fusion methods and
  DPMamba (the comparison methods in `variants` only; the others' cells as extra lines)."""
  specs = [datasets.get_spec(d) for d in dataset_names]
  m = specs[0].num_modalities
  header = ["Method"]
  for s in specs:
    header += [f"{s.name} Training Modalities", f"{s.name} Testing Modalities"]
    header += [f"{s.name} {label}" for _, label in METRICS]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  blank = ["" for _ in header[1:]]

  def section(title):
    lines.append("| " + " | ".join([f"*{title}*"] + blank) + " |")

  def row(label, cells_per_spec):
    lines.append("| " + " | ".join([label] + [c for cs in cells_per_spec for c in cs]) + " |")

  section("single modality")
  for pos in range(m):
    cells = []
    names = [s.modalities[pos] for s in specs]
    for s in specs:
      mod = s.modalities[pos]
      runs = grid.get((s.name, NETS.get(mod, "")), [])
      cells.append([mod, mod] + [cell(runs, "teacher", "complete", k, n_seeds)
                                 for k, _ in METRICS])
    row(_joined(names) + "-Net", cells)
  scen = [masks_lib.eval_scenarios(s.modalities) for s in specs]
  for i in list(range(1, len(scen[0]))) + [0]:  # missing scenarios, then complete
    if i == 0:
      section("Complete modalities")
    else:
      missing = [[mod for mod, keep in zip(s.modalities, sc[i][1]) if keep <= 0]
                 for s, sc in zip(specs, scen)]
      section("W/o " + " & ".join(_joined(names) for names in zip(*missing)) + " modality")
    for label, variant, key in _scenario_rows(i, variants):
      cells = []
      for s, sc in zip(specs, scen):
        name, mrow = sc[i]
        runs = grid.get((s.name, variant), [])
        cells.append([", ".join(s.modalities), ", ".join(_present(s.modalities, mrow))] +
                     [cell(runs, key, name, k, n_seeds) for k, _ in METRICS])
      row(label, cells)
  return "\n".join(lines) + "\n"


def table2(grid: dict, dataset: str, n_seeds: int) -> str:
  """Paper Table 2 layout: Baseline (teacher, zeros) vs DPMamba for every scenario."""
  spec = datasets.get_spec(dataset)
  train_mods = ",".join(spec.modalities)
  lines = ["| Method | Training Modalities | Testing Modalities | OA(%) | AA(%) | κ(×100) |",
           "|---|---|---|---|---|---|"]
  scen = masks_lib.eval_scenarios(spec.modalities)
  runs = grid.get((dataset, "dpmamba"), [])
  for name, mrow in scen[:0:-1] + scen[:1]:  # fewest modalities first, complete last
    for label, key in ((BASELINE, "teacher"), ("DPMamba (ours)", "student")):
      lines.append(f"| {label} | {train_mods} | {','.join(_present(spec.modalities, mrow))} | " +
                   " | ".join(cell(runs, key, name, k, n_seeds) for k, _ in METRICS) + " |")
  return "\n".join(lines) + "\n"


def table3(grid: dict, dataset_names: Sequence[str], variants: Sequence[str],
           n_seeds: int) -> str:
  """Paper Table 3 layout (plus a Complete group): ablation variants and DPMamba."""
  specs = [datasets.get_spec(d) for d in dataset_names]
  scen = [masks_lib.eval_scenarios(s.modalities) for s in specs]
  order = list(range(len(scen[0]) - 1, 0, -1)) + [0]  # paper: W/o LiDAR/SAR, W/o HSI; + complete
  groups = []
  for i in order:
    if i == 0:
      groups.append("Complete")
    else:
      missing = [[mod for mod, keep in zip(s.modalities, sc[i][1]) if keep <= 0]
                 for s, sc in zip(specs, scen)]
      groups.append("W/o " + " & ".join(_joined(n) for n in zip(*missing)))
  header = ["Datasets", "Methods"] + [f"{g} {label}" for g in groups for _, label in METRICS]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for s, sc in zip(specs, scen):
    first = True
    for v in ABLATIONS:
      if v not in variants:
        continue
      runs = grid.get((s.name, v), [])
      cells = [cell(runs, "student", sc[i][0], k, n_seeds) for i in order for k, _ in METRICS]
      lines.append("| " + " | ".join([s.name if first else "", VARIANTS[v][0]] + cells) + " |")
      first = False
  return "\n".join(lines) + "\n"


def _notes(grid: dict, dataset_names, variants, seeds, epochs_requested) -> list[str]:
  notes = []
  used, peer_epochs = {}, {}
  missing = []
  for (dataset, variant), runs in grid.items():
    spec = datasets.get_spec(dataset)
    if not applicable(variant, spec):
      continue
    if len(runs) < len(seeds):
      missing.append(f"{dataset}/{variant} ({len(runs)}/{len(seeds)} seeds)")
    for r in runs:
      e = r.get("epochs", {})
      if method_of(variant) != "dpmamba":
        peer_epochs.setdefault(VARIANTS[variant][0], set()).update(int(v) for v in e.values())
        continue
      used.setdefault(dataset, set()).update(
          int(v) for v in (e.get("pretrain"), e.get("distill")) if v)
  for dataset in dataset_names:
    spec = datasets.get_spec(dataset)
    es = sorted(used.get(dataset, ()))
    if es and es != [spec.epochs]:
      notes.append(f"{dataset}: shortened schedule, {'/'.join(map(str, es))} epochs per stage "
                   f"(the default for {dataset}: {spec.epochs}).")
  if peer_epochs:
    notes.append("Comparison methods, epochs per stage as run: " + "; ".join(
        f"{label} {'/'.join(map(str, sorted(es)))}" for label, es in peer_epochs.items()) +
        " (their defaults: dpmamba_jax/peers/<method>.py DEFAULTS, configs/peers/).")
  if epochs_requested is not None and not used and not peer_epochs:
    notes.append(f"epochs requested: {epochs_requested} per stage.")
  subsets = sorted({(r["test_pixels"]["scored"], r["test_pixels"]["of"])
                    for runs in grid.values() for r in runs
                    if r.get("test_pixels") and r["test_pixels"]["scored"] != r["test_pixels"]["of"]})
  if subsets:
    notes.append("Scored on a fixed random subset of each run's test pixels (eval_subsample): "
                 + ", ".join(f"{a:,} of {b:,}" for a, b in subsets) + ".")
  if missing:
    notes.append("Missing runs (shown as — or with n=k): " + ", ".join(sorted(missing)) + ".")
  encoders = sorted({r.get("text_encoder", "?") for runs in grid.values() for r in runs})
  if encoders:
    notes.append(f"Text encoder: {', '.join(encoders)}.")
  return notes


def render(grid: dict, dataset_names: Sequence[str], variants: Sequence[str], seeds: Sequence[int],
           *, epochs: int | None = None, title: str | None = None) -> str:
  """The whole Markdown report: Tables 1, 2, 3 and the notes."""
  n = len(seeds)
  out = [f"# {title or 'DPMamba experiment grid'}", "",
         f"Mean ± std (sample std) over seeds {', '.join(map(str, seeds))}; last-epoch models; "
         "OA / AA in %, κ ×100. Baseline = the DPMamba run's teacher with zero-filled missing "
         "modalities. Single-modality nets (X-Net) are trained and tested on X only (no student "
         "stage)." + (" Comparison methods run at their own settings (docs/peers.md); the fusion "
                      "methods (HCT, Sal2RN, Cross-HL) take complete inputs, so a missing "
                      "modality's input is zero-filled (marked), as a user with a sensor down "
                      "gets; '+ modality dropout' rows are trained with per-sample dropout over "
                      "the modality subsets." if any(v in variants for v in PEERS) else ""), ""]
  by_m: dict[int, list[str]] = {}
  for d in dataset_names:
    by_m.setdefault(datasets.get_spec(d).num_modalities, []).append(d)
  for m, names in sorted(by_m.items()):
    out += [f"## Table 1 layout ({m} modalities): {', '.join(names)}", "",
            table1(grid, names, n, variants)]
  for d in dataset_names:
    out += [f"## Table 2 layout: {d}", "", table2(grid, d, n)]
  if any(v in variants for v in ABLATIONS):
    for m, names in sorted(by_m.items()):
      out += [f"## Table 3 layout (ablations, {m} modalities): {', '.join(names)}", "",
              table3(grid, names, variants, n)]
  notes = _notes(grid, dataset_names, variants, seeds, epochs)
  if notes:
    out += ["Notes:", ""] + [f"* {t}" for t in notes] + [""]
  return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# CLI.


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(
      prog="python tools/report.py",
      description="Run (--run) or collect the experiment grid datasets x variants x seeds and "
                  "write the paper's Tables 1-3 as Markdown (mean ± std over seeds).")
  p.add_argument("--runs-root", required=True, help="grid root: <root>/<dataset>/<variant>/seed<s>")
  p.add_argument("--dataset", nargs="+", default=None,
                 help="datasets (default: the dataset folders found under --runs-root)")
  p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                 help="variants (default: DPMamba, its ablations and the single-modality nets "
                      "that apply to each dataset)")
  p.add_argument("--table1", action="store_true",
                 help="the paper's Table 1 with the comparison methods: the single-modality "
                      "nets; under each missing-modality scenario the zero-filled DPMamba "
                      "teacher, ShaSpec, DGDNet, MSH-Net and DPMamba; under complete modalities "
                      "HCT, Sal2RN, Cross-HL and DPMamba; the fusion methods zero-filled and "
                      "trained with modality dropout as extra lines (variants: "
                      + " ".join(TABLE1) + "). With --run, each method at its own settings "
                      "(--epochs shortens every stage of every method).")
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--run", action="store_true", help="train + evaluate the missing runs first")
  p.add_argument("--epochs", type=int, default=None, help="epochs per stage for --run "
                 "(default: the dataset's, 500 for the paper's)")
  p.add_argument("--data-dir", default=None, help="dataset folder for --run (one dataset)")
  p.add_argument("--train-args", default="",
                 help="extra arguments for every train run, e.g. \"--text-encoder minilm\"")
  p.add_argument("--maps", action="store_true", help="let the runs draw their maps (off)")
  p.add_argument("--title", default=None, help="report title")
  p.add_argument("--out", default=None, help="Markdown output (default <runs-root>/report.md)")
  return p


@errors.cli_entry
def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  root = os.path.abspath(args.runs_root)
  names = args.dataset
  if names is None:
    if not os.path.isdir(root):
      raise errors.UserError(f"--runs-root {root}: no such folder; give --dataset with --run")
    names = sorted(d for d in os.listdir(root) if d in datasets.DATASETS)
    if not names:
      raise errors.UserError(f"--runs-root {root}: no <dataset>/ folders; expected one of "
                             f"{', '.join(sorted(datasets.DATASETS))}")
  names = [datasets.get_spec(d).name for d in names]
  if args.data_dir and len(names) > 1:
    raise errors.UserError(f"--data-dir {args.data_dir}: one dataset only (got {names}); use "
                           "$DPMAMBA_DATA_DIR/<dataset> for several")
  if args.epochs is not None and args.epochs < 1:
    raise errors.UserError(f"--epochs {args.epochs}: expected an int >= 1")
  if args.table1 and args.variants:
    raise errors.UserError("--table1 runs the Table-1 variants; give --variants or --table1, "
                           "not both")
  variants = list(args.variants or (TABLE1 if args.table1 else DPMAMBA_GRID))
  failed = []
  if args.run:
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else None
    failed = run_grid(root, names, variants, args.seeds, epochs=args.epochs, data_dir=data_dir,
                      maps=args.maps, extra=shlex.split(args.train_args))
  grid = collect(root, names, variants, args.seeds)
  text = render(grid, names, variants, args.seeds, epochs=args.epochs, title=args.title)
  out = args.out or os.path.join(root, "report.md")
  fileio.write_text(out, text)
  print(text)
  print(f"written: {out}")
  if failed:
    print(f"error: {len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
