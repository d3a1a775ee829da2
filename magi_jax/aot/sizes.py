"""Video sizes of a plan: pixels -> latents -> tokens, and the `--tokens` rule.

The VAE is 8x spatial and 4x temporal (`runtime_config.temporal_downsample_factor`); a chunk is
`chunk_width` latent frames; the DiT cuts latents into patch_size² x t_patch_size patches, so
a chunk is (chunk_width / t_patch_size)·(h / p)·(w / p) tokens.

`--tokens=N` (training) picks the video for about N tokens per packed row: the first of
STANDARD_RESOLUTIONS (largest first) one chunk of which is at most N tokens, then
floor(N / tokens per chunk) chunks (so the row holds at most N tokens, within one chunk of it).
With --height/--width given, only the chunk count is chosen. 4,194,304 tokens on the MAGI-1
presets: 720x1280, 194 chunks of 21,600 tokens = 4,190,400 tokens.

On a mesh with a 'context' axis of N > 1 devices, ring attention splits a row only when its
chunk count is a multiple of N (zig-zag, balanced, when it is a multiple of 2N); otherwise each
device would attend over the whole row. `--tokens` then rounds the chunk count down to a
multiple of 2N (else N) and takes the resolution that keeps the most tokens (the larger one on
ties): 4,194,304 tokens on context 128 are 480x480, 768 chunks of 5,400 tokens = 4,147,200.
An explicit --chunks that N does not divide is an error (`check_context_split`).
"""

from __future__ import annotations

import dataclasses

from magi_jax.aot.errors import AOTError
from magi_jax.configs import MagiConfig
from magi_jax.diffusion import step

VAE_SPATIAL = 8
# (height, width), by pixel count: 720p landscape (the 24B presets), the 4.5B presets' square
# 720, 480p landscape, square 480, 256.
STANDARD_RESOLUTIONS = ((720, 1280), (720, 720), (480, 832), (480, 480), (256, 256))


@dataclasses.dataclass(frozen=True)
class VideoSize:
  height: int                  # pixels
  width: int
  latent_h: int
  latent_w: int
  chunks: int
  tokens_per_chunk: int

  @property
  def tokens(self) -> int:
    return self.chunks * self.tokens_per_chunk

  def describe(self) -> str:
    return (f"{self.height}x{self.width} px, latent {self.latent_h}x{self.latent_w}, "
            f"{self.chunks} chunks x {self.tokens_per_chunk:,} tokens")


def tokens_per_chunk(cfg: MagiConfig, latent_h: int, latent_w: int) -> int:
  return step.tokens_per_chunk(cfg.model, cfg.runtime.chunk_width, (latent_h, latent_w))


def latent_hw(cfg: MagiConfig, height: int, width: int) -> tuple[int, int]:
  """Latent (h, w) of a `height` x `width` video; AOTError unless the VAE and the DiT's patch
  divide it."""
  p = cfg.model.patch_size
  step = VAE_SPATIAL * p
  for flag, v in (("height", height), ("width", width)):
    if not isinstance(v, int) or v <= 0 or v % step:
      raise AOTError(f"--{flag}={v}: must be a positive multiple of {step} (the VAE downsamples "
                     f"{VAE_SPATIAL}x and the DiT patch is {p}x{p} latents)")
  return height // VAE_SPATIAL, width // VAE_SPATIAL


def video_size(cfg: MagiConfig, height: int | None, width: int | None,
               chunks: int | None, default_chunks: int) -> VideoSize:
  """The size from the flags; missing height/width take the preset's runtime video size."""
  if (height is None) != (width is None):
    raise AOTError("give both --height and --width, or neither (the preset's "
                   f"{cfg.runtime.video_size_h}x{cfg.runtime.video_size_w})")
  if height is None:
    height, width = cfg.runtime.video_size_h, cfg.runtime.video_size_w
  h, w = latent_hw(cfg, height, width)
  n = default_chunks if chunks is None else chunks
  if not isinstance(n, int) or n < 1:
    raise AOTError(f"--chunks={n}: must be a positive integer")
  if cfg.runtime.chunk_width % cfg.model.t_patch_size:
    raise AOTError(f"chunk_width {cfg.runtime.chunk_width} is not a multiple of t_patch_size "
                   f"{cfg.model.t_patch_size}")
  return VideoSize(height, width, h, w, n, tokens_per_chunk(cfg, h, w))


def check_context_split(size: VideoSize, context: int) -> None:
  """AOTError unless ring attention can split the row's chunks over `context` devices."""
  if context > 1 and size.chunks % context:
    raise AOTError(
        f"{size.chunks} chunks per row do not split over the mesh's context axis of {context}: "
        f"ring attention needs a multiple of {context} chunks ({2 * context} for the balanced "
        "zig-zag placement), else every device attends over the whole row. Choose --chunks "
        "accordingly, or --tokens, which rounds for the mesh")


def _tokens_for_context(cfg, tokens, candidates, context):
  best = None
  for hh, ww in candidates:
    size = video_size(cfg, hh, ww, 1, 1)
    for m in (2 * context, context):
      n = tokens // size.tokens_per_chunk // m * m
      if n:
        if best is None or n * size.tokens_per_chunk > best.tokens:
          best = dataclasses.replace(size, chunks=n)
        break
  if best is None:
    raise AOTError(f"--tokens={tokens:,}: fewer than {context} chunks (one per device of the "
                   f"context axis) at every resolution tried")
  return best


def size_for_tokens(cfg: MagiConfig, tokens: int, height: int | None = None,
                    width: int | None = None, context: int = 1) -> VideoSize:
  """The `--tokens` rule (module docstring); `context` is the mesh's context-axis size."""
  if not isinstance(tokens, int) or tokens < 1:
    raise AOTError(f"--tokens={tokens}: must be a positive integer")
  if height is not None or width is not None:
    candidates = [(height, width)]
  else:
    candidates = list(STANDARD_RESOLUTIONS)
  if context > 1:
    return _tokens_for_context(cfg, tokens, candidates, context)
  for hh, ww in candidates:
    size = video_size(cfg, hh, ww, 1, 1)
    if size.tokens_per_chunk <= tokens:
      return dataclasses.replace(size, chunks=tokens // size.tokens_per_chunk)
  smallest = video_size(cfg, *candidates[-1], 1, 1)
  raise AOTError(f"--tokens={tokens:,}: fewer than one chunk ({smallest.tokens_per_chunk:,} "
                 f"tokens at {candidates[-1][0]}x{candidates[-1][1]})")
