"""An official checkpoint directory: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`; any shard may be stored as `<shard>.zst` (zstd bytes).
Without safetensors files, the old Hugging Face PyTorch layout is read instead: one
`pytorch_model.bin`, or shards listed in `pytorch_model.bin.index.json` (see `torch_bin`)."""

from __future__ import annotations

import glob
import json
import os

from magi_jax.formats.safetensors_io import CheckpointFormatError, SafetensorsFile
from magi_jax.formats.torch_bin import TorchBinFile

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def _open_shard(directory: str, name: str) -> SafetensorsFile | TorchBinFile:
  path = os.path.join(directory, name)
  if name.endswith(".bin"):
    return TorchBinFile(path)
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


def _weight_map(index: str) -> dict[str, str]:
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return dict(weight_map)
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointFormatError(f"{index}: not a valid weight index ({e})") from None


class ShardedCheckpoint:
  """Read-only mapping key -> numpy array over all shards, opened lazily."""

  def __init__(self, directory: str):
    self.directory = directory
    if not os.path.isdir(directory):
      raise CheckpointFormatError(f"{directory}: checkpoint directory not found")
    self._open: dict[str, SafetensorsFile | TorchBinFile] = {}
    exists = lambda name: os.path.exists(os.path.join(directory, name))  # noqa: E731
    if exists(INDEX):
      self._key_to_shard = _weight_map(os.path.join(directory, INDEX))
    elif exists(SINGLE) or exists(SINGLE + ".zst"):
      self._key_to_shard = dict.fromkeys(self._shard(SINGLE).keys(), SINGLE)
    elif exists(BIN_INDEX):
      self._key_to_shard = _weight_map(os.path.join(directory, BIN_INDEX))
    elif exists(BIN_SINGLE):
      self._key_to_shard = dict.fromkeys(self._shard(BIN_SINGLE).keys(), BIN_SINGLE)
    elif glob.glob(os.path.join(directory, "pytorch_model*.bin")):
      found = [os.path.basename(p) for p in
               sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))]
      raise CheckpointFormatError(f"{directory}: has PyTorch shards {found} but no {BIN_INDEX} "
                                  "saying which tensor is in which shard")
    else:
      raise CheckpointFormatError(f"{directory}: no {INDEX} and no {SINGLE} (is this an "
                                  "official MAGI-1 inference_weight directory?)")

  def keys(self):
    return list(self._key_to_shard)

  def __contains__(self, key):
    return key in self._key_to_shard

  def _shard(self, shard: str):
    if shard not in self._open:
      self._open[shard] = _open_shard(self.directory, shard)
    return self._open[shard]

  def _file(self, key):
    f = self._shard(self._key_to_shard[key])
    if key not in f:
      raise CheckpointFormatError(f"{f.path}: the index says it holds {key!r}, but it does not")
    return f

  def shape(self, key):
    return self._file(key).shape(key)

  def get(self, key):
    return self._file(key).get(key)
