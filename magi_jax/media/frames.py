"""Frame / chunk arithmetic of the official pipeline (official inference/pipeline/video_process.py,
video_generate.py). Pure, no I/O.

Latents come in chunks of `chunk_width` (6) latent frames; one latent frame is
`temporal_downsample` (4) video frames. A prefix of P latents (1 for I2V, 8 for a 32-frame V2V
prefix) is prepended to the generated latents. Each emitted chunk is decoded on its own in
temporal tiles of `(fps // 2) // temporal_downsample` (3) latents; a tile of k latents gives 4k
frames, except that a 1-latent tile gives 1 frame. Hence, for num_frames 96:
T2V -> 96 output frames, I2V -> 120, V2V with a 32-frame prefix -> 13 + 96 = 109.
"""

from __future__ import annotations

import dataclasses

from magi_jax.media.errors import MediaError

SIZE_MULTIPLE = 16     # VAE x8 then DiT patch 2


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def validate_size(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> None:
  """Raises MediaError unless height and width are positive multiples of `multiple` (16: the
  VAE's x8 and the DiT's patch 2; a pixel-space model needs its patch size only)."""
  why = "VAE x8 and DiT patch 2" if multiple == SIZE_MULTIPLE else "the model's patch size"
  for name, v in (("height", height), ("width", width)):
    if not _is_int(v) or v <= 0:
      raise MediaError(f"{name} {v!r} must be a positive integer (a multiple of {multiple})")
    if v % multiple:
      raise MediaError(f"{name} {v} is not divisible by {multiple} "
                       f"({why}); try {v // multiple * multiple or multiple}")


def validate_num_frames(num_frames: int, temporal_downsample: int = 4) -> None:
  """Raises MediaError unless num_frames is a positive multiple of the temporal downsample."""
  td = temporal_downsample
  if not _is_int(num_frames) or num_frames <= 0:
    raise MediaError(f"num_frames {num_frames!r} must be a positive multiple of {td} "
                     "(the VAE's temporal downsample)")
  if num_frames % td:
    lo = num_frames // td * td
    hint = f"{lo} or {lo + td}" if lo else f"{td}"
    raise MediaError(f"num_frames {num_frames} is not a multiple of {td} (the VAE's temporal "
                     f"downsample); use a multiple of {td}, e.g. {hint}")


def _tile_length(fps: int, unit: int, what: str) -> int:
  """Temporal tile length: fps // 2 frames, expressed in units of `unit` frames."""
  if not _is_int(fps) or fps <= 0:
    raise MediaError(f"fps {fps!r} must be a positive integer")
  n = (fps // 2) // unit
  if n < 1:
    raise MediaError(f"fps {fps} gives a {what} tile of fps//2 = {fps // 2} frames, "
                     f"shorter than {unit}")
  return n


def prefix_latent_frames_for_video(num_video_frames: int, fps: int = 24,
                                   temporal_downsample: int = 4) -> int:
  """Latent frames of the tiled encode of a V2V prefix of `num_video_frames` frames (§3.3).

  The frames are cut into temporal tiles of fps//2 frames (12); a tile of k frames gives
  floor(k / 4) latents, except k == 1 which gives 1 (the frame is repeated 4x). A trailing tile
  of 2 or 3 frames would give 0 latents and is rejected. 32 frames -> 12/12/8 -> 3+3+2 = 8.
  When fps//2 is not a multiple of 4 the encoder silently drops frames in every tile.
  """
  td = temporal_downsample
  tile = _tile_length(fps, 1, "encode")
  if not _is_int(num_video_frames) or num_video_frames < 1:
    raise MediaError(f"video has {num_video_frames} frames; a prefix needs at least 1")
  total = 0
  for start in range(0, num_video_frames, tile):
    k = min(tile, num_video_frames - start)
    if k == 1:
      total += 1
    elif k < td:
      raise MediaError(
          f"a prefix of {num_video_frames} frames leaves a trailing encode tile of {k} frames "
          f"(tiles are fps//2 = {tile} frames); a tile of 2 or 3 frames gives no latent frame, "
          f"so use a frame count whose remainder mod {tile} is 0, 1 or at least {td}")
    else:
      total += k // td
  return total


def decoded_frames(num_latents: int, tile_latents: int = 3, temporal_downsample: int = 4) -> int:
  """Video frames from decoding `num_latents` latents in temporal tiles of `tile_latents`.

  Each tile of k > 1 latents gives k * 4 frames; a tile of exactly 1 latent gives 1 frame.
  """
  total = 0
  for start in range(0, num_latents, tile_latents):
    k = min(tile_latents, num_latents - start)
    total += 1 if k == 1 else k * temporal_downsample
  return total


def emitted_latent_range(chunk: int, prefix_latent_frames: int, chunk_width: int = 6):
  """(start, end) latents written out when chunk `chunk` is done, or None if it is skipped.

  No prefix: [6c, 6c+6). Prefix P: skipped if 6(c+1) <= P, else [max(6c, P), 6c+6); except
  I2V (P == 1, c == 0), which emits the whole [0, 6) including the image slot.
  """
  lo, hi = chunk * chunk_width, (chunk + 1) * chunk_width
  p = prefix_latent_frames
  if p == 1 and chunk == 0:
    return (lo, hi)
  if hi <= p:
    return None
  return (max(lo, p), hi)


@dataclasses.dataclass(frozen=True)
class FramePlan:
  """Every count of one generation, in latent frames unless it says frames."""

  num_frames: int                 # requested new video frames
  prefix_latent_frames: int       # P: 0 (T2V), 1 (I2V), 8 (32-frame V2V)
  chunk_width: int
  temporal_downsample: int
  decode_tile_latents: int        # (fps // 2) // temporal_downsample
  latent_frames: int              # num_frames // temporal_downsample
  clean_chunk_num: int            # P // chunk_width
  infer_chunk_num: int            # ceil((latent_frames + P) / chunk_width)
  total_latent_frames: int        # T_lat = infer_chunk_num * chunk_width
  emitted_chunks: tuple           # chunk index of each emitted chunk
  emitted_latent_ranges: tuple    # (start, end) of each emitted chunk
  chunk_output_frames: tuple      # decoded video frames of each emitted chunk
  output_frames: int              # sum of chunk_output_frames


def plan_frames(num_frames: int, prefix_latent_frames: int, chunk_width: int = 6,
                temporal_downsample: int = 4, fps: int = 24) -> FramePlan:
  """The chunk plan and output frame count of the official pipeline (see the module docstring)."""
  validate_num_frames(num_frames, temporal_downsample)
  p = prefix_latent_frames
  if not _is_int(p) or p < 0:
    raise MediaError(f"prefix_latent_frames {p!r} must be a non-negative integer")
  if not _is_int(chunk_width) or chunk_width < 1:
    raise MediaError(f"chunk_width {chunk_width!r} must be a positive integer")
  tile = _tile_length(fps, temporal_downsample, "decode")
  lat = num_frames // temporal_downsample
  infer = -(-(lat + p) // chunk_width)
  chunks, ranges, counts = [], [], []
  for c in range(infer):
    r = emitted_latent_range(c, p, chunk_width)
    if r is not None:
      chunks.append(c)
      ranges.append(r)
      counts.append(decoded_frames(r[1] - r[0], tile, temporal_downsample))
  return FramePlan(
      num_frames=num_frames, prefix_latent_frames=p, chunk_width=chunk_width,
      temporal_downsample=temporal_downsample, decode_tile_latents=tile, latent_frames=lat,
      clean_chunk_num=p // chunk_width, infer_chunk_num=infer,
      total_latent_frames=infer * chunk_width, emitted_chunks=tuple(chunks),
      emitted_latent_ranges=tuple(ranges), chunk_output_frames=tuple(counts),
      output_frames=sum(counts))
