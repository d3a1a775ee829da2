"""The pre-flash 'blockwise' geometry as a baseline backend for the benchmarks.

One (heads x chunk x chunk) score tile per (query chunk, key chunk) pair, skipped when no
query sees a key, and differentiated by JAX through the loops (no recomputing VJP): what the
default backend did before the flash backend. `register()` adds it as 'chunk_tiles'.
"""

from __future__ import annotations

from einops import rearrange

from magi_jax.attention import register_backend, tiles
from magi_jax.attention.flash import token_ranges

NAME = "chunk_tiles"


def chunk_tiles_attention(q, k, v, mask, *, scale, precision=None):
  g = q.shape[2] // k.shape[2]
  qg = rearrange(q, "b s (h g) d -> b s h g d", g=g)
  lo, hi = token_ranges(mask)
  carry = tiles.forward(qg, k, v, lo, hi, 0, tiles.init_carry(qg), scale=scale,
                        block_q=mask.q_block, block_k=mask.q_block, precision=precision)
  out, _ = tiles.finish(carry, q.dtype)
  return rearrange(out, "b s h g d -> b s (h g) d")


def register() -> str:
  register_backend(NAME, chunk_tiles_attention)
  return NAME
