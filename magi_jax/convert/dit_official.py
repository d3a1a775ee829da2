"""Load an official MAGI-1 DiT checkpoint into `VideoDiT` (strictly) and write one back.

Strict means: every expected tensor present, nothing unexpected, every shape right; all
problems are collected and reported by official name in one error. Tensors are read one at a
time from memory-mapped shards and converted straight into the model's parameter dtype.

fp8 checkpoints (`fp8_quant`) are dequantized on load into the model's weight dtype:
  per-tensor  (weight, weight_scale, input_scale):   W = f32(Wq) · ws · is[0] / is[i]
  per-channel (+ smooth_scale):                      W = f32(Wq) · ws · is / ss[i]
which is what the fp8 GEMM computes when the activation is not quantized (the official
kernel divides x by input_scale (or smooth_scale) per input column, multiplies the product by
input_scale[0] (or input_scale) and weight_scale). The activation rounding to e4m3 is not
emulated: the dequantized model is the fp8 model without its activation quantization noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from magi_jax.configs import ModelConfig
from magi_jax.convert.checkpoint_dir import ShardedCheckpoint
from magi_jax.convert.dit_layout import layout, official_shapes
from magi_jax.convert.safetensors_io import save_safetensors
from magi_jax.models import Precision, VideoDiT

_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
_SCALES = ("weight_scale", "input_scale", "smooth_scale")


class CheckpointMismatchError(ValueError):
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


def load_official_dit(checkpoint, cfg: ModelConfig, *, precision: Precision = Precision.fp32(),
                      distill: bool = False, progress: bool = False) -> VideoDiT:
  """Builds a `VideoDiT` from an official checkpoint directory (or a dict of arrays).

  Parameters promoted to float32 by the official loader (embedders, RoPE bands, self-attn
  q/k norms, post-norms, final layer) are float32; all others take `precision.param_dtype`.
  """
  reader = _Reader(_as_source(checkpoint))
  entries = layout(cfg)
  abstract = nnx.eval_shape(lambda: VideoDiT(cfg, precision=precision, distill=distill,
                                             rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  targets = dict(nnx.to_flat_state(abs_state))

  file_keys = set(reader.source.keys())
  missing = [k for e in entries for k in e.official if k not in file_keys]
  expected = official_shapes(cfg, entries)
  misshaped = [f"{k}: file {reader.shape(k)}, expected {expected[k]}"
               for e in entries for k in e.official
               if k in file_keys and reader.shape(k) != expected[k]]
  if missing or misshaped:
    raise CheckpointMismatchError(_report(missing, [], misshaped))

  values = {}
  it = entries
  if progress:
    from tqdm import tqdm
    it = tqdm(entries, desc="loading DiT", unit="entry")
  for e in it:
    outs = e.to_model(*[reader.get(k) for k in e.official])
    for path, arr in zip(e.paths, outs):
      tgt = targets[path]
      values[path] = jnp.asarray(arr, dtype=tgt.dtype)
  unexpected = sorted(file_keys - reader.used)
  if unexpected:
    raise CheckpointMismatchError(_report([], unexpected, []))
  for path, var in targets.items():
    var.set_value(values[path])
  return nnx.merge(graphdef, abs_state)


def _report(missing, unexpected, misshaped) -> str:
  lines = ["the checkpoint does not match the model configuration:"]
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("mis-shaped", misshaped)):
    if items:
      shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
      lines.append(f"  {len(items)} {title}: " + "; ".join(shown))
  return "\n".join(lines)


def official_state_dict(model: VideoDiT, dtype=None) -> dict[str, np.ndarray]:
  """The model's weights under official names and shapes (float32 promoted ones stay f32)."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for e in layout(model.cfg):
    arrays = [flat[p][...] for p in e.paths]
    for key, arr in zip(e.official, e.to_official(*arrays)):
      arr = np.asarray(jax.device_get(arr))
      out[key] = arr.astype(dtype) if dtype is not None else arr
  return out


def save_official_dit(model: VideoDiT, directory: str, *, max_shard_bytes: int = 5 * 2 ** 30,
                      dtype=None, progress: bool = False) -> None:
  """Writes the official layout: `model.safetensors`, or shards + index when large."""
  import json
  import os
  os.makedirs(directory, exist_ok=True)
  sd = official_state_dict(model, dtype)
  shards, cur, size = [], {}, 0
  for k in sorted(sd):
    if cur and size + sd[k].nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[k] = sd[k]
    size += sd[k].nbytes
  shards.append(cur)
  if len(shards) == 1:
    save_safetensors(shards[0], os.path.join(directory, "model.safetensors"))
    return
  weight_map = {}
  it = enumerate(shards)
  if progress:
    from tqdm import tqdm
    it = tqdm(list(it), desc="writing shards")
  for i, shard in it:
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_safetensors(shard, os.path.join(directory, name))
    weight_map.update({k: name for k in shard})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(a.nbytes for a in sd.values())},
               "weight_map": weight_map}, f, indent=2)
