"""Entry points speak in one line: `run(main)` is `absl.app.run(main)` for the commands.

* A bad flag or config file (an unknown `--config.X` field, with ml_collections' "did you
  mean" suggestion; a missing or broken config file; a bad config variant) -> one line on
  stderr, exit status 2.
* A usage error or a typed error of the run (`app.UsageError`, any `MagiError`: checkpoint,
  config, media, mesh, data errors) -> one line on stderr, exit status 2 for usage and 1 for
  the rest.
* Anything else is a bug and keeps its traceback; so does every error with `--verbose` (or
  `MAGI_VERBOSE=1`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags

from magi_jax.errors import MagiError

VERBOSE_FLAG = "--verbose"


def verbose(argv=None) -> bool:
  """Tracebacks wanted: `--verbose` on the command line or MAGI_VERBOSE=1."""
  argv = sys.argv if argv is None else argv
  return VERBOSE_FLAG in argv or os.environ.get("MAGI_VERBOSE", "") not in ("", "0")


def one_line(e: BaseException) -> str:
  """The message of `e` on one line: its argument unquoted (KeyError quotes it; an exception
  wrapping another gives the inner one's), the lines of a multi-line message (ml_collections'
  "did you mean") joined with '; ', and of a message carrying a traceback its last line."""
  while len(e.args) == 1 and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if any(line.startswith("Traceback (most recent call last)") for line in lines):
    lines = lines[-1:]
  return "; ".join(lines) or type(e).__name__


def config_error_message(e: BaseException) -> str:
  """What went wrong while the flags and config file were read, in words."""
  if isinstance(e, (KeyError, AttributeError)):
    return f"unknown config field {one_line(e)}"
  text = one_line(e).replace("FATAL Flags parsing error: ", "")
  if isinstance(e, OSError) and "[Errno" in text:     # ml_collections lists every path tried
    return "config file: " + text[text.rindex("[Errno"):]
  return text


def fail(message: str, code: int):
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(code)


def config_file_flag(name: str, default: str, help_string: str, **kwargs):
  """`config_flags.DEFINE_config_file`, whose `--name=FILE` and `--name.X` overrides are read
  when it is defined (at import): a bad one is one line here too."""
  from ml_collections import config_flags
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except Exception as e:              # noqa: BLE001 - the command line's fault
    if verbose():
      raise
    fail(f"bad flag or config file: {config_error_message(e)}", 2)
  _CONFIG_FLAGS.append(holder)
  return holder


_CONFIG_FLAGS = []        # config-file flags: loaded when the flags are parsed, not lazily


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with a flag error as one line (absl prints usage text)."""
  try:
    rest = flags.FLAGS(argv)
    for holder in _CONFIG_FLAGS:
      holder.value.keys()             # a config that failed to load raises on first use
    return rest
  except Exception as e:              # noqa: BLE001 - flag errors and config-file errors alike
    if verbose():
      raise
    fail(f"bad flag or config file: {config_error_message(e)}", 2)


def run(main: Callable[[list[str]], object]) -> None:
  """`app.run(main)` with the one-line errors of the module docstring."""
  if VERBOSE_FLAG in sys.argv:
    sys.argv.remove(VERBOSE_FLAG)
    os.environ["MAGI_VERBOSE"] = "1"
  started = []

  def wrapped(argv):
    started.append(True)
    try:
      return main(argv)
    except app.UsageError as e:
      if verbose():
        raise
      fail(one_line(e), 2)
    except MagiError as e:
      if verbose():
        raise
      fail(one_line(e), 1)

  try:
    app.run(wrapped, flags_parser=parse_flags)
  except (SystemExit, KeyboardInterrupt):
    raise
  except Exception as e:              # noqa: BLE001 - sorted below: user error or bug
    if started or verbose():
      raise                           # an error of the program itself: keep the traceback
    fail(f"bad flag or config file: {config_error_message(e)}", 2)
