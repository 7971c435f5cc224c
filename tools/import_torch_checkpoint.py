"""Convert an authors' DPMamba PyTorch state dict into a dpmamba_jax model checkpoint.

  python tools/import_torch_checkpoint.py weights.npz out_ckpt [--prefix teacher/] [--patch-size 15]
  python tools/import_torch_checkpoint.py model.pth out_ckpt --patch-size 15   # needs torch

Input: an exported ``.npz`` of the state dict (read with allow_pickle=False) or a ``.pth``
(read with torch.load(..., weights_only=True), only when torch is installed; a checkpoint from the
internet can never run code either way). The model config (bands, depth, heads, d_state, hidden,
out_dim, prompts, P) is inferred from the array shapes; a teacher (no prompts) needs --patch-size
or --dataset. The reference's ``initial_state`` buffers are dropped: this model starts every
scan from zero (reference-spec §2.8).
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpmamba_jax import checkpoint  # noqa: E402
from dpmamba_jax import errors  # noqa: E402
from dpmamba_jax import fileio  # noqa: E402
from dpmamba_jax.data import datasets  # noqa: E402
from dpmamba_jax.model import torch_import  # noqa: E402
from dpmamba_jax.errors import UserError  # noqa: E402

ANCHOR = "patch_embedding.0.0.weight"


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """.npz (no pickle) or .pth (torch, weights_only) -> {name: numpy array}."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle
      raise UserError(f"{path}: cannot read without pickle ({e}); export plain arrays") from None
    except OSError as e:
      raise UserError(f"{path}: not a readable .npz ({e})") from None
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    return fileio.read_torch_state_dict(path)
  raise UserError(f"{path}: unknown extension, expected .npz or .pth")


def pick_prefix(keys, prefix: str | None, path: str) -> str:
  """The prefix given, or the single one under which the state dict's anchor key lives."""
  if prefix is not None:
    return prefix
  found = sorted(k[:-len(ANCHOR)] for k in keys if k.endswith(ANCHOR))
  found = [p for p in found if not p or p.endswith(("/", "."))]
  if len(found) == 1:
    return "" if found[0] in ("module.",) else found[0]
  if not found:
    raise UserError(f"{path}: no key ends with '{ANCHOR}': not a DPMamba state dict")
  raise UserError(f"{path}: several models inside (prefixes {found}); choose one with --prefix")


@errors.cli_entry
def main(argv=None) -> int:
  ap = errors.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("input", help="state dict: .npz (exported) or .pth (needs torch)")
  ap.add_argument("output", help="checkpoint directory to write")
  ap.add_argument("--prefix", default=None,
                  help="key prefix of the model inside the file, e.g. 'teacher/' (auto if unique)")
  ap.add_argument("--patch-size", type=int, default=None,
                  help="patch size P (needed for a teacher, which has no prompts)")
  ap.add_argument("--dataset", default=None,
                  help="dataset name: recorded in meta, gives P, and its bands are checked")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = ap.parse_args(argv)

  if os.path.exists(args.output) and not args.overwrite:
    raise UserError(f"{args.output}: exists; pass --overwrite to replace it")
  sd = read_state_dict(args.input)
  prefix = pick_prefix(sd.keys(), args.prefix, args.input)
  patch_size, spec = args.patch_size, None
  if args.dataset:
    spec = datasets.get_spec(args.dataset)
    patch_size = patch_size or spec.patch_size
  model, cfg = torch_import.import_state_dict(sd, prefix=prefix, patch_size=patch_size,
                                              source=args.input)
  if spec is not None and tuple(spec.model_bands) != cfg.bands:
    raise UserError(f"{args.input}: bands {cfg.bands} do not match dataset {spec.name}'s "
                    f"model bands {tuple(spec.model_bands)}")
  stripped = torch_import.strip_prefix(sd, prefix)
  dropped_state = sorted(k for k, v in stripped.items()
                         if k.endswith(".initial_state") and np.any(np.asarray(v) != 0))
  if dropped_state:
    print(f"note: {len(dropped_state)} nonzero SSM initial_state buffers dropped (this model "
          "starts every scan from zero, reference-spec §2.8)", file=sys.stderr)
  meta = {"source": os.path.abspath(args.input), "format": "torch-state-dict",
          "prefix": prefix, "nonzero_initial_state_dropped": dropped_state,
          "dataset": spec.name if spec is not None else None}
  checkpoint.save_model(args.output, model, cfg, meta)
  role = "student" if cfg.prompts else "teacher"
  print(f"wrote {args.output}: {role}, bands {cfg.bands}, patch {cfg.patch_size}, "
        f"depth {cfg.depth}, out {cfg.out_dim}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
