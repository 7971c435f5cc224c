"""User-facing errors and the CLI wrapper that turns them into one-line messages."""
from __future__ import annotations

import argparse
import errno
import functools
import re
import sys
from typing import Callable


class UserError(Exception):
  """A problem with the user's input (file, key, value, option).

  The message is one line that names the file/key/value and what was expected.
  CLI entry points print it as ``error: <message>`` and exit with status 2,
  without a traceback.
  """


class NoSpace(UserError):
  """A write that found the disk (or the quota) full: `PATH: no space left on device; ...`."""


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# tensorstore (orbax's array writer) reports a full disk as RESOURCE_EXHAUSTED with the errno
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|"
                            rf"os_error_code='({'|'.join(map(str, NO_SPACE_ERRNOS))})'")
_WRITTEN_FILE = re.compile(r'(?:local file|Failed writing:) "([^"]+)"')


def is_no_space(e: BaseException | None) -> bool:
  """Whether `e`, or an exception it was raised from, is a full disk or quota."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, UserError):  # said already, in its own words
      return isinstance(e, NoSpace)
    if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
      return True
    if _NO_SPACE_TEXT.search(str(e)):
      return True
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
  return False


def mentions_no_space(text: str) -> bool:
  """Whether a message (a log record's, say) reports a full disk or quota."""
  return _NO_SPACE_TEXT.search(text) is not None


def _written_path(e: BaseException) -> str:
  """The file a full-disk error was writing, as far as it says (else "a write")."""
  if isinstance(e, OSError) and e.filename:
    return str(e.filename)
  m = _WRITTEN_FILE.search(str(e))
  return m.group(1) if m else "a write"


def cli_entry(fn: Callable[..., int | None]) -> Callable[..., int]:
  """Decorates a CLI ``main(argv=None)``: UserError -> one line on stderr, exit 2. A full disk
  that no write path named (a library's own write) is one line too."""

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
    except Exception as e:  # noqa: BLE001 - a full disk becomes one line; the rest re-raised
      if not is_no_space(e):
        raise
      print(f"error: {_written_path(e)}: no space left on device; free some space, then rerun "
            "the same command", file=sys.stderr)
      return 2
    return 0 if rc is None else int(rc)

  return wrapper


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser whose usage errors (an unknown flag, `--batch abc`) are UserErrors, so a
  CLI under `cli_entry` prints them as its one line `error: ...` (exit 2) like every other."""

  def error(self, message: str):
    raise UserError(f"{self.prog}: {message} (see --help)")
