"""Lazy reading of PyTorch `torch.save` state dicts (`pytorch_model*.bin`) without torch.

Since torch 1.6 `torch.save` writes a zip archive (entries stored uncompressed):

  <name>/data.pkl      the pickled object; every tensor storage is a persistent id
                       ('storage', <storage type>, <key>, <location>, <numel>)
  <name>/data/<key>    the raw bytes of one storage
  <name>/byteorder     'little' or 'big' (absent in old files: little)

The pickle is read by an unpickler that resolves only the few globals a state dict needs
(tensor/parameter rebuild functions, `collections.OrderedDict`, storage types and dtypes) to
local stand-ins and refuses every other global, so no code from the file ever runs. A tensor is
kept as (storage, offset, size, stride) until `get()`; storage bytes are read through an mmap
of the archive, so `keys()` / `shape()` are cheap and only the tensor asked for is touched.
Contiguous tensors come back as read-only views of the mmap; strided ones (a transpose, a
slice) as copies. The pre-1.6 (non-zip) torch format is not read.
"""

from __future__ import annotations

import collections
import mmap
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from magi_jax.formats.safetensors_io import CheckpointFormatError

# torch.<X>Storage -> element dtype (the storage types a typed tensor is pickled with).
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
# torch.<dtype> -> numpy dtype (used by `_rebuild_tensor_v3`, e.g. for float8 tensors).
TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2, "int64": np.int64, "int32": np.int32,
    "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16,
    "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128,
}


class _Frozen:
  """Base of every object the unpickler hands out: a pickle's BUILD cannot change its state."""

  def __setstate__(self, state):
    raise ValueError(f"the pickle tries to set the state of a {type(self).__name__.strip('_')}")


class _StorageType(_Frozen):
  """Stand-in for `torch.FloatStorage` & co. (and `UntypedStorage`, whose elements are bytes)."""

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)


class _Dtype(_Frozen):
  """Stand-in for a `torch.<dtype>` object."""

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)


class _Marker(_Frozen):
  """Stand-in for a class only passed as an argument (`torch.nn.Parameter`, `torch.Tensor`)."""

  def __init__(self, name: str):
    self.name = name


class _Function(_Frozen):
  """An allowed global function, e.g. `torch._utils._rebuild_tensor_v2`, done by local code."""

  def __init__(self, name: str, fn):
    self.name, self.fn = name, fn

  def __call__(self, *args):
    return self.fn(*args)


class _Storage(_Frozen):
  def __init__(self, key: str, nbytes: int):
    self.key, self.nbytes = key, nbytes


class _StorageRef(_Frozen):
  """One persistent-id reference to a storage, with the element type it was referenced as."""

  def __init__(self, storage: _Storage, dtype: np.dtype):
    self.storage, self.dtype = storage, dtype


class _LazyTensor(_Frozen):
  def __init__(self, storage: _Storage, dtype: np.dtype, offset: int, shape: tuple, stride: tuple):
    self.storage, self.dtype, self.offset, self.shape, self.stride = (
        storage, dtype, offset, shape, stride)


class _Forbidden(Exception):
  pass


def _int_tuple(value, what: str) -> tuple:
  if type(value) is int:
    value = (value,)
  if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
    raise ValueError(f"tensor {what} {value!r} is not a tuple of ints")
  return tuple(value)


def _check_bounds(storage: _Storage, dtype: np.dtype, offset: int, size: tuple, stride: tuple):
  if len(size) != len(stride):
    raise ValueError(f"tensor size {size} and stride {stride} differ in rank")
  if offset < 0 or min(size + stride, default=0) < 0:
    raise ValueError(f"negative offset, size or stride ({offset}, {size}, {stride})")
  if all(size):
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if (last + 1) * dtype.itemsize > storage.nbytes:
      raise ValueError(f"tensor (offset {offset}, size {size}, stride {stride}, {dtype}) reaches "
                       f"past its storage {storage.key!r} of {storage.nbytes} bytes")


def _make_tensor(ref, offset, size, stride, dtype) -> _LazyTensor:
  if not isinstance(ref, _StorageRef):
    raise ValueError(f"tensor storage is {type(ref).__name__}, not a storage reference")
  storage, dtype = ref.storage, np.dtype(dtype)
  (offset,) = _int_tuple(offset, "storage offset")
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  _check_bounds(storage, dtype, offset, size, stride)
  return _LazyTensor(storage, dtype, offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _make_tensor(storage, storage_offset, size, stride, storage.dtype
                      if isinstance(storage, _StorageRef) else np.uint8)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  if not isinstance(dtype, _Dtype):
    raise ValueError(f"_rebuild_tensor_v3 got dtype {dtype!r}, not a torch dtype")
  return _make_tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
  if not isinstance(data, _LazyTensor):
    raise ValueError("a parameter without tensor data")
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  # A Parameter / Tensor pickled with Python-level state: rebuild the plain tensor, drop the rest.
  if not (isinstance(func, _Function) and func.fn in _REBUILDERS and isinstance(new_type, _Marker)
          and isinstance(args, tuple)):
    raise ValueError("_rebuild_from_type_v2 with an unexpected function, type or arguments")
  return func(*args)


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _allowed_globals() -> dict:
  """(module, name) -> local stand-in, made afresh for every file."""
  functions = {
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
      ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
  }
  allowed = {k: _Function(f"{k[0]}.{k[1]}", fn) for k, fn in functions.items()}
  allowed[("collections", "OrderedDict")] = collections.OrderedDict   # immutable C type
  for module, name in (("torch.nn.parameter", "Parameter"), ("torch", "Tensor"),
                       ("torch._tensor", "Tensor")):
    allowed[(module, name)] = _Marker(f"{module}.{name}")
  for name, dtype in STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, dtype)
  for module in ("torch", "torch.storage"):
    allowed[(module, "UntypedStorage")] = _StorageType("UntypedStorage", np.uint8)
  for name, dtype in TORCH_DTYPES.items():
    allowed[("torch", name)] = _Dtype(name, dtype)
  return allowed


class _StateDictUnpickler(pickle.Unpickler):
  """Resolves only `_allowed_globals()`; storages become `_StorageRef`s."""

  def __init__(self, file):
    super().__init__(file)
    self.allowed = _allowed_globals()
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    try:
      return self.allowed[(module, name)]
    except (KeyError, TypeError):
      raise _Forbidden(f"{module}.{name}") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise ValueError(f"unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType) or type(key) is not str or type(
        numel) is not int or numel < 0:
      raise ValueError(f"malformed storage reference {pid!r}")
    nbytes = numel * storage_type.dtype.itemsize
    s = self.storages.get(key)
    if s is None:
      s = self.storages[key] = _Storage(key, nbytes)
    elif s.nbytes != nbytes:
      raise ValueError(f"storage {key!r} is referenced with sizes {s.nbytes} and {nbytes} bytes")
    return _StorageRef(s, storage_type.dtype)


def _flatten(obj: dict, prefix: str, tensors: dict, extras: dict, depth: int = 0) -> None:
  if depth > 32:
    raise ValueError("dicts nested more than 32 deep (or a dict that contains itself)")
  for k, v in obj.items():
    name = f"{prefix}{k}"
    if isinstance(v, _LazyTensor):
      tensors[name] = v
    elif isinstance(v, dict):
      _flatten(v, name + ".", tensors, extras, depth + 1)
    else:
      extras[name] = v


class TorchBinFile:
  """`keys()`, `shape(key)`, `dtype(key)`, `get(key)` over one zip-format `torch.save` file.

  Nested dicts are flattened with '.'; non-tensor values (an epoch counter, say) are not keys but
  are kept in `extras`.
  """

  def __init__(self, path: str):
    self.path = path
    self._mmap = None
    self._offsets: dict[str, int] = {}
    try:
      with open(path, "rb") as f:
        head = f.read(512)
    except FileNotFoundError:
      raise CheckpointFormatError(f"{path}: file not found") from None
    except OSError as e:
      raise CheckpointFormatError(f"{path}: cannot be read ({e})") from None
    try:
      self._zip = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise CheckpointFormatError(self._not_zip(head, e)) from None
    pkls = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise CheckpointFormatError(f"{path}: a zip archive, but with {len(pkls)} top-level "
                                  "<name>/data.pkl entries (not a torch.save file?)")
    self._prefix = pkls[0][:-len("data.pkl")]
    self._byteorder = self._read_byteorder()
    self._tensors: dict[str, _LazyTensor] = {}
    self.extras: dict = {}
    try:
      with self._zip.open(pkls[0]) as f:
        unpickler = _StateDictUnpickler(f)
        obj = unpickler.load()
      if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")
      _flatten(obj, "", self._tensors, self.extras)
    except CheckpointFormatError:
      raise
    except _Forbidden as e:
      raise CheckpointFormatError(
          f"{path}: data.pkl references the global {e}, which is not allowed (only tensors and "
          "state-dict containers are read; refusing to run code from the file)") from None
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, RecursionError) as e:
      raise CheckpointFormatError(f"{path}: corrupt or unsupported data.pkl "
                                  f"({type(e).__name__}: {e})") from None
    for key, storage in unpickler.storages.items():
      info = self._member(key)
      if info.file_size < storage.nbytes:
        raise CheckpointFormatError(f"{path}: storage {key!r} has {info.file_size} bytes, "
                                    f"its tensors need {storage.nbytes} (truncated or corrupt)")

  def _not_zip(self, head: bytes, err: Exception) -> str:
    if head.startswith(b"PK"):
      return f"{self.path}: truncated or corrupt zip archive ({err})"
    # The legacy format is a bare pickle (protocol 2: starts with 0x80, then torch's magic
    # number), or a tar archive in the oldest versions.
    if head.startswith(b"\x80") or head[257:262] == b"ustar":
      return (f"{self.path}: legacy (pre-1.6, non-zip) torch serialization, which is not read; "
              "re-save it with torch>=1.6 (`torch.save(torch.load(f), f)`) or convert it to "
              "safetensors")
    return f"{self.path}: not a zip-based torch.save file ({err})"

  def _read_byteorder(self) -> str:
    name = self._prefix + "byteorder"
    if name not in self._zip.namelist():
      return "little"
    order = self._zip.read(name).decode("ascii", "replace").strip()
    if order not in ("little", "big"):
      raise CheckpointFormatError(f"{self.path}: unknown byteorder {order!r}")
    return order

  def _member(self, key: str) -> zipfile.ZipInfo:
    try:
      return self._zip.getinfo(f"{self._prefix}data/{key}")
    except KeyError:
      raise CheckpointFormatError(f"{self.path}: storage {key!r} is referenced but "
                                  f"{self._prefix}data/{key} is missing") from None

  def _storage_bytes(self, storage: _Storage):
    """The storage's bytes: an offset into the mmap (stored members) or the inflated bytes."""
    where = self._offsets.get(storage.key)
    if where is not None:
      return where
    info = self._member(storage.key)
    if info.compress_type != zipfile.ZIP_STORED:
      return self._zip.read(info.filename)      # not what torch writes; not kept in memory
    # Stored: the bytes sit after the member's local header (30 bytes + name + extra field).
    with open(self.path, "rb") as f:
      f.seek(info.header_offset)
      local = f.read(30)
      size = os.fstat(f.fileno()).st_size
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
      raise CheckpointFormatError(f"{self.path}: bad local header for {info.filename} "
                                  "(corrupt zip)")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    where = info.header_offset + 30 + name_len + extra_len
    if where + info.file_size > size:
      raise CheckpointFormatError(f"{self.path}: {info.filename} runs past the end of the file "
                                  "(truncated)")
    if self._mmap is None:
      with open(self.path, "rb") as f:
        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    self._offsets[storage.key] = where
    return where

  def keys(self):
    return list(self._tensors)

  def __contains__(self, key):
    return key in self._tensors

  def shape(self, key):
    return self._tensors[key].shape

  def dtype(self, key):
    return self._tensors[key].dtype

  def get(self, key) -> np.ndarray:
    t = self._tensors[key]
    _check_bounds(t.storage, t.dtype, t.offset, t.shape, t.stride)   # `as_strided` trusts these
    if not all(t.shape):
      return np.zeros(t.shape, t.dtype)
    where = self._storage_bytes(t.storage)
    size = t.dtype.itemsize
    count = t.storage.nbytes // size
    # Stride through raw same-size elements: `as_strided` cannot carry ml_dtypes dtypes.
    raw = np.dtype(f"V{size}")
    if isinstance(where, bytes):
      flat = np.frombuffer(where, raw, count=count)
    else:
      flat = np.frombuffer(self._mmap, raw, count=count, offset=where)
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset:], t.shape, [s * size for s in t.stride], writeable=False).view(t.dtype)
    if self._byteorder == "big" and size > 1:
      # Swap each scalar (each component of a complex number) through an unsigned-int view.
      part = size // 2 if t.dtype.kind == "c" else size
      return np.array(view).view(f"u{part}").byteswap().view(t.dtype)
    if not view.flags.c_contiguous:
      view = np.ascontiguousarray(view)
    return view
