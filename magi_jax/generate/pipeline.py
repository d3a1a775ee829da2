"""Prompt (+ image or prefix video) -> video file, streamed chunk by chunk.

The sampler yields each chunk as soon as it is clean; it is decoded on its own with the tiled
VAE (latent / scale_factor, 12-frame temporal tiles at 24 fps), converted to uint8 (x·127.5 +
127.5, clamp, truncate) and appended to the output file while later chunks still denoise, so
neither the latents nor the pixels of the whole video are ever held at once. Frame counts
follow the official arithmetic (`magi_jax.media.plan_frames`): T2V 96 -> 96 frames, I2V 96 ->
120, V2V with a 32-frame prefix 96 -> 109.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.generate.components import Components
from magi_jax.generate.request import Request
from magi_jax.media import (VideoWriter, pixels_to_model, plan_frames,
                            prefix_latent_frames_for_video, read_image, read_video, to_uint8)
from magi_jax.models.vae_tiling import TileConfig, iter_tiled_decode, tiled_encode
from magi_jax.diffusion import SamplerOptions, plan_steps
from magi_jax.text import ChunkTextRows, TextFlags
from magi_jax.text.prompts import chunk_text_rows, load_prompt_file


class JittedVAE:
  """The VAE's encode / decode as jitted functions (one compile per tile shape), same interface
  as `ViTVAE` for the tiler."""

  def __init__(self, vae):
    self.cfg, self.precision = vae.cfg, vae.precision
    graphdef, self._state = nnx.split(vae)
    self._encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    self._decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))

  def encode(self, x):
    return self._encode(self._state, x)

  def decode(self, z):
    return self._decode(self._state, z)


@dataclasses.dataclass
class ChunkFrames:
  """One decoded chunk, as `generate(on_chunk=...)` hands it over (already in the file)."""
  index: int                  # 0-based among the chunks written
  frames: np.ndarray          # (T, H, W, 3) uint8: this chunk's new frames
  total_frames: int           # frames written so far, this chunk's included
  seconds: float              # time this chunk took (the first: from the start of generate)


@dataclasses.dataclass
class Result:
  output: str
  frames: int
  chunks: int
  seconds: float
  seconds_per_chunk: list


def _pixels_to_model(frames_uint8, dtype):
  """(T, H, W, 3) uint8 -> (1, 3, T, H, W) in [-1, 1]."""
  return pixels_to_model(jnp.asarray(frames_uint8)[None]).astype(dtype)


def encode_prefix(comp: Components, req: Request, tiles: TileConfig):
  """The prefix latents (1, 16, P, h, w), scaled, or None for T2V."""
  scale = comp.cfg.runtime.scale_factor
  dtype = comp.vae.precision.compute_dtype
  if req.mode == "i2v":
    img = read_image(req.image, req.height, req.width)
    return tiled_encode(comp.vae, _pixels_to_model(img, dtype), tiles).astype(jnp.float32) * scale
  if req.mode == "v2v":
    vid = read_video(req.video, req.height, req.width, fps=req.fps, max_frames=req.prefix_frames)
    prefix_latent_frames_for_video(vid.shape[0], req.fps)    # raises on an unusable length
    return tiled_encode(comp.vae, _pixels_to_model(vid, dtype), tiles).astype(jnp.float32) * scale
  return None


def text_rows(comp: Components, req: Request, flags: TextFlags, *, infer_chunk_num: int,
              clean_chunk_num: int) -> ChunkTextRows:
  schedule = load_prompt_file(req.prompt_file) if req.prompt_file else req.prompt
  null = np.asarray(comp.dit.y_embedder.null_caption_embedding[...], np.float32)
  return chunk_text_rows(comp.text, schedule, null, infer_chunk_num=infer_chunk_num,
                         clean_chunk_num=clean_chunk_num, special=comp.special, flags=flags)


def generate(comp: Components, req: Request, *, flags: TextFlags = TextFlags(),
             options: SamplerOptions = SamplerOptions(), progress: bool = True,
             log=print, on_chunk=None) -> Result:
  """Writes the video of `req` to `req.output`, chunk by chunk; `on_chunk(ChunkFrames)` is
  called after each chunk is in the file (a server streams them from there)."""
  req.validate()
  rt = comp.cfg.runtime
  chunk_width = rt.chunk_width
  tiles = TileConfig(tile_sample_min_length=req.fps // 2)
  t0 = time.perf_counter()
  if not isinstance(comp.vae, JittedVAE):
    comp.vae = JittedVAE(comp.vae)       # compiled once, kept for later calls
  prefix = encode_prefix(comp, req, tiles)
  P = 0 if prefix is None else int(prefix.shape[2])
  plan = plan_frames(req.num_frames, P, chunk_width, rt.temporal_downsample_factor, req.fps)
  rows = text_rows(comp, req, flags, infer_chunk_num=plan.infer_chunk_num,
                   clean_chunk_num=plan.clean_chunk_num)
  sampler = comp.sampler(options)
  h, w = req.height // 8, req.width // 8
  steps_total = len(plan_steps(plan.infer_chunk_num, plan.clean_chunk_num, rt.window_size,
                              rt.num_steps))
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=steps_total, desc=f"{req.mode} {plan.infer_chunk_num} chunks", unit="step")
  on_call = (lambda rec: bar.update(1)) if bar is not None else None
  frames, chunk_times, last = 0, [], time.perf_counter()
  u8_dtype = comp.vae.precision.compute_dtype
  with VideoWriter(req.output, req.height, req.width, fps=req.fps) as writer:
    for chunk in sampler.sample(rows, latent_hw=(h, w), num_chunks=plan.infer_chunk_num,
                                key=jax.random.key(req.seed), prefix=prefix, on_call=on_call):
      z = (chunk.latent / rt.scale_factor).astype(u8_dtype)
      new = []
      for pixels in iter_tiled_decode(comp.vae, z, tiles):    # one temporal tile at a time
        u8 = to_uint8(np.asarray(pixels[0]), compute_dtype=np.dtype(pixels.dtype))
        new.append(np.transpose(u8, (1, 2, 3, 0)))
        writer.append(new[-1])
        frames += u8.shape[1]
      now = time.perf_counter()
      chunk_times.append(now - last)
      last = now
      if on_chunk is not None:
        on_chunk(ChunkFrames(len(chunk_times) - 1, np.concatenate(new), frames, chunk_times[-1]))
      if bar is not None:
        bar.set_postfix(chunk=chunk.index, frames=frames)
  if bar is not None:
    bar.close()
  if frames != plan.output_frames:
    raise RuntimeError(f"wrote {frames} frames, the frame plan says {plan.output_frames}")
  total = time.perf_counter() - t0
  log(f"wrote {req.output}: {frames} frames, {req.width}x{req.height}, "
      f"{len(chunk_times)} chunks in {total:.1f} s (first chunk after {chunk_times[0]:.1f} s)")
  return Result(req.output, frames, len(chunk_times), total, chunk_times)
