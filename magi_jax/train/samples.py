"""Sampling from a model in training: the real MAGI sampler, the model's own text path.

Used by the trainer (periodic sample videos and a PNG frame strip) and by
`experiments.evaluate`. Pixel-space models sample "latents" that are frames in [-1, 1];
latent models go through the VAE decoder given as `decode`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from magi_jax.configs import MagiConfig, _engine, _runtime
from magi_jax.media.read import pixels_to_model
from magi_jax.diffusion.prediction import as_velocity_model
from magi_jax.diffusion.sampler import Sampler, SamplerOptions, final_latent
from magi_jax.text.rows import ChunkTextRows
from magi_jax.text.special_tokens import TextFlags

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  num_steps: int = 16
  window_size: int = 2              # chunks in flight (staggered noise levels)
  text_scale: float = 3.0           # classifier-free guidance on the caption
  prev_scale: float = 1.0           # guidance on the previous chunks (1 = none)
  clean_t: float = 0.9999
  # Chunks each chunk attends to, itself included (MAGI's clean_chunk_kvrange and
  # noise2clean_kvrange, one width for every step); 0 = every earlier chunk. A width no larger
  # than the training videos' chunk count keeps a long rollout's attention at the chunk
  # distances the model was trained on.
  kv_chunks: int = 0

  def __post_init__(self):
    if isinstance(self.kv_chunks, bool) or not isinstance(self.kv_chunks, int) \
        or self.kv_chunks < 0:
      raise ValueError(f"sample.kv_chunks must be an int >= 0 (0 = every earlier chunk), got "
                       f"{self.kv_chunks!r}")


def sampler_config(model, chunk_width: int, s: SampleSettings) -> MagiConfig:
  """The sampling config of a trained model: three guidance passes (cfg 3) for a base model,
  one (cfg 1, step-size embedding, the official nearly-clean blend) for a distilled student;
  every chunk sees all earlier chunks (training is block-causal over the whole video), or the
  last `s.kv_chunks` chunks, itself included."""
  distill = bool(getattr(model, "distill", False))
  widths = (s.kv_chunks,) if s.kv_chunks else ()
  runtime = _runtime(cfg_number=1 if distill else 3, cfg_t_range=(0.0,),
                     prev_chunk_scales=(s.prev_scale,),
                     text_scales=(s.text_scale,), noise2clean_kvrange=widths,
                     clean_chunk_kvrange=s.kv_chunks or -1,
                     clean_t=s.clean_t, num_steps=s.num_steps, window_size=s.window_size,
                     chunk_width=chunk_width, num_frames=chunk_width, video_size_h=256,
                     video_size_w=256)
  return MagiConfig(model=model.cfg, runtime=runtime,
                    engine=_engine(distributed_backend="gloo", distill=distill))


def frames_to_latent(frames):
  """uint8 (T, H, W, 3) -> (1, 3, T, H, W) in [-1, 1]."""
  return pixels_to_model(jnp.asarray(frames)[None])


def latent_to_frames(x) -> np.ndarray:
  """(1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
  x = np.asarray(jnp.transpose(x[0], (1, 2, 3, 0)))
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


class VideoSampler:
  """Generates videos from a trained TrainModel (DiT + demo text encoder + tokenizer)."""

  def __init__(self, model, tokenizer, *, chunk_width: int, prediction: str,
               settings: SampleSettings = SampleSettings(), backend: str = "auto",
               encode: Callable | None = None, decode: Callable | None = None,
               text: Callable | None = None):
    """encode / decode: uint8 frames (T, H, W, 3) <-> the DiT's latents (1, C, T', h, w)
    (default: pixel space); text: captions -> (rows (N, L, C), mask (N, L)) (default: the
    model's trained text encoder on the tokenizer's ids)."""
    self.model, self.tokenizer = model, tokenizer
    self.chunk_width = chunk_width
    self.cfg = sampler_config(model.dit, chunk_width, settings)
    self.sampler = Sampler(as_velocity_model(model.dit, prediction), self.cfg,
                           options=SamplerOptions(backend=backend))
    self._by_scale = {settings.text_scale: self.sampler}     # share the compiled steps
    self.encode = encode or frames_to_latent
    self.decode = decode or latent_to_frames
    if text is None:
      encoder = jax.jit(lambda ids, m: model.text_encoder(ids, m))

      def text(captions):
        ids, mask = tokenizer(captions)
        return encoder(jnp.asarray(ids), jnp.asarray(mask))
    self._text = text

  def text_rows(self, chunk_captions: Sequence[str], num_chunks: int, clean_chunks: int):
    """Rows for the noisy chunks: caption i for noisy chunk i (the last one repeats)."""
    n = num_chunks - clean_chunks
    caps = list(chunk_captions)[clean_chunks:] or list(chunk_captions)[-1:]
    caps = (caps + caps[-1:] * n)[:n]
    emb, m = self._text(caps)
    null = np.asarray(self.model.dit.y_embedder.null_caption_embedding[...], np.float32)
    return ChunkTextRows(np.asarray(emb), np.asarray(m), null, infer_chunk_num=num_chunks,
                         clean_chunk_num=clean_chunks, flags=TextFlags.none())

  def _sampler(self, text_scale: float | None) -> Sampler:
    if text_scale is None:
      return self.sampler
    if text_scale not in self._by_scale:
      self._by_scale[text_scale] = self.sampler.with_runtime(text_scales=(text_scale,))
    return self._by_scale[text_scale]

  def generate(self, chunk_captions: Sequence[str], *, num_chunks: int, height: int, width: int,
               seed: int, prefix_frames: np.ndarray | None = None,
               text_scale: float | None = None) -> np.ndarray:
    """uint8 (T, H, W, 3): the prefix (if any) followed by the generated frames.

    text_scale: this call's caption guidance (default: the settings'); same compiled steps.
    """
    prefix = None if prefix_frames is None else self.encode(prefix_frames)
    clean = 0 if prefix is None else int(prefix.shape[2]) // self.chunk_width
    rows = self.text_rows(chunk_captions, num_chunks, clean)
    chunks = list(self._sampler(text_scale).sample(rows, latent_hw=(height, width),
                                                   num_chunks=num_chunks, key=jax.random.key(seed),
                                                   prefix=prefix))
    video = final_latent(chunks)
    if prefix is not None:
      video = jnp.concatenate([prefix[:, :, :chunks[0].start], video], axis=2)
    return self.decode(video)


def frame_strip(videos: Sequence[np.ndarray], *, scale: int = 4, gap: int = 2) -> np.ndarray:
  """One row per video, one column per frame, nearest-neighbour upscaled: uint8 (H', W', 3).

  Videos may differ in length and width (e.g. truth | sample side by side); all share H.
  """
  T = max(v.shape[0] for v in videos)
  H = videos[0].shape[1]
  Wmax = max(v.shape[2] for v in videos)
  h, w = H * scale, Wmax * scale
  out = np.full((len(videos) * (h + gap) - gap, T * (w + gap) - gap, 3), 64, np.uint8)
  for r, v in enumerate(videos):
    if v.shape[1] != H:
      raise ValueError(f"video {r} has height {v.shape[1]}, the strip's rows are {H}")
    for c in range(v.shape[0]):
      img = np.repeat(np.repeat(v[c], scale, axis=0), scale, axis=1)
      out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + img.shape[1]] = img
  return out


def write_videos(c, videos: Sequence[np.ndarray], names: Sequence[str], workdir: str, step: int,
                 log, echo) -> None:
  """Each video in `config.sample.formats` (mp4 / gif) and their PNG frame strip, under
  <workdir>/samples, the strip also to TensorBoard."""
  import os

  from PIL import Image

  from magi_jax.media.write import write_video
  out = os.path.join(workdir, "samples")
  os.makedirs(out, exist_ok=True)
  for v, name in zip(videos, names):
    for ext in c.sample.formats:
      write_video(os.path.join(out, f"step{step:06d}_{name}.{ext}"), v, fps=c.sample.fps)
  strip = frame_strip(videos)
  Image.fromarray(strip).save(os.path.join(out, f"step{step:06d}_strip.png"))
  if log is not None:
    log.add_image("samples/strip", strip, step)
  echo(f"wrote {len(videos)} sample videos and a frame strip to {out}")
