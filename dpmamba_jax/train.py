"""`python -m dpmamba_jax.train [--method NAME] [--dataset NAME] ...`: train, evaluate, draw maps.

The command only parses its arguments and calls the trainer (trainer.py): the method's stages
in order (DPMamba: teacher pretraining, then student distillation; a comparison method: its
own, peers/), each resumable, then the last-epoch models over every modality scenario
(metrics.json, metrics.md) and the maps. Rerunning the same command in the same workdir resumes.
"""
from __future__ import annotations

import argparse
import os

from dpmamba_jax import runtime

if __name__ == "__main__":  # before the heavy imports below (runtime.py)
  runtime.reexec_with_hugepage_malloc()

from dpmamba_jax import config as config_lib  # noqa: E402
from dpmamba_jax import errors  # noqa: E402
from dpmamba_jax import methods  # noqa: E402
from dpmamba_jax import trainer  # noqa: E402
from dpmamba_jax.data import datasets  # noqa: E402
from dpmamba_jax.model import cpu_kernels  # noqa: E402


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(
      prog="python -m dpmamba_jax.train",
      description="Train DPMamba (teacher pretraining, then student distillation), evaluate the "
                  "last-epoch models over every modality scenario and draw the maps. Rerun the "
                  "same command to resume after an interruption.")
  p.add_argument("--method", default=None, metavar="NAME",
                 help=f"training method: {', '.join(config_lib.METHODS)} (default dpmamba; "
                      "a comparison method runs with its own settings, configs/peers/)")
  p.add_argument("--dataset", default=None, choices=sorted(datasets.DATASETS),
                 help="dataset (default: the built-in synthetic scene, no files needed)")
  p.add_argument("--dataset-file", default=None, metavar="YAML",
                 help="your own dataset, defined in a YAML file (docs/own-data.md)")
  p.add_argument("--data-dir", default=None, help="folder with the dataset files")
  p.add_argument("--workdir", default=None,
                 help="output folder (default runs/<dataset>/seed<S>; with --runs N, "
                      "<workdir>/seed<S> per run)")
  p.add_argument("--config", default=None, help="YAML/JSON file of config keys")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override one config key (repeatable), e.g. --set hidden=32")
  p.add_argument("--seed", type=int, default=None, help="seed of the split and the run (0)")
  p.add_argument("--runs", type=int, default=1, help="repeat with seeds S..S+N-1, mean ± std")
  p.add_argument("--epochs", type=int, default=None,
                 help="epochs of each stage (default: the dataset's, 500 for the paper's)")
  p.add_argument("--stage", default=None, metavar="STAGE",
                 help="run up to this stage, the earlier ones loaded (all; dpmamba: pretrain, "
                      "distill)")
  p.add_argument("--teacher-ckpt", default=None,
                 help="distill from this teacher dir (default <workdir>/teacher)")
  p.add_argument("--text-encoder", default=None, choices=("clip", "minilm", "random"),
                 help="class-text encoder (default: clip with --clip-weights, else minilm)")
  p.add_argument("--clip-weights", default=None, help="local CLIP text-tower weights")
  p.add_argument("--split-file", default=None,
                 help="fixed split: an official_split.npz (train/test maps) or a split.npz")
  p.add_argument("--protocol", default=None, choices=config_lib.PROTOCOLS,
                 help="honest (default) or reference: the authors' protocol where it differs "
                      "(raw inputs, training pixels in the test set, their LR schedule, masked "
                      "samples in the student's BatchNorm statistics; docs/deviations.md)")
  p.add_argument("--include-train-in-test", action="store_true",
                 help="test on every labelled pixel, training pixels included (as the authors)")
  p.add_argument("--normalize", default=None, choices=config_lib.NORMALIZE,
                 help="per-band input scaling: standard (default, z-score on the training "
                      "pixels) or none (raw values, as the authors)")
  p.add_argument("--no-compile-cache", action="store_true",
                 help="disable the persistent XLA compilation cache "
                      f"({runtime.compile_cache_dir()})")
  p.add_argument("--quiet", action="store_true", help="no console log lines, no progress bars")
  g = p.add_argument_group("several hosts (docs/usage.md: Several hosts)")
  g.add_argument("--distributed", action="store_true",
                 help="join a multi-controller run (jax.distributed.initialize) first; run the "
                      "same command on every host")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="process 0's address (default: from the environment, e.g. Slurm)")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)
  return p


def resolve_args(args) -> tuple[config_lib.RunConfig, datasets.DatasetSpec]:
  """RunConfig from: dataset spec < --config file < --set < flags."""
  over: dict = {}
  if args.config:
    over.update(config_lib.load_config_file(args.config))
  over.update(config_lib.parse_sets(args.set))
  if args.dataset and args.dataset_file:
    raise errors.UserError("--dataset and --dataset-file: give one of them")
  flags = {"method": args.method, "dataset": args.dataset, "dataset_file": args.dataset_file,
           "data_dir": args.data_dir, "workdir": args.workdir,
           "seed": args.seed, "stage": args.stage, "teacher_ckpt": args.teacher_ckpt,
           "text_encoder": args.text_encoder, "clip_weights": args.clip_weights,
           "split_file": args.split_file, "normalize": args.normalize,
           "protocol": args.protocol}
  for k, v in flags.items():
    if v is not None:
      over[k] = v
  if args.epochs is not None:
    if args.epochs < 1:
      raise errors.UserError(f"--epochs {args.epochs}: expected an int >= 1")
    over["epochs_pretrain"] = over["epochs_distill"] = args.epochs
  if args.include_train_in_test:
    over["include_train_in_test"] = True
  if args.no_compile_cache:
    over["compile_cache"] = False
  return config_lib.resolve(over, methods.defaults)


@errors.cli_entry
def main(argv=None) -> int:
  runtime.setup_cpu_flags()
  args = _parser().parse_args(argv)
  if args.runs < 1:
    raise errors.UserError(f"--runs {args.runs}: expected an int >= 1")
  if args.distributed:
    runtime.init_distributed(args.coordinator, args.num_processes, args.process_id)
  elif any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
    raise errors.UserError("--coordinator / --num-processes / --process-id need --distributed")
  cfg, spec = resolve_args(args)
  args.quiet = args.quiet or not runtime.primary_process()
  cache = runtime.setup_compile_cache(cfg.compile_cache)
  cpu_kernels.build_in_background()  # while the data loads
  if cache and not args.quiet:
    print(f"XLA compilation cache: {cache}")
  if args.runs == 1:
    trainer.run_one(cfg, spec, trainer.log_for(cfg, args.quiet))
  else:
    root = os.path.abspath(args.workdir or os.path.join("runs", spec.name))
    trainer.run_many(cfg, spec, args.runs, root, args.quiet)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
