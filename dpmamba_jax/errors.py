"""User-facing errors and the CLI wrapper that turns them into one-line messages."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable


class UserError(Exception):
  """A problem with the user's input (file, key, value, option).

  The message is one line that names the file/key/value and what was expected.
  CLI entry points print it as ``error: <message>`` and exit with status 2,
  without a traceback.
  """


def cli_entry(fn: Callable[..., int | None]) -> Callable[..., int]:
  """Decorates a CLI ``main(argv=None)``: UserError -> one line on stderr, exit 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs) -> int:
    try:
      rc = fn(*args, **kwargs)
    except UserError as e:
      msg = " ".join(str(e).split())  # always exactly one line
      print(f"error: {msg}", file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print("error: interrupted", file=sys.stderr)
      return 130
    return 0 if rc is None else int(rc)

  return wrapper


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser whose usage errors (an unknown flag, `--batch abc`) are UserErrors, so a
  CLI under `cli_entry` prints them as its one line `error: ...` (exit 2) like every other."""

  def error(self, message: str):
    raise UserError(f"{self.prog}: {message} (see --help)")
