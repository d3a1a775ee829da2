"""The one mask description used by every attention backend: per-query-block key ranges.

MAGI-1's masks are all of one shape. The queries are cut into blocks of `q_block` tokens
(one block = one chunk), and block i of batch row b sees exactly the keys
`[kv_ranges[b, i, 0], kv_ranges[b, i, 1])`, with full (non-causal) attention inside that range:

* block-causal self-attention with a sliding window: chunk c sees chunks
  `[max(0, c + 1 - r), c + 1)` of `[KV cache; current chunks]`, r from the kv-range config
  (`chunk_kv_ranges`, the one place this rule is written);
* cross-attention: each chunk is its own batch row and sees its caption tokens `[0, n_valid)`;
* packed training sequences: each segment's chunks see only keys inside the segment (the same
  rule, floored at the segment's first chunk).

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


def chunk_kv_ranges(chunks, *, widths=None, segment_starts=None, cache_start=0,
                    tokens_per_chunk: int = 1):
  """THE block-causal window rule: the key range of each chunk, in one place.

  Chunk c sees chunks [lo, c + 1) with lo = max(first chunk of c's video, c + 1 - width):
  itself, the `width - 1` chunks before it and no chunk of an earlier video. `width` None is
  no window (every earlier chunk of the video: the official default when
  `noise2clean_kvrange` is empty); a width must otherwise be >= 1, a chunk always sees itself.

  Args:
    chunks: absolute chunk indices (any shape; numpy, or jax for traced segment layouts).
    widths: None, or one int | None per chunk (host values: the sampler's window plan).
    segment_starts: the first chunk of each chunk's video (packed training rows; default 0).
    cache_start: the first chunk the key sequence holds ([cache; current] starts there).
    tokens_per_chunk: the unit of the result (1: chunks).

  Returns (*chunks.shape, 2) int32 [start, end) in units of `tokens_per_chunk`, relative to
  `cache_start`; numpy unless an input is a jax array.
  """
  xp = jnp if any(isinstance(a, jax.Array) for a in (chunks, segment_starts)) else np
  c = xp.asarray(chunks, xp.int32)
  lo = xp.zeros_like(c) if segment_starts is None else xp.asarray(segment_starts, xp.int32)
  if widths is not None:
    widths = list(widths)
    if len(widths) != c.size:
      raise ValueError(f"{len(widths)} kv-range widths for {c.size} chunks")
    bad = [w for w in widths if w is not None and (isinstance(w, bool) or int(w) < 1)]
    if bad:
      raise ValueError(f"kv-range widths must be >= 1 (a chunk sees itself) or None (every "
                       f"earlier chunk), got {widths}")
    # No window is the same as a window reaching back past chunk 0.
    w = np.array([int(ci) + 1 if wi is None else int(wi)
                  for ci, wi in zip(np.asarray(c).reshape(-1), widths)], np.int32)
    lo = xp.maximum(lo, c + 1 - xp.asarray(w.reshape(c.shape)))
  out = xp.stack([lo, c + 1], axis=-1) - cache_start
  return (out * tokens_per_chunk).astype(xp.int32)


def caption_ranges(valid_counts: jax.Array) -> jax.Array:
  """Cross-attention ranges for per-chunk caption rows: row r sees keys [0, valid_counts[r])."""
  valid_counts = jnp.asarray(valid_counts, jnp.int32)
  return jnp.stack([jnp.zeros_like(valid_counts), valid_counts], axis=-1)[:, None, :]
