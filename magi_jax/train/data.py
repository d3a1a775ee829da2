"""The training batches of a config: a TFDS dataset through the grain pipeline.

* bouncing: the `bouncing_shapes` world of `config.data.world`, generated into the TFDS
  data_dir on first use (array_record), captions tokenized by the demo word tokenizer;
* video_folder: the user's mp4 files + captions.json cut into clips (magi_jax.data.
  tfds_video_folder); text comes as T5 rows precomputed into the dataset.

The iterator is grain's, so its position is saved with every checkpoint.
"""

from __future__ import annotations

import json
import os

import jax

from magi_jax.configs import ConfigError
from magi_jax.data.pipeline import make_pipeline
from magi_jax.train import build

KEEP = ("frames", "latents", "segment_ids", "text_tokens", "text_mask", "text_emb")


class _Batches:
  """The grain iterator with only the keys the train step reads (state passes through)."""

  def __init__(self, it):
    self.it = it

  def __iter__(self):
    return self

  def __next__(self):
    return {k: v for k, v in next(self.it).items() if k in KEEP}

  # grain's orbax handler treats non-DatasetIterator objects as bytes-state iterators.
  def get_state(self) -> bytes:
    return json.dumps(self.it.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.it.set_state(json.loads(state.decode() if isinstance(state, bytes) else state))

  def start_prefetch(self) -> None:
    if hasattr(self.it, "start_prefetch"):
      self.it.start_prefetch()


def data_dir(c, workdir: str) -> str:
  return c.data.data_dir or os.path.join(workdir, "tfds")


def bouncing_source(c, workdir: str, split: str):
  from magi_jax.data.tfds_bouncing import make_builder
  builder = make_builder(data_dir(c, workdir), build.world_config(c),
                         train_episodes=c.data.train_episodes, test_episodes=c.data.test_episodes,
                         name="bouncing")
  return builder.as_data_source(split)


def train_iterator(c, tokenizer, workdir: str, *, num_threads: int = 2):
  d = c.data
  # data.batch_size is the global batch; each process loads its share (trainer.check_batch).
  common = dict(batch_size=d.batch_size // jax.process_count(), bin_chunks=d.bin_chunks, seed=d.shuffle_seed,
                pack_window=d.pack_window, min_chunks=d.min_chunks,
                shard_index=jax.process_index(), shard_count=jax.process_count(),
                num_threads=num_threads)
  if d.kind == "bouncing":
    world = build.world_config(c)
    if world.frames_per_chunk != c.objective.chunk_width:
      raise ConfigError(f"pixel-space training: objective.chunk_width ({c.objective.chunk_width}) "
                        f"must equal the world's frames_per_chunk ({world.frames_per_chunk})")
    def tokenize(text):
      ids, mask = tokenizer([text])
      return ids[0], mask[0]
    it = make_pipeline(bouncing_source(c, workdir, "train"),
                       frames_per_chunk=world.frames_per_chunk, num_chunks=world.num_chunks,
                       tokenize=tokenize if tokenizer is not None else None,
                       **common)
  elif d.kind == "video_folder":
    from magi_jax.data.tfds_video_folder import make_builder
    if not d.video_dir:
      raise ConfigError("data.kind='video_folder' needs data.video_dir (a folder of mp4 files "
                        "and captions.json)")
    if c.text.kind != "precomputed":
      raise ConfigError("video_folder data trains on precomputed T5 rows: set "
                        "text.kind='precomputed' and text.t5_path")
    fpc = d.frames_per_chunk
    want = fpc if c.vae.kind == "none" else fpc // 4
    if c.objective.chunk_width != want:
      raise ConfigError(f"objective.chunk_width ({c.objective.chunk_width}) must be {want}: "
                        f"data.frames_per_chunk {fpc}" + ("" if c.vae.kind == "none" else
                                                          " over the VAE's 4x time compression"))
    from magi_jax.text.encoder import TextEncoder
    encoder = TextEncoder.from_pretrained(c.text.t5_path, max_length=c.text.max_length)
    builder = make_builder(data_dir(c, workdir), d.video_dir, height=d.height, width=d.width,
                           clip_frames=d.clip_frames, frames_per_chunk=d.frames_per_chunk,
                           stride=d.stride, encoder=encoder, encoder_name=c.text.t5_path)
    it = make_pipeline(builder.as_data_source("train"), frames_per_chunk=d.frames_per_chunk,
                       num_chunks=d.clip_frames // d.frames_per_chunk, **common)
  else:
    raise ConfigError(f"config.data.kind must be 'bouncing' or 'video_folder', got {d.kind!r}")
  return _Batches(it)
