"""The attention entry point: `attention(q, k, v, ChunkMask, ...)` and its backends.

A backend is a function `(q, k, v, mask: ChunkMask, *, scale, precision) -> out` with
q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), Hq a multiple of Hkv (GQA; Hkv = 1 is MQA). Backends
differ in speed and memory only; the reference backend defines the result.

* 'reference' dense and exact (the yardstick), 'dot_product' `jax.nn.dot_product_attention`
  with a dense mask, 'flash' tiled online softmax with a recomputing backward (O(S·D) memory;
  'blockwise' is its former name and still selects it), 'cudnn' cuDNN's fused attention on
  each chunk's contiguous key range (GPUs; magi_jax/attention/cudnn.py);
* 'ring', 'ulysses' (sequence split over the mesh's 'context' axis) and 'splash' (the Pallas
  TPU kernel) live in magi_jax/parallel and load on first use;
* 'auto' (the default) picks once per traced call from the target platform, the active mesh
  and the mask: `select_backend`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from magi_jax.attention.cudnn import cudnn_attention
from magi_jax.attention.flash import flash_attention
from magi_jax.attention.masks import (ChunkMask, chunk_kv_ranges, caption_ranges,
                                      dense_mask)
from magi_jax.attention.reference import reference_attention
from magi_jax.attention.dot_product import dot_product_attention

_BACKENDS: dict[str, Callable] = {
    "reference": reference_attention,
    "dot_product": dot_product_attention,
    "flash": flash_attention,
    "blockwise": flash_attention,
    "cudnn": cudnn_attention,
}


# Backends that live with the mesh code, imported on first use (they import this package).
_LAZY = {
    "ring": ("magi_jax.attention.ring", "ring_attention"),
    "ulysses": ("magi_jax.attention.ulysses", "ulysses_attention"),
    "splash": ("magi_jax.attention.splash", "splash_attention"),
}

AUTO = "auto"


def register_backend(name: str, fn: Callable) -> None:
  _BACKENDS[name] = fn


def backends() -> tuple[str, ...]:
  return tuple(sorted(set(_BACKENDS) | set(_LAZY) | {AUTO}))


def get_backend(name: str) -> Callable:
  if name not in _BACKENDS and name in _LAZY:
    module, attr = _LAZY[name]
    _BACKENDS[name] = getattr(importlib.import_module(module), attr)
  if name not in _BACKENDS:
    raise ValueError(f"unknown attention backend {name!r}; available: {backends()}")
  return _BACKENDS[name]


def select_backend(q, k, mask: ChunkMask) -> str:
  """What 'auto' runs for this call (shapes and static mask facts only, so once per trace):

  * a mesh with a 'context' axis > 1 and self-attention over the same tokens: 'ring' (it
    falls back to flash where it cannot split);
  * a TPU target and a mask the splash kernel expresses exactly: 'splash';
  * a GPU target, bf16 / fp16 inputs and a mask cuDNN's key lengths express exactly: 'cudnn';
  * otherwise 'flash' (any mask, any platform).
  """
  from magi_jax.parallel.rules import current_mesh, target_platform
  mesh = current_mesh()
  if mesh is not None and mesh.shape.get("context", 1) > 1 and q.shape[1] == k.shape[1]:
    return "ring"
  if target_platform() == "tpu":
    from magi_jax.attention import splash
    if splash.supports(mask, q.shape[1], k.shape[1]):
      return "splash"
  if target_platform() == "gpu":
    from magi_jax.attention import cudnn
    if cudnn.supports(q, k, mask):
      return "cudnn"
  return "flash"


def attention(q, k, v, mask: ChunkMask, *, scale: float, backend: str = AUTO, precision=None):
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"attention wants q (B,Sq,H,D) and k == v (B,Sk,Hkv,D); got q{q.shape} "
                     f"k{k.shape} v{v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
  if q.shape[1] != mask.num_q_blocks * mask.q_block:
    raise ValueError(f"mask covers {mask.num_q_blocks} x {mask.q_block} queries, "
                     f"q has {q.shape[1]}")
  if backend == AUTO:
    backend = select_backend(q, k, mask)
  fn = get_backend(backend)
  return fn(q, k, v, mask, scale=scale, precision=precision)


__all__ = ["AUTO", "ChunkMask", "attention", "backends", "chunk_kv_ranges",
           "caption_ranges", "dense_mask", "get_backend", "register_backend", "select_backend"]
