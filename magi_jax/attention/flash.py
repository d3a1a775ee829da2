"""The 'flash' backend: tiled online-softmax attention with a recomputing backward pass.

Queries and keys are cut into tiles of `block_q` x `block_k` tokens, sizes set for the
hardware (`DEFAULT_BLOCK`), never by the chunk: a 480p MAGI chunk is 9,360 tokens, and a
chunk-sized score tile would be (heads x 9,360 x 9,360) float32. Memory is O(S·D) forward and
backward: the forward keeps only the output and the row log-sum-exp, and the backward
(custom VJP) recomputes each tile's scores. Tiles in which no query sees any key (the upper
triangle of block-causal attention, sliding windows, other videos of a packed row) are skipped
with `lax.cond`, so they cost nothing on CPU, GPU and TPU.

The tile loops are `magi_jax.attention.tiles`, the same code ring attention runs on each ring
step. Sequences are padded up to whole tiles: padded queries see no key, padded keys are seen
by no query. Numerics equal `reference_attention` (probabilities rounded to v's dtype before
the value product; rows that see no key give zeros).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from magi_jax.attention import tiles
from magi_jax.attention.masks import ChunkMask

F32 = jnp.float32

# Tile edge in tokens: a multiple of the TPU's 128-lane MXU tile (splash's default too) and,
# measured on a 2-core CPU for MAGI's perf shapes (benchmarks/dit_forward.py), as fast as any
# of 256-2048 there; chunk-sized tiles (1,536 tokens) were slower.
DEFAULT_BLOCK = 512


def token_ranges(mask: ChunkMask):
  """Per-query key ranges (B, Sq) lo, hi from the per-block ChunkMask."""
  lo = jnp.repeat(mask.kv_ranges[..., 0], mask.q_block, axis=1).astype(jnp.int32)
  hi = jnp.repeat(mask.kv_ranges[..., 1], mask.q_block, axis=1).astype(jnp.int32)
  return lo, hi


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, lo, hi, scale, block_q, block_k, precision):
  return _flash_fwd(q, k, v, lo, hi, scale, block_q, block_k, precision)[0]


def _flash_fwd(q, k, v, lo, hi, scale, block_q, block_k, precision):
  carry = tiles.forward(q, k, v, lo, hi, 0, tiles.init_carry(q), scale=scale, block_q=block_q,
                        block_k=block_k, precision=precision)
  out, lse = tiles.finish(carry, q.dtype)
  return out, (q, k, v, lo, hi, out, lse)


def _flash_bwd(scale, block_q, block_k, precision, res, do):
  q, k, v, lo, hi, out, lse = res
  delta = jnp.einsum("bshgd,bshgd->bhgs", do.astype(F32), out.astype(F32))
  dq, dk, dv = tiles.backward(q, k, v, do.astype(q.dtype), lse, delta, lo, hi, 0,
                              jnp.zeros(q.shape, F32), scale=scale, block_q=block_q,
                              block_k=block_k, precision=precision)
  zeros_int = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros_int(lo),
          zeros_int(hi))


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, mask: ChunkMask, *, scale: float, precision=None,
                    block_q: int | None = None, block_k: int | None = None):
  """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), Hq % Hkv == 0 -> (B, Sq, Hq, D).

  block_q / block_k default to DEFAULT_BLOCK, capped at the (8-padded) sequence lengths.
  """
  B, Sq, Hq, D = q.shape
  Sk, Hkv = k.shape[1], k.shape[2]
  bq = min(block_q or DEFAULT_BLOCK, _round_up(Sq, 8))
  bk = min(block_k or DEFAULT_BLOCK, _round_up(Sk, 8))
  pq, pk = _round_up(Sq, bq) - Sq, _round_up(Sk, bk) - Sk
  lo, hi = token_ranges(mask)
  if pq:
    q = jnp.pad(q, ((0, 0), (0, pq), (0, 0), (0, 0)))
    lo = jnp.pad(lo, ((0, 0), (0, pq)))
    hi = jnp.pad(hi, ((0, 0), (0, pq)))           # [0, 0): padded queries see nothing
  if pk:
    k = jnp.pad(k, ((0, 0), (0, pk), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pk), (0, 0), (0, 0)))
  # Ranges past Sk would reach padded keys; the entry point's callers never build them, but
  # clip so a padded key is never seen.
  hi = jnp.minimum(hi, Sk)
  qg = rearrange(q, "b s (h g) d -> b s h g d", g=Hq // Hkv)
  out = _flash(qg, k, v, lo, hi, float(scale), int(bq), int(bk), precision)
  return rearrange(out, "b s h g d -> b s (h g) d")[:, :Sq]
