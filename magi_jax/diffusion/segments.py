"""Packed training rows: what segment ids mean for the DiT (pure functions).

A training row holds K chunks; `segment_ids` (N, K) gives each chunk's video, 1, 2, ... in
order, runs contiguous, 0 for padding chunks at the end. Inside a video attention is
block-causal, across videos there is none. With one chunk per query block that is exactly
a key range per chunk, so the one mask description of the attention package covers packing:
chunk c of a video that starts at chunk s sees keys [s·tokens_per_chunk,
(c + 1)·tokens_per_chunk). RoPE time restarts per video (`frame_index` / `frame_total`), so a
packed video computes what it computes alone.
"""

from __future__ import annotations

import jax.numpy as jnp

from magi_jax.attention.masks import chunk_kv_ranges


def same_segment(segment_ids):
  """(N, K, K) bool: chunk i and chunk j belong to the same (non-padding) video."""
  s = jnp.asarray(segment_ids)
  return (s[:, :, None] == s[:, None, :]) & (s[:, :, None] > 0)


def segment_layout(segment_ids):
  """Per chunk: (index inside its video, the video's first chunk, the video's length).

  Padding chunks are their own one-chunk "videos" (index 0, start = themselves, length 1).
  """
  seg = jnp.asarray(segment_ids, jnp.int32)
  N, K = seg.shape
  same = same_segment(seg)
  pos = jnp.arange(K, dtype=jnp.int32)
  earlier = pos[None, :] < pos[:, None]                                   # [i, j]: j < i
  index = jnp.sum(same & earlier[None], axis=2).astype(jnp.int32)
  length = jnp.maximum(jnp.sum(same, axis=2), 1).astype(jnp.int32)
  start = pos[None, :] - index
  return index, start, length


def per_segment(values, start):
  """(N, K) values with each chunk taking the value at its video's first chunk (`start` from
  `segment_layout`): one draw per video."""
  return jnp.take_along_axis(values, start, axis=1)


def packed_kv_ranges(segment_ids, tokens_per_chunk: int):
  """(N, K, 2) key ranges of packed rows, each row its own key sequence: chunk c of a video that
  starts at chunk s sees [s·tokens_per_chunk, (c + 1)·tokens_per_chunk) (`chunk_kv_ranges`
  with the segment floor)."""
  seg = jnp.asarray(segment_ids, jnp.int32)
  _, start, _ = segment_layout(seg)
  chunks = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
  return chunk_kv_ranges(chunks, segment_starts=start, tokens_per_chunk=tokens_per_chunk)


def packed_frame_positions(segment_ids, token_frames_per_chunk: int):
  """(frame_index, frame_total), each (N, K·tf): RoPE time coordinates per token frame."""
  index, _, length = segment_layout(segment_ids)
  tf = token_frames_per_chunk
  sub = jnp.arange(tf, dtype=jnp.int32)
  frame_index = (index[:, :, None] * tf + sub).reshape(index.shape[0], -1)
  frame_total = jnp.repeat(length * tf, tf, axis=1)
  return frame_index, frame_total
