"""Reading a JSON file with errors that name it: `read_json(path, ConfigError, "config file")`."""

from __future__ import annotations

import json
import os


def read_json(path, error: type[Exception], what: str):
  """The parsed file; a missing file or bad JSON raises `error` naming `path` and `what`."""
  path = os.fspath(path)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise error(f"{path}: {what} not found") from None
  except json.JSONDecodeError as e:
    raise error(f"{path}: not valid JSON ({e})") from None
