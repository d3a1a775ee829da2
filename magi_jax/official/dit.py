"""Load an official MAGI-1 DiT checkpoint into `VideoDiT` (strictly) and write one back.

Strictness and fp8 handling live in `strict.py`.

fp8 checkpoints (`fp8_quant`) are dequantized on load into the model's weight dtype:
  per-tensor  (weight, weight_scale, input_scale):   W = f32(Wq) · ws · is[0] / is[i]
  per-channel (+ smooth_scale):                      W = f32(Wq) · ws · is / ss[i]
which is what the fp8 GEMM computes when the activation is not quantized (the official
kernel divides x by input_scale (or smooth_scale) per input column, multiplies the product by
input_scale[0] (or input_scale) and weight_scale). The activation rounding to e4m3 is not
emulated: the dequantized model is the fp8 model without its activation quantization noise.
"""

from __future__ import annotations

import json
import os

from flax import nnx

from magi_jax.configs import ModelConfig
from magi_jax.official.dit_layout import layout
from magi_jax.formats.safetensors_io import save_safetensors
from magi_jax.official.strict import (CheckpointMismatchError, dequantize_fp8,  # noqa: F401
                                     export_state_dict, load_strict)
from magi_jax.models import Precision, VideoDiT


def load_official_dit(checkpoint, cfg: ModelConfig, *, precision: Precision = Precision.fp32(),
                      distill: bool = False, progress: bool = False) -> VideoDiT:
  """Builds a `VideoDiT` from an official checkpoint directory (or a dict of arrays).

  Parameters promoted to float32 by the official loader (embedders, RoPE bands, self-attn
  q/k norms, post-norms, final layer) are float32; all others take `precision.param_dtype`.
  """
  abstract = nnx.eval_shape(lambda: VideoDiT(cfg, precision=precision, distill=distill,
                                             rngs=nnx.Rngs(0)))
  return load_strict(checkpoint, layout(cfg), abstract, progress=progress, desc="loading DiT")


def official_state_dict(model: VideoDiT, dtype=None):
  """The model's weights under official names and shapes (float32 promoted ones stay f32)."""
  return export_state_dict(model, layout(model.cfg), dtype)


def save_sharded(sd: dict, directory: str, *, max_shard_bytes: int, progress: bool = False):
  """Writes `model.safetensors`, or shards + `model.safetensors.index.json` when large."""
  os.makedirs(directory, exist_ok=True)
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
    weight_map.update(dict.fromkeys(shard, name))
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(a.nbytes for a in sd.values())},
               "weight_map": weight_map}, f, indent=2)


def save_official_dit(model: VideoDiT, directory: str, *, max_shard_bytes: int = 5 * 2 ** 30,
                      dtype=None, progress: bool = False) -> None:
  save_sharded(official_state_dict(model, dtype), directory, max_shard_bytes=max_shard_bytes,
               progress=progress)
