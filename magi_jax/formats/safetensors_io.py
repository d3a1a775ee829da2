"""Lazy, memory-mapped safetensors reading and writing with every dtype the checkpoints use.

The `safetensors` package's numpy backend cannot return float8 tensors (the fp8 MAGI-1
checkpoints store e4m3 weights), so this module parses the (simple, documented) format
itself: an 8-byte little-endian header length, a JSON header, then raw tensor bytes. bf16 and
fp8 come back as `ml_dtypes` numpy arrays. Tensors are views into an mmap: nothing is read
until it is used, so converting a checkpoint never holds two full copies in memory.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

from magi_jax.errors import MagiError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class CheckpointFormatError(MagiError, ValueError):
  """A checkpoint file is missing, truncated or not what it claims to be."""


class SafetensorsFile:
  """`keys()`, `shape(key)`, `dtype(key)`, `get(key)` over one safetensors file or bytes."""

  def __init__(self, path: str, data: bytes | None = None):
    self.path = path
    if data is None:
      try:
        with open(path, "rb") as f:
          size = os.fstat(f.fileno()).st_size
          if size < 8:
            raise CheckpointFormatError(f"{path}: {size} bytes is too short for a safetensors file")
          self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: file not found") from None
    else:
      self._buf = memoryview(data)
    (n,) = struct.unpack("<Q", self._buf[:8])
    if n > len(self._buf) - 8:
      raise CheckpointFormatError(f"{path}: header length {n} exceeds the file size "
                                  f"{len(self._buf)} (truncated or not safetensors)")
    try:
      header = json.loads(bytes(self._buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    self._entries = header
    for key, e in header.items():
      if e.get("dtype") not in DTYPES:
        raise CheckpointFormatError(f"{path}: tensor {key!r} has unsupported dtype "
                                    f"{e.get('dtype')!r}")
      a, b = e["data_offsets"]
      want = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(DTYPES[e["dtype"]]).itemsize
      if b - a != want or self._start + b > len(self._buf):
        raise CheckpointFormatError(f"{path}: tensor {key!r} has inconsistent offsets "
                                    "(truncated or corrupt file)")

  def keys(self):
    return list(self._entries)

  def __contains__(self, key):
    return key in self._entries

  def shape(self, key):
    return tuple(self._entries[key]["shape"])

  def dtype(self, key):
    return np.dtype(DTYPES[self._entries[key]["dtype"]])

  def get(self, key) -> np.ndarray:
    e = self._entries[key]
    a, b = e["data_offsets"]
    arr = np.frombuffer(self._buf, dtype=DTYPES[e["dtype"]],
                        count=(b - a) // self.dtype(key).itemsize, offset=self._start + a)
    return arr.reshape(e["shape"])


def save_safetensors(tensors: dict[str, np.ndarray], path: str,
                     metadata: dict[str, str] | None = None) -> None:
  """Writes tensors (any dtype in DTYPES, ml_dtypes included) to one safetensors file."""
  header, offset, arrays = {}, 0, []
  for key in sorted(tensors):
    arr = np.ascontiguousarray(np.asarray(tensors[key]))
    if arr.dtype not in _NAMES:
      raise TypeError(f"cannot store {key!r} of dtype {arr.dtype} in safetensors")
    header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())
  os.replace(tmp, path)
