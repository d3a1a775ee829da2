"""Strict loading of an official state dict into an NNX model through a layout of `Entry`s.

Strict means: every expected tensor present, nothing unexpected, every shape right; all
problems are collected and reported by official name in one error. Tensors are read one at a
time (memory-mapped shards) and converted straight into the model's parameter dtype. fp8
weights with scales are dequantized on read (see `dequantize_fp8`).

Stacked parameters. An entry path with an integer, `("layers", 3, "q", "kernel")`, names
either that path of the model's state (an `nnx.List` element) or, when the state has no such
path, index 3 of the leading axis of the stacked parameter at the path without the integer
(`("layers", "q", "kernel")`, shape (L, ...)): official per-layer tensors are stacked on load
and sliced on export. Every index of a stacked parameter must be filled exactly once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from magi_jax.errors import MagiError
from magi_jax.formats.checkpoint_dir import ShardedCheckpoint

_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
_SCALES = ("weight_scale", "input_scale", "smooth_scale")


class CheckpointMismatchError(MagiError, ValueError):
  """The checkpoint's tensors do not match the model (missing / unexpected / mis-shaped)."""


def _scale_keys(key: str):
  stem = key[:-len("weight")]
  return {s: stem + s for s in _SCALES}


def dequantize_fp8(w, weight_scale, input_scale, smooth_scale=None) -> np.ndarray:
  """(1, out, in) fp8 weight and its scales -> (out, in) float32 weight."""
  wf = np.asarray(w, np.float32).reshape(w.shape[-2:])
  ws = float(np.asarray(weight_scale, np.float32).reshape(-1)[0])
  inp = np.asarray(input_scale, np.float32).reshape(-1)
  if smooth_scale is None:
    return wf * (ws * inp[0]) / np.broadcast_to(inp, wf.shape[-1:])[None, :]
  ss = np.asarray(smooth_scale, np.float32).reshape(-1)
  return wf * (ws * inp[0]) / ss[None, :]


class _Reader:
  """Reads official tensors, dequantizing fp8 ones, and remembers which keys it consumed."""

  def __init__(self, source):
    self.source = source
    self.used: set[str] = set()

  def shape(self, key):
    shape = tuple(self.source.shape(key))
    if self._is_fp8(key):
      return shape[-2:]
    return shape

  def _is_fp8(self, key):
    return key.endswith("weight") and _scale_keys(key)["weight_scale"] in self.source

  def get(self, key):
    self.used.add(key)
    if not self._is_fp8(key):
      return self.source.get(key)
    w = self.source.get(key)
    if np.dtype(w.dtype) not in _FP8:
      raise CheckpointMismatchError(f"{key}: has fp8 scales but dtype {w.dtype}")
    scales = {}
    for name, k in _scale_keys(key).items():
      if k in self.source:
        scales[name] = self.source.get(k)
        self.used.add(k)
    if "input_scale" not in scales:
      raise CheckpointMismatchError(f"{key}: fp8 weight without {_scale_keys(key)['input_scale']}")
    return dequantize_fp8(w, **scales)


def _as_source(checkpoint):
  if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
    return ShardedCheckpoint(str(checkpoint))
  if isinstance(checkpoint, dict):
    class _Dict:
      def __init__(self, d): self.d = d
      def keys(self): return list(self.d)
      def __contains__(self, k): return k in self.d
      def shape(self, k): return np.shape(self.d[k])
      def get(self, k): return np.asarray(self.d[k])
    return _Dict(checkpoint)
  return checkpoint


def _report(missing, unexpected, misshaped) -> str:
  lines = ["the checkpoint does not match the model configuration:"]
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("mis-shaped", misshaped)):
    if items:
      shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
      lines.append(f"  {len(items)} {title}: " + "; ".join(shown))
  return "\n".join(lines)



def locate(path: tuple, targets) -> tuple[tuple, int | None]:
  """(state path, layer index or None) of an entry path (see the module docstring)."""
  if path in targets:
    return path, None
  for j, part in enumerate(path):
    if isinstance(part, int) and not isinstance(part, bool):
      stacked = path[:j] + path[j + 1:]
      if stacked in targets:
        size = targets[stacked].shape[0]
        if not 0 <= part < size:
          raise CheckpointMismatchError(f"layout path {path}: index {part} outside the "
                                        f"{size} stacked entries of {stacked}")
        return stacked, part
      break
  raise CheckpointMismatchError(f"layout path {path} is not a parameter of the model")


def _entry_shape(path, targets) -> tuple:
  target, index = locate(path, targets)
  shape = tuple(targets[target].shape)
  return shape if index is None else shape[1:]


def expected_shapes(flat_abstract: dict, entries) -> dict[str, tuple]:
  """Official tensor shapes, traced from the model's parameter shapes (no memory)."""
  shapes = {}
  for e in entries:
    structs = [jax.ShapeDtypeStruct(_entry_shape(p, flat_abstract), jnp.float32)
               for p in e.paths]
    outs = jax.eval_shape(lambda *a, e=e: e.to_official(*a), *structs)
    for key, out in zip(e.official, outs):
      shapes[key] = tuple(out.shape)
  return shapes


def load_strict(checkpoint, entries, abstract_model, *, progress: bool = False,
                desc: str = "loading"):
  """Fills `abstract_model` (from nnx.eval_shape) with the checkpoint's tensors;
  returns the model."""
  reader = _Reader(_as_source(checkpoint))
  graphdef, abs_state = nnx.split(abstract_model)
  targets = dict(nnx.to_flat_state(abs_state))
  file_keys = set(reader.source.keys())
  missing = [k for e in entries for k in e.official if k not in file_keys]
  expected = expected_shapes(targets, entries)
  misshaped = [f"{k}: file {reader.shape(k)}, expected {expected[k]}"
               for e in entries for k in e.official
               if k in file_keys and reader.shape(k) != expected[k]]
  if missing or misshaped:
    raise CheckpointMismatchError(_report(missing, [], misshaped))
  values, stacks = {}, {}
  it = entries
  if progress:
    from tqdm import tqdm
    it = tqdm(entries, desc=desc, unit="entry")
  for e in it:
    outs = e.to_model(*[reader.get(k) for k in e.official])
    for path, arr in zip(e.paths, outs):
      target, index = locate(path, targets)
      value = jnp.asarray(arr, dtype=targets[target].dtype)
      if index is None:
        values[target] = value
        continue
      if target not in stacks:       # host buffer of the stacked parameter, filled per layer
        stacks[target] = (np.empty(targets[target].shape, np.dtype(value.dtype)), set())
      buf, filled = stacks[target]
      if index in filled:
        raise CheckpointMismatchError(f"layout fills {target}[{index}] twice (path {path})")
      buf[index] = np.asarray(value)
      filled.add(index)
  unexpected = sorted(file_keys - reader.used)
  if unexpected:
    raise CheckpointMismatchError(_report([], unexpected, []))
  for target, (buf, filled) in stacks.items():
    if len(filled) != buf.shape[0]:
      gaps = sorted(set(range(buf.shape[0])) - filled)
      raise CheckpointMismatchError(f"layout leaves {target} indices {gaps} unfilled")
    values[target] = jnp.asarray(buf)
  unset = sorted(map(str, set(targets) - set(values)))
  if unset:
    raise CheckpointMismatchError(f"layout leaves model parameters unset: {unset[:10]}")
  for path, var in targets.items():
    var.set_value(values[path])
  return nnx.merge(graphdef, abs_state)


def export_state_dict(model, entries, dtype=None) -> dict[str, np.ndarray]:
  """The model's parameters under official names and shapes."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

  def value(path):
    target, index = locate(path, flat)
    v = flat[target][...]
    return v if index is None else v[index]

  out = {}
  for e in entries:
    for key, arr in zip(e.official, e.to_official(*[value(p) for p in e.paths])):
      arr = np.asarray(jax.device_get(arr))
      out[key] = arr.astype(dtype) if dtype is not None else arr
  return out
