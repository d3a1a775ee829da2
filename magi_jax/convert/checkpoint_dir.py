"""An official checkpoint directory: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`; any shard may be stored as `<shard>.zst` (zstd bytes)."""

from __future__ import annotations

import json
import os

from magi_jax.convert.safetensors_io import CheckpointFormatError, SafetensorsFile

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _open_shard(directory: str, name: str) -> SafetensorsFile:
  path = os.path.join(directory, name)
  if os.path.exists(path):
    return SafetensorsFile(path)
  if os.path.exists(path + ".zst"):
    try:
      import zstandard
    except ImportError:
      raise CheckpointFormatError(f"{path}.zst is zstd-compressed: pip install zstandard "
                                  "(or magi_jax[convert])") from None
    with open(path + ".zst", "rb") as f:
      try:
        data = zstandard.ZstdDecompressor().decompressobj().decompress(f.read())
      except zstandard.ZstdError as e:
        raise CheckpointFormatError(f"{path}.zst: corrupt zstd data ({e})") from None
    return SafetensorsFile(path + ".zst", data)
  raise CheckpointFormatError(f"{path}: shard not found (neither it nor {name}.zst exists)")


class ShardedCheckpoint:
  """Read-only mapping key -> numpy array over all shards, opened lazily."""

  def __init__(self, directory: str):
    self.directory = directory
    if not os.path.isdir(directory):
      raise CheckpointFormatError(f"{directory}: checkpoint directory not found")
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{index}: not a valid safetensors index ({e})") from None
      self._key_to_shard = dict(weight_map)
    elif os.path.exists(os.path.join(directory, SINGLE)) or os.path.exists(
        os.path.join(directory, SINGLE + ".zst")):
      self._key_to_shard = {k: SINGLE for k in _open_shard(directory, SINGLE).keys()}
    else:
      raise CheckpointFormatError(f"{directory}: no {INDEX} and no {SINGLE} (is this an "
                                  "official MAGI-1 inference_weight directory?)")
    self._open: dict[str, SafetensorsFile] = {}

  def keys(self):
    return list(self._key_to_shard)

  def __contains__(self, key):
    return key in self._key_to_shard

  def _file(self, key) -> SafetensorsFile:
    shard = self._key_to_shard[key]
    if shard not in self._open:
      self._open[shard] = _open_shard(self.directory, shard)
    f = self._open[shard]
    if key not in f:
      raise CheckpointFormatError(f"{f.path}: the index says it holds {key!r}, but it does not")
    return f

  def shape(self, key):
    return self._file(key).shape(key)

  def get(self, key):
    return self._file(key).get(key)
