"""The one mask description used by every attention backend: per-query-block key ranges.

MAGI-1's masks are all of one shape. The queries are cut into blocks of `q_block` tokens
(one block = one chunk), and block i of batch row b sees exactly the keys
`[kv_ranges[b, i, 0], kv_ranges[b, i, 1])`, with full (non-causal) attention inside that range:

* block-causal self-attention with a sliding window: chunk c sees chunks
  `[max(0, c + 1 - r), c + 1)` of `[KV cache; current chunks]`, r from the kv-range config;
* cross-attention: each chunk is its own batch row and sees its caption tokens `[0, n_valid)`;
* packed training sequences: each segment's chunks see only keys inside the segment.

Everything here is a pure function of small integer arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


LAYOUTS = ("general", "causal_segments", "key_prefix")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkMask:
  """Query block i of row b attends to keys [kv_ranges[b, i, 0], kv_ranges[b, i, 1])."""

  kv_ranges: jax.Array                                   # (B, num_q_blocks, 2) int32
  q_block: int = dataclasses.field(metadata=dict(static=True))
  # A static promise about the (possibly traced) ranges, for kernels whose mask must be known
  # at trace time (splash). One of LAYOUTS:
  # * "general": nothing is promised;
  # * "causal_segments": Sk == Sq and every chunk's range ends at its own end and starts at
  #   its own start (it begins a segment) or at the previous chunk's start (it continues that
  #   segment): packed training rows, block-causal attention with an unlimited window;
  # * "key_prefix": one query block per row, seeing keys [0, n_row) (caption cross-attention).
  layout: str = dataclasses.field(default="general", metadata=dict(static=True))

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"ChunkMask layout must be one of {LAYOUTS}, got {self.layout!r}")

  @property
  def num_q_blocks(self) -> int:
    return self.kv_ranges.shape[1]


def concrete_ranges(mask: ChunkMask) -> np.ndarray | None:
  """The mask's kv_ranges as numpy when they are known at trace time, else None (traced under
  jit / grad / vmap): what kernels whose mask must be static check first."""
  try:
    return np.asarray(mask.kv_ranges)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def dense_mask(mask: ChunkMask, num_keys: int) -> jax.Array:
  """(B, Sq, Sk) boolean matrix of the mask; Sq = num_q_blocks * q_block."""
  starts = jnp.repeat(mask.kv_ranges[..., 0], mask.q_block, axis=1)        # (B, Sq)
  ends = jnp.repeat(mask.kv_ranges[..., 1], mask.q_block, axis=1)
  keys = jnp.arange(num_keys)[None, None, :]
  return (keys >= starts[..., None]) & (keys < ends[..., None])


def block_causal_chunk_ranges(first_chunk: int, num_chunks: int, widths, *,
                              cache_start_chunk: int = 0) -> np.ndarray:
  """Chunk-unit ranges [max(0, c + 1 - r), c + 1) for chunks c = first_chunk + j.

  `widths[j]` is the kv-range width r of chunk j (None or <= 0 means "every earlier chunk").
  Returned in chunk units relative to `cache_start_chunk`, shape (num_chunks, 2).
  """
  out = np.zeros((num_chunks, 2), np.int64)
  for j in range(num_chunks):
    c = first_chunk + j
    r = widths[j]
    lo = 0 if (r is None or r <= 0) else max(0, c + 1 - r)
    out[j] = (lo - cache_start_chunk, c + 1 - cache_start_chunk)
  return out


def caption_ranges(valid_counts: jax.Array) -> jax.Array:
  """Cross-attention ranges for per-chunk caption rows: row r sees keys [0, valid_counts[r])."""
  valid_counts = jnp.asarray(valid_counts, jnp.int32)
  return jnp.stack([jnp.zeros_like(valid_counts), valid_counts], axis=-1)[:, None, :]
