"""MAGI-1's learnable 3D rotary embedding (official dit_module.py, LearnableRotaryEmbeddingCat),
as pure functions.

`nb = (hidden_size // heads) // 8` learned bands serve three axes (T, H, W), so 6·nb = 3/4 of
that head width rotates, in non-interleaved halves: dim m pairs with dim m + 3·nb.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

F32 = jnp.float32


def default_bands(num_bands: int):
  """The official initial value 1 / 10000^(k / nb); checkpoints carry trained values."""
  return (1.0 / (10000.0 ** (jnp.arange(num_bands, dtype=F32) / num_bands))).astype(F32)


def _rescale(p, n, ref):
  """Map coordinates of an axis of n entries onto a reference axis of `ref` entries."""
  # Division first, then the multiplication, both in float32 (as the official). n may be traced.
  n = jnp.asarray(n, F32)
  ref = jnp.asarray(ref, F32)
  return jnp.where(n == 1, p, (p / (n - 1)) * (ref - 1))


def rope_positions(frames: int, height: int, width: int, frame_offset=0):
  """(frames·H·W, 3) float32 (t, h, w) coordinates for frames [offset, offset + frames).

  Time is absolute from the start of the video (the earlier frames live in the KV cache),
  and its float32 rescale depends on the total length offset + frames, which may be traced.
  H and W are centred and rescaled to a grid with the area of 16x16 tokens.
  """
  rescale = math.sqrt(height * width / 256)
  total = jnp.asarray(frame_offset, F32) + frames
  pt = _rescale(jnp.asarray(frame_offset, F32) + jnp.arange(frames, dtype=F32), total, total)
  ph = _rescale(jnp.arange(height, dtype=F32) - jnp.asarray((height - 1) / 2, F32), height,
                height / rescale)
  pw = _rescale(jnp.arange(width, dtype=F32) - jnp.asarray((width - 1) / 2, F32), width,
                width / rescale)
  grid = jnp.stack(jnp.meshgrid(pt, ph, pw, indexing="ij"), axis=-1)
  return grid.reshape(-1, 3)


def packed_rope_positions(frame_index, frame_total, height: int, width: int):
  """(N, frames·H·W, 3) coordinates when each batch row packs several videos.

  frame_index (N, frames): each latent-token frame's index inside its own video;
  frame_total (N, frames): that video's length in token frames. A video placed anywhere in a
  packed row gets exactly the coordinates it has alone (`rope_positions(len, H, W)`), so
  packing does not change what a video's tokens see.
  """
  frame_index = jnp.asarray(frame_index, F32)
  n, frames = frame_index.shape
  pt = _rescale(frame_index, frame_total, frame_total)                      # (N, frames)
  hw = rope_positions(1, height, width)[:, 1:]                              # (H·W, 2)
  pt = jnp.broadcast_to(pt[:, :, None, None], (n, frames, height * width, 1))
  hw = jnp.broadcast_to(hw[None, None], (n, frames, height * width, 2))
  return jnp.concatenate([pt, hw], axis=-1).reshape(n, frames * height * width, 3)


def _angles(pos, bands):
  ang = pos[..., :, None] * bands.astype(F32)
  return ang.reshape(pos.shape[:-1] + (-1,))


def rope_table(bands, frames: int, height: int, width: int, *, frame_offset=0):
  """sin and cos, each (frames·H·W, 3·nb), for the tokens of the current call."""
  ang = _angles(rope_positions(frames, height, width, frame_offset), bands)
  return jnp.sin(ang), jnp.cos(ang)


def packed_rope_table(bands, frame_index, frame_total, height: int, width: int):
  """sin and cos, each (N, frames·H·W, 3·nb): per-row tables for packed sequences."""
  ang = _angles(packed_rope_positions(frame_index, frame_total, height, width), bands)
  return jnp.sin(ang), jnp.cos(ang)


def apply_rope(x, sin, cos):
  """x (..., S, heads, hd) float32; sin/cos (S, r) or per row (N, S, r).

  Rotates the first 2r dims (NeoX halves)."""
  r = sin.shape[-1]
  s, c = sin[..., None, :], cos[..., None, :]
  u1, u2, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
  return jnp.concatenate([u1 * c - u2 * s, u2 * c + u1 * s, rest], axis=-1)
