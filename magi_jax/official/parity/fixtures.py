"""Reading a fixture directory (layout: shared/fixtures/README.md)."""

from __future__ import annotations

import json
import os

from magi_jax.errors import MagiError
from magi_jax.configs import load_magi_config
from magi_jax.formats.safetensors_io import SafetensorsFile


class FixtureError(MagiError, FileNotFoundError):
  pass


def path(directory: str, name: str) -> str:
  p = os.path.join(directory, name)
  if not os.path.exists(p):
    raise FixtureError(f"{p}: fixture file not found")
  return p


def tensors(directory: str, name: str):
  """(dict of numpy arrays, metadata dict) of DIR/name."""
  f = SafetensorsFile(path(directory, name))
  meta = {k: (json.loads(v) if v[:1] in "[{" else v) for k, v in f.metadata.items()}
  return {k: f.get(k) for k in f.keys()}, meta


def dit_config(directory: str):
  """The MagiConfig of DIR/dit_config.json (harness sections besides the three are allowed)."""
  return load_magi_config(path(directory, "dit_config.json"), allow_extra_sections=True)


def dit_weights(directory: str):
  return tensors(directory, "dit_weights.safetensors")[0]
