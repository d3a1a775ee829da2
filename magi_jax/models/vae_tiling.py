"""Tiled VAE encode / decode (official inference/infra/parallelism/tile_parallel.py): spatial tiles
with overlap and linear blending, temporal tiles without overlap. Pure functions over a per-tile
encode/decode.

The official blending order matters for exact parity and is reproduced: encode blends each
tile IN PLACE against neighbours that were already blended; decode blends a copy of each tile
against its RAW neighbours. Both process one temporal row of tiles at a time, so a tiled
decode holds one temporal tile row plus the output, whatever the frame count.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Pixel-space tile sizes; defaults are the official pipeline's (fps 24 -> 12 frames)."""

  tile_sample_min_height: int = 256
  tile_sample_min_width: int = 256
  tile_sample_min_length: int = 12
  spatial_tile_overlap_factor: float = 0.25
  temporal_tile_overlap_factor: float = 0.0
  allow_spatial_tiling: bool = True


def _blend(prev, cur, extent: int, axis: int):
  """cur's first e entries along `axis` <- prev's last e (weight 1 - y/e) + cur's (weight y/e)."""
  e = min(prev.shape[axis], cur.shape[axis], extent)
  if e <= 0:
    return cur
  shape = [1] * cur.ndim
  shape[axis] = e
  w = (jnp.arange(e, dtype=F32) / e).reshape(shape)
  n = prev.shape[axis]
  tail = jnp.take(prev, jnp.arange(n - e, n), axis=axis).astype(F32)
  head = jnp.take(cur, jnp.arange(e), axis=axis).astype(F32)
  mixed = (tail * (1 - w) + head * w).astype(cur.dtype)     # one rounding, as the compiled blend
  rest = jnp.take(cur, jnp.arange(e, cur.shape[axis]), axis=axis)
  return jnp.concatenate([mixed, rest], axis=axis)


def _starts(n: int, stride: int):
  return list(range(0, n, max(stride, 1)))


def _geometry(tc: TileConfig, size_thw, space: int, time: int, *, latent_in: bool):
  """Tile sizes, strides in the input space, blend extents and crops in the output space."""
  T, H, W = size_thw
  th, tw, tt = tc.tile_sample_min_height, tc.tile_sample_min_width, tc.tile_sample_min_length
  ov, tov = tc.spatial_tile_overlap_factor, tc.temporal_tile_overlap_factor
  if latent_in:     # decode: tiles and strides in latents; blend and crop in pixels
    tile = (tt // time, th // space, tw // space)
    stride = (int(tile[0] * (1 - tov)), int(tile[1] * (1 - ov)), int(tile[2] * (1 - ov)))
    extent = (int(tt * tov), int(th * ov), int(tw * ov))
    keep = (tt - extent[0], th - extent[1], tw - extent[2])
  else:             # encode: tiles and strides in pixels; blend and crop in latents
    tile = (tt, th, tw)
    stride = (int(tt * (1 - tov)), int(th * (1 - ov)), int(tw * (1 - ov)))
    lat = (tt // time, th // space, tw // space)
    extent = (int(lat[0] * tov), int(lat[1] * ov), int(lat[2] * ov))
    keep = (lat[0] - extent[0], lat[1] - extent[1], lat[2] - extent[2])
  if not tc.allow_spatial_tiling:    # one tile spans the whole frame: nothing to blend
    out_hw = (H * space, W * space) if latent_in else (H // space, W // space)
    tile, stride = (tile[0], H, W), (stride[0], H, W)
    extent, keep = (extent[0], 0, 0), (keep[0],) + out_hw
  return tile, stride, extent, keep


def _tiled_rows(fn, x, tc: TileConfig, space: int, time: int, *, latent_in: bool,
                in_place: bool):
  """Yields the output one temporal tile row at a time (blended, cropped)."""
  tile, stride, extent, keep = _geometry(tc, x.shape[2:], space, time, latent_in=latent_in)
  T, H, W = x.shape[2:]
  for f in _starts(T, stride[0]):
    tiles = [[fn(x[:, :, f:f + tile[0], i:i + tile[1], j:j + tile[2]])
              for j in _starts(W, stride[2])] for i in _starts(H, stride[1])]
    raw = tiles if in_place else [list(r) for r in tiles]
    rows_h = []
    for i, row in enumerate(tiles):
      out_row = []
      for j in range(len(row)):
        t = row[j]
        if i > 0:
          t = _blend(raw[i - 1][j], t, extent[1], axis=3)
        if j > 0:
          t = _blend(raw[i][j - 1], t, extent[2], axis=4)
        if in_place:
          tiles[i][j] = t          # later tiles see this blended version
        out_row.append(t[:, :, :keep[0], :keep[1], :keep[2]])
      rows_h.append(jnp.concatenate(out_row, axis=4))
    out = jnp.concatenate(rows_h, axis=3)
    del tiles, raw, rows_h        # only one row of tiles is alive at a time
    yield out


def tiled_encode(vae, x, tc: TileConfig = TileConfig()):
  """Pixels (B, 3, T, H, W) -> posterior mean, tile by tile (official TileProcessor order)."""
  rows = _tiled_rows(vae.encode, x, tc, vae.cfg.patch_size, vae.cfg.patch_length,
                     latent_in=False, in_place=True)
  return jnp.concatenate(list(rows), axis=2)     # latents are small: one concatenate


def iter_tiled_decode(vae, z, tc: TileConfig = TileConfig()):
  """Yields the decoded pixels one temporal tile (12 frames at 24 fps) at a time."""
  yield from _tiled_rows(vae.decode, z, tc, vae.cfg.patch_size, vae.cfg.patch_length,
                         latent_in=True, in_place=False)


def tiled_decode(vae, z, tc: TileConfig = TileConfig()) -> np.ndarray:
  """Latents (B, z, T', H', W') -> pixels (numpy), tile by tile (official TileProcessor order).

  Rows are copied into one preallocated host array and freed as they land, so the peak is
  the output plus one temporal tile row (a concatenate would hold the output twice).
  """
  out, f = None, 0
  for row in iter_tiled_decode(vae, z, tc):
    if out is None:
      frames = _total_frames(z.shape[2], tc, vae.cfg.patch_length, row.shape[2])
      out = np.empty(row.shape[:2] + (frames,) + row.shape[3:], np.dtype(row.dtype))
    out[:, :, f:f + row.shape[2]] = np.asarray(row)
    f += row.shape[2]
    del row
  return out[:, :, :f]


def _total_frames(latent_frames: int, tc: TileConfig, patch_length: int, first_row: int) -> int:
  """Upper bound of the decoded frame count (exact unless the last row is a 1-latent tile)."""
  return max(first_row, latent_frames * patch_length)
