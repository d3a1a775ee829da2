"""The bouncing-shapes demo as a trainer project (`config.project`): its data source, its word
text encoder and its sample writer (magi_jax/train/project.py says what each hook receives)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import ml_collections
from flax import nnx

from magi_jax.configs import ConfigError
from magi_jax.data.pipeline import make_pipeline
from magi_jax.proj.bouncing.text_encoder import DemoTextEncoder, WordTokenizer
from magi_jax.proj.bouncing.world import WorldConfig, vocabulary
from magi_jax.train.project import Project, TextKind, VideoShape


def world_config(c) -> WorldConfig:
  w = c.data.world
  return WorldConfig(**(w.to_dict() if isinstance(w, ml_collections.ConfigDict) else dict(w)))


def data_dir(c, workdir: str) -> str:
  return c.data.data_dir or os.path.join(workdir, "tfds")


def source(c, workdir: str, split: str):
  """The grain data source of a split of the world, generated into <data_dir> on first use."""
  from magi_jax.proj.bouncing.tfds_builder import make_builder    # lazy: tfds only when used
  builder = make_builder(data_dir(c, workdir), world_config(c),
                         train_episodes=c.data.train_episodes, test_episodes=c.data.test_episodes,
                         name="bouncing")
  return builder.as_data_source(split)


def train_batches(c, workdir: str, tokenizer, common: dict):
  world = world_config(c)
  if world.frames_per_chunk != c.objective.chunk_width:
    raise ConfigError(f"pixel-space training: objective.chunk_width ({c.objective.chunk_width}) "
                      f"must equal the world's frames_per_chunk ({world.frames_per_chunk})")

  def tokenize(text):
    ids, mask = tokenizer([text])
    return ids[0], mask[0]
  return make_pipeline(source(c, workdir, "train"), frames_per_chunk=world.frames_per_chunk,
                       num_chunks=world.num_chunks,
                       tokenize=tokenize if tokenizer is not None else None, **common)


def demo_tokenizer(c) -> WordTokenizer:
  if c.data.kind != "bouncing":
    raise ConfigError("text.kind='demo' needs the bouncing_shapes world's closed vocabulary; "
                      "use text.kind='precomputed' (T5 rows in the dataset) for video_folder")
  return WordTokenizer(vocabulary(world_config(c)), c.text.max_length)


def demo_encoder(c, tokenizer: WordTokenizer, caption_channels: int, rngs: nnx.Rngs):
  t = c.text
  return DemoTextEncoder(tokenizer.vocab_size, t.max_length, t.width, caption_channels,
                         num_layers=t.layers, num_heads=t.heads, rngs=rngs)


def write_samples(c, model, tokenizer, workdir: str, step: int, log, echo) -> None:
  """Held-out continuations and caption-only videos (mp4 / GIF) and their frame strip."""
  from magi_jax.proj.bouncing.evaluation import sample_set
  from magi_jax.train.samples import write_videos
  if c.data.kind != "bouncing":
    raise ConfigError(f"evals 'samples' draws held-out bouncing_shapes episodes; data.kind is "
                      f"{c.data.kind!r} (set config.evals=())")
  videos, names = sample_set(c, model, tokenizer, num=c.sample.num_videos)
  write_videos(c, videos, names, workdir, step, log, echo)


def bouncing_batches(data_dir, world=None, split: str = "train", *, batch_size: int,
                     bin_chunks: int, seed: int, train_episodes: int = 256,
                     test_episodes: int = 32, **kwargs) -> Iterator:
  """`make_pipeline` over the `bouncing_shapes` split of `world` (prepared under data_dir)."""
  from magi_jax.proj.bouncing.tfds_builder import make_builder   # lazy: tfds only when used
  world = world or WorldConfig()
  builder = make_builder(data_dir, world, train_episodes=train_episodes,
                         test_episodes=test_episodes)
  return make_pipeline(builder.as_data_source(split), batch_size=batch_size,
                       bin_chunks=bin_chunks, frames_per_chunk=world.frames_per_chunk,
                       seed=seed, num_chunks=world.num_chunks, **kwargs)


def video_shape(c) -> VideoShape:
  w = world_config(c)
  return VideoShape(w.height, w.width, w.frames_per_chunk, w.num_chunks)


PROJECT = Project(name="bouncing", data={"bouncing": train_batches},
                  text={"demo": TextKind(tokenizer=demo_tokenizer, encoder=demo_encoder)},
                  evals={"samples": write_samples}, shapes={"bouncing": video_shape})
