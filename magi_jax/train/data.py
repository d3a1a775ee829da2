"""The training batches of a config: a TFDS dataset through the grain pipeline.

* video_folder: the user's mp4 files + captions.json cut into clips (magi_jax.data.
  tfds_video_folder); text comes as T5 rows precomputed into the dataset;
* prepared: the same clips already encoded by `experiments.prepare` (VAE latents per chunk and
  T5 rows, magi_jax.data.prepared): no VAE or T5 runs while training;
* any other kind: the data source of that name in `config.project` (magi_jax/train/project.py),
  e.g. 'bouncing' of magi_jax.proj.bouncing.training.

The iterator is grain's, so its position is saved with every checkpoint.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from magi_jax.configs import ConfigError
from magi_jax.data.pipeline import make_pipeline
from magi_jax.train.project import data_source

KEEP = ("frames", "latents", "segment_ids", "text_tokens", "text_mask", "text_emb",
        "image_rows")


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


def check_prepared_data(c):
  """For data.kind='prepared': the directory's manifest, checked against the config (before
  the trainer builds anything); None for other kinds."""
  if c.data.kind != "prepared":
    return None
  from magi_jax.data.prepared.layout import load_manifest
  from magi_jax.train.prepare import check_prepared
  if not c.data.prepared_dir:
    raise ConfigError("data.kind='prepared' needs data.prepared_dir (written by "
                      "python -m experiments.prepare)")
  manifest = load_manifest(c.data.prepared_dir)
  check_prepared(c, manifest, c.data.prepared_dir)
  return manifest


def data_dir(c, workdir: str) -> str:
  return c.data.data_dir or os.path.join(workdir, "tfds")


def common_kwargs(c, *, num_threads: int = 2) -> dict:
  """The pipeline arguments every source shares. data.batch_size is the global batch; each
  process loads its share (trainer.check_batch)."""
  d = c.data
  return dict(batch_size=d.batch_size // jax.process_count(), bin_chunks=d.bin_chunks,
              seed=d.shuffle_seed, pack_window=d.pack_window, min_chunks=d.min_chunks,
              shard_index=jax.process_index(), shard_count=jax.process_count(),
              num_threads=num_threads)


def prepared_streams(c, source, common: dict, *, split: str = "train", echo=print):
  """One grain pipeline per group of `split` in a prepared directory, mixed by weight.

  Video groups (aspect-ratio buckets) share a weight of 1 in proportion to their chunks; image
  groups share `data.image_ratio` the same way (images per step: data.bin_chunks x
  objective.chunk_width one-frame chunks per row, the token count of a video row). Image
  batches carry "image_rows" (the objective trains them as T2V of one-frame chunks)."""
  from magi_jax.data.mix import MixedIterator
  d = c.data
  groups = {g: source.subset(g) for g in source.groups() if g.startswith(split + "/")}
  if not groups:
    raise ConfigError(f"{d.prepared_dir}: no {split!r} records (its groups: "
                      f"{sorted(source.groups())})")
  images = {g for g in groups if g.split("/")[1] == "image"}
  ratio = float(d.get("image_ratio", 0.0))
  if images and ratio <= 0 and len(images) < len(groups):
    echo(f"data: {sum(len(groups[g]) for g in images)} prepared images are not used "
         "(data.image_ratio is 0)")
    groups = {g: s for g, s in groups.items() if g not in images}
    images = set()
  if ratio > 0 and not images:
    raise ConfigError(f"data.image_ratio is {ratio} but {d.prepared_dir} holds no {split} "
                      "images (prepare a folder that has captioned png / jpg files)")
  cw = c.objective.chunk_width
  streams, weights, marks = {}, {}, {}
  for kind, total in (("video", 1.0), ("image", ratio if len(images) < len(groups) else 1.0)):
    names = sorted(g for g in groups if (g in images) == (kind == "image"))
    chunks = {g: sum(groups[g].chunk_counts) for g in names}
    for g in names:
      kw = dict(common)
      if kind == "image":
        kw["bin_chunks"] = d.bin_chunks * cw
        marks[g] = {"image_rows": np.ones((kw["batch_size"],), np.int32)}
      streams[g] = make_pipeline(groups[g], frames_per_chunk=1 if kind == "image" else cw,
                                 num_chunks=groups[g].chunk_counts, **kw)
      weights[g] = total * chunks[g] / sum(chunks.values())
  return MixedIterator(streams, weights, seed=d.shuffle_seed, marks=marks)


def train_iterator(c, tokenizer, workdir: str, *, num_threads: int = 2, echo=print):
  d = c.data
  common = common_kwargs(c, num_threads=num_threads)
  if d.kind == "prepared":
    from magi_jax.data.prepared.records import PreparedSource
    check_prepared_data(c)
    it = prepared_streams(c, PreparedSource(d.prepared_dir), common, echo=echo)
  elif d.kind != "video_folder":
    it = data_source(c)(c, workdir, tokenizer, common)
  else:
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
    from magi_jax.official.t5 import load_text_encoder
    encoder = load_text_encoder(c.text.t5_path, max_length=c.text.max_length)
    builder = make_builder(data_dir(c, workdir), d.video_dir, height=d.height, width=d.width,
                           clip_frames=d.clip_frames, frames_per_chunk=d.frames_per_chunk,
                           stride=d.stride, encoder=encoder, encoder_name=c.text.t5_path)
    it = make_pipeline(builder.as_data_source("train"), frames_per_chunk=d.frames_per_chunk,
                       num_chunks=d.clip_frames // d.frames_per_chunk, **common)
  return _Batches(it)
