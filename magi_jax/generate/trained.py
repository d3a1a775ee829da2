"""Sampling a training run: `experiments.sample --config.checkpoint=runs/NAME`.

A run directory (what `experiments.train` writes: `checkpoints/` with its `run.json`) gives the
DiT (latest checkpoint or `--config.step`; the EMA weights when the run kept them, the raw
ones with `--config.use_ema=False`) and, for the demo, its trained text encoder. The run's
config gives the rest: pixel space or its VAE (`vae.kind` / `vae.path`, or
`--config.vae_checkpoint`), its text path (the trained encoder, or T5 rows from `text.t5_path`
for `text.kind=precomputed`, or `--config.t5_checkpoint`), the video size and chunk length of
its data, and the sampler settings of its `config.sample`. The sampling config's prompt /
prompt_file / mode / image / video / num_frames / num_steps / text_scales / seed / output apply
on top; `--config.lora` merges a LoRA adapter file into the DiT (`lora_scale` times its
update). The sampler is the training-time one (`magi_jax.train.samples.VideoSampler`), so what
the run wrote as samples is what this command writes for the same prompt and seed.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from magi_jax.configs import ConfigError

_WEIGHT_FIELDS = ("dit_checkpoint",)
RUN_FILE = "run.json"    # magi_jax.train.checkpoint.RUN_FILE (not imported: it needs the train
                         # extra, and the sampling command asks this of every checkpoint path)


def is_run_dir(path: str) -> bool:
  """Whether `path` is a training run directory (it has `checkpoints/run.json`)."""
  return bool(path) and os.path.isfile(os.path.join(path, "checkpoints", RUN_FILE))


@dataclasses.dataclass
class TrainedRun:
  """A run's model ready to sample: the VideoSampler and the video geometry of its data."""
  workdir: str
  step: int
  config: object               # the run's ConfigDict
  sampler: object              # magi_jax.train.samples.VideoSampler
  height: int
  width: int
  frames_per_chunk: int        # pixel frames per chunk
  num_chunks: int              # chunks of the run's training videos
  latent: bool                 # through the run's VAE (else pixel space)

  @property
  def size_multiple(self) -> int:
    """What the frame size divides by: the DiT's patch, times 8 through the VAE."""
    patch = int(self.sampler.model.dit.cfg.patch_size)
    return patch * 8 if self.latent else patch


def apply_lora(dit, path: str, scale: float = 1.0):
  """`dit` with the adapters of a LoRA file merged in, their update times `scale`."""
  from magi_jax.train.lora import LoRAError, load_lora, merge_lora
  if not os.path.isfile(path):
    raise ConfigError(f"--config.lora={path!r} does not exist")
  try:
    return merge_lora(load_lora(path, dit), scale=scale)
  except LoRAError as e:
    raise ConfigError(f"--config.lora: {e}") from None


def load_run(sc) -> TrainedRun:
  """The run of `sc.checkpoint` (a sampling ConfigDict) with `sc`'s weight choices applied."""
  try:
    from magi_jax.train import build
    from magi_jax.train.project import video_shape
    from magi_jax.train.samples import VideoSampler
    from magi_jax.train.trainer import load_trained
  except ImportError as e:
    raise ConfigError(f"--config.checkpoint={sc.checkpoint!r} is a training run; sampling it "
                      f"needs the train extra (pip install -e '.[train]'): {e}") from None
  given = [f for f in _WEIGHT_FIELDS if getattr(sc, f, "")]
  if given:
    raise ConfigError(f"--config.checkpoint={sc.checkpoint!r} is a training run, whose DiT comes "
                      f"from its checkpoints; drop --config.{given[0]}")
  c, model, tokenizer, step = load_trained(sc.checkpoint, step=sc.step or None,
                                           use_ema=bool(sc.use_ema))
  if sc.lora:
    model.dit = apply_lora(model.dit, sc.lora, sc.lora_scale)
  shape = video_shape(c)
  latent = c.vae.kind != "none"
  s = build.sample_settings(c)
  if sc.num_steps:
    s = dataclasses.replace(s, num_steps=int(sc.num_steps))
  if sc.text_scales:
    if len(sc.text_scales) != 1:
      raise ConfigError("--config.text_scales: a training run samples with one text scale, got "
                        f"{list(sc.text_scales)}")
    s = dataclasses.replace(s, text_scale=float(sc.text_scales[0]))
  encode = decode = None
  if latent:
    encode, decode = _vae_codec(c, sc)
  text = _t5_rows(c, sc) if c.text.kind == "precomputed" else None
  sampler = VideoSampler(model, tokenizer, chunk_width=c.objective.chunk_width,
                         prediction=c.model.prediction, settings=s,
                         backend=sc.backend if sc.backend != "auto" else c.model.backend,
                         encode=encode, decode=decode, text=text)
  return TrainedRun(sc.checkpoint, step, c, sampler, shape.height, shape.width,
                    shape.frames_per_chunk, shape.num_chunks, latent)


def _vae_codec(c, sc):
  """(encode, decode) through the run's VAE: each chunk of frames on its own, as in training."""
  from magi_jax.train.build import frozen_vae
  from magi_jax.train.step import vae_chunk_encoder
  from magi_jax.train.samples import latent_to_frames
  path = sc.vae_checkpoint or ("" if c.vae.kind == "random_tiny" else c.vae.path)
  if path and not os.path.isdir(path):
    raise ConfigError(f"the run's VAE {path!r} is not a directory (the run trained with "
                      f"vae.path={c.vae.path!r}; pass --config.vae_checkpoint)")
  vae = frozen_vae(c, sc.vae_checkpoint)           # the VAE the run trained with
  F, K = c.data.frames_per_chunk, c.objective.chunk_width
  chunk_encode = jax.jit(vae_chunk_encoder(vae, scale_factor=c.vae.scale_factor,
                                           frames_per_chunk=F))
  graphdef, state = nnx.split(vae)
  scale = c.vae.scale_factor

  @jax.jit
  def decode_chunk(z):
    m = nnx.merge(graphdef, state)
    return m.decode((z / scale).astype(m.precision.compute_dtype)).astype(jnp.float32)

  def encode(frames):
    if frames.shape[0] % F:
      raise ConfigError(f"a prefix of {frames.shape[0]} frames: a latent-space run encodes whole "
                        f"chunks of {F} frames (the run's data.frames_per_chunk)")
    return chunk_encode(jnp.asarray(frames)[None])

  def decode(z):
    parts = [decode_chunk(z[:, :, i:i + K]) for i in range(0, z.shape[2], K)]
    return latent_to_frames(jnp.concatenate(parts, axis=2))

  return encode, decode


def _t5_rows(c, sc):
  """captions -> T5 rows, as the run's dataset precomputed them (`text.t5_path`)."""
  from magi_jax.official.t5 import load_text_encoder
  path = sc.t5_checkpoint or c.text.t5_path
  if not os.path.isdir(path):
    raise ConfigError(f"the run's T5 {path!r} is not a directory (the run trained with "
                      f"text.t5_path={c.text.t5_path!r}; pass --config.t5_checkpoint)")
  enc = load_text_encoder(path, max_length=c.text.max_length)
  return lambda captions: tuple(jnp.asarray(a) for a in enc.encode(list(captions)))


def chunk_plan(run: TrainedRun, num_frames: int) -> int:
  """Chunks to generate for `num_frames` pixel frames (0: the run's video length)."""
  F = run.frames_per_chunk
  if not num_frames:
    return run.num_chunks
  if num_frames % F:
    raise ConfigError(f"--config.num_frames={num_frames}: this run's chunks are {F} frames; use "
                      f"a multiple of {F}")
  return num_frames // F


def _prefix(run: TrainedRun, sc, num_chunks: int):
  """uint8 prefix frames (or None) of the sampling config's mode."""
  from magi_jax.media import read_image, read_video
  F = run.frames_per_chunk
  if sc.mode == "t2v":
    return None
  if sc.mode == "i2v":
    if run.latent:
      raise ConfigError("--config.mode=i2v: a latent-space run encodes whole chunks of "
                        f"{F} frames; give a clip as --config.mode=v2v --config.video=...")
    return read_image(sc.image, run.height, run.width, multiple=run.size_multiple)
  frames = read_video(sc.video, run.height, run.width, fps=run.config.sample.fps,
                      max_frames=sc.prefix_frames or None, multiple=run.size_multiple)
  whole = (frames.shape[0] // F) * F
  if whole == 0:
    raise ConfigError(f"--config.video={sc.video!r}: {frames.shape[0]} frames, fewer than one "
                      f"chunk of this run ({F} frames)")
  if whole // F >= num_chunks:
    raise ConfigError(f"--config.video: a prefix of {whole // F} chunks leaves nothing to "
                      f"generate in {num_chunks} chunks; raise --config.num_frames")
  return frames[:whole]


def captions(sc, num_chunks: int, clean_chunks: int) -> list[str]:
  """One caption per chunk: the prompt, or the prompt file's schedule over generated chunks."""
  from magi_jax.text.prompts import load_prompt_file, prompts_per_chunk
  n = num_chunks - clean_chunks
  per_chunk = prompts_per_chunk(load_prompt_file(sc.prompt_file) if sc.prompt_file
                                else sc.prompt, n)
  return [per_chunk[0]] * clean_chunks + per_chunk


def generate_run(run: TrainedRun, sc):
  """uint8 frames (T, H, W, 3) of the sampling config's request from `run`: the prefix (V2V /
  I2V) followed by the generated frames."""
  if sc.mode not in ("t2v", "i2v", "v2v"):
    raise ConfigError(f"--config.mode={sc.mode!r}: t2v | i2v | v2v")
  if sc.height or sc.width:
    raise ConfigError("--config.height / width: a training run samples at its data's size "
                      f"({run.height}x{run.width}); leave them 0")
  num_chunks = chunk_plan(run, sc.num_frames)
  prefix = _prefix(run, sc, num_chunks)
  clean = 0 if prefix is None else prefix.shape[0] // run.frames_per_chunk
  caps = captions(sc, num_chunks, clean)
  down = 8 if run.latent else 1              # the sampler's grid: the VAE's, or the pixels
  return run.sampler.generate(caps, num_chunks=num_chunks, height=run.height // down,
                              width=run.width // down, seed=sc.seed, prefix_frames=prefix)


def sample_run(sc, log=print):
  """Writes `sc.output` from the run `sc.checkpoint`; returns magi_jax.generate.Result."""
  from magi_jax.generate.pipeline import Result
  from magi_jax.media.write import write_video
  t0 = time.perf_counter()
  run = load_run(sc)
  video = generate_run(run, sc)
  write_video(sc.output, video, fps=run.config.sample.fps)
  total = time.perf_counter() - t0
  chunks = -(-video.shape[0] // run.frames_per_chunk)
  log(f"wrote {sc.output}: {video.shape[0]} frames, {run.width}x{run.height}, {chunks} "
      f"chunks in {total:.1f} s (run {run.workdir}, step {run.step})")
  # The training-time sampler returns the whole video at once: no per-chunk times.
  return Result(sc.output, int(video.shape[0]), chunks, total, [])
