"""The attention entry point. Every attention in magi_jax goes through `attention(...)`.

A backend is a function `(q, k, v, mask: ChunkMask, *, scale, precision) -> out` with
q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), Hq a multiple of Hkv (GQA; Hkv = 1 is MQA). Backends
differ in speed and memory only; the reference backend defines the result. New backends
(ring attention, splash kernels) plug in with `register_backend`; the mesh backends
'ring', 'ulysses' and 'splash' (magi_jax/parallel) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Callable

from magi_jax.attention.blockwise import blockwise_attention
from magi_jax.attention.masks import (ChunkMask, block_causal_chunk_ranges, caption_ranges,
                                      dense_mask)
from magi_jax.attention.reference import reference_attention
from magi_jax.attention.xla_dpa import dot_product_attention

_BACKENDS: dict[str, Callable] = {
    "reference": reference_attention,
    "dot_product": dot_product_attention,
    "blockwise": blockwise_attention,
}


# Backends that live with the mesh code, imported on first use (they import this package).
_LAZY = {
    "ring": ("magi_jax.parallel.ring_attention", "ring_attention"),
    "ulysses": ("magi_jax.parallel.ulysses", "ulysses_attention"),
    "splash": ("magi_jax.parallel.splash", "splash_attention"),
}


def register_backend(name: str, fn: Callable) -> None:
  _BACKENDS[name] = fn


def backends() -> tuple[str, ...]:
  return tuple(sorted(set(_BACKENDS) | set(_LAZY)))


def get_backend(name: str) -> Callable:
  if name not in _BACKENDS and name in _LAZY:
    module, attr = _LAZY[name]
    _BACKENDS[name] = getattr(importlib.import_module(module), attr)
  if name not in _BACKENDS:
    raise ValueError(f"unknown attention backend {name!r}; available: {backends()}")
  return _BACKENDS[name]


def attention(q, k, v, mask: ChunkMask, *, scale: float, backend: str = "reference",
              precision=None):
  fn = get_backend(backend)
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"attention wants q (B,Sq,H,D) and k == v (B,Sk,Hkv,D); got q{q.shape} "
                     f"k{k.shape} v{v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
  if q.shape[1] != mask.num_q_blocks * mask.q_block:
    raise ValueError(f"mask covers {mask.num_q_blocks} x {mask.q_block} queries, q has {q.shape[1]}")
  return fn(q, k, v, mask, scale=scale, precision=precision)


__all__ = ["ChunkMask", "attention", "backends", "block_causal_chunk_ranges", "caption_ranges",
           "dense_mask", "get_backend", "register_backend"]
