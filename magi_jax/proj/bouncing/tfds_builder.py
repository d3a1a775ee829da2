"""`bouncing_shapes`: the bouncing-shapes world as a tensorflow_datasets builder (array_record).

Why tfds: prepared splits are array_record files with random access (`as_data_source`), which is
what grain reads, and tfds keeps the dataset's version, config and split sizes next to the data.
TensorFlow is not needed at any point:

  * features are `Tensor(dtype=np.uint8 / np.float32)`, scalars and `Text` (`tfds.features.Video`
    and the image codecs need TensorFlow). Strings are `tfds.features.Text` / `Sequence(Text())`:
    written and read back without TensorFlow they come back as utf-8 `bytes` (a list of bytes for
    a sequence; decode with `.decode("utf-8")`). This was checked empirically with tfds 4.9.10:
    `Text` round-trips '', non-ASCII and ';' unchanged, so no bytes-as-uint8 workaround is needed.
  * writing: `GeneratorBasedBuilder(file_format="array_record")` and
    `download_and_prepare(download_config=DownloadConfig(try_download_gcs=False))` (nothing is
    downloaded; statistics are skipped, which is the default);
  * `code_path` is None: tfds would otherwise look for a checksums file next to this module and,
    for a package on a plain path, import `importlib_resources` (not installed, not needed);
  * reading: `builder.as_data_source(split)` -> a random-access sequence of dicts of numpy arrays.

Record order in a split is tfds' shuffle of the example keys, not the seed order, so every record
carries its `seed`; episode `i` of "train" is `simulate(world, i)`, of "test" is
`simulate(world, TEST_SEED_OFFSET + i)`, so the splits never share an episode.

Config names: tfds stores a config at `data_dir/bouncing_shapes/<config name>/<version>` and
reuses whatever is there. A config's name therefore ends in a short hash of its world and episode
counts (`small_1a2b3c4d`), so two different worlds never read each other's files.

Record fields (T frames, n objects, C = T / frames_per_chunk chunks):
  seed int64; frames uint8 (T, H, W, 3); centres float32 (T, n, 2) (y, x) pixels;
  velocities float32 (T, n, 2); colours, shapes: n x bytes; radii float32 (n,);
  caption bytes; chunk_captions: C x bytes; events: C x bytes (a chunk's events joined by ", ").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import tensorflow_datasets as tfds

from magi_jax.proj.bouncing.world import WorldConfig, simulate

TEST_SEED_OFFSET = 1_000_000
VERSION = "1.0.0"


def world_hash(world: WorldConfig, train_episodes: int, test_episodes: int) -> str:
  """8 hex digits identifying (world, split sizes); part of the BuilderConfig name."""
  blob = json.dumps({"world": dataclasses.asdict(world), "train": train_episodes,
                     "test": test_episodes, "version": VERSION}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclasses.dataclass
class BouncingConfig(tfds.core.BuilderConfig):
  """A world plus split sizes. Build with `bouncing_config` so the name carries the hash."""
  world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
  train_episodes: int = 256
  test_episodes: int = 32


def bouncing_config(name: str, world: WorldConfig | None = None, train_episodes: int = 256,
                    test_episodes: int = 32) -> BouncingConfig:
  """A BouncingConfig named f"{name}_{world_hash(...)}"."""
  world = world or WorldConfig()
  for field, v in (("train_episodes", train_episodes), ("test_episodes", test_episodes)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{field} must be a positive integer, got {v!r}")
  h = world_hash(world, train_episodes, test_episodes)
  desc = json.dumps({"world": dataclasses.asdict(world), "train_episodes": train_episodes,
                     "test_episodes": test_episodes}, sort_keys=True)
  return BouncingConfig(name=f"{name}_{h}", description=desc, world=world,
                        train_episodes=train_episodes, test_episodes=test_episodes)


def split_seed(split: str, index: int) -> int:
  """The simulate() seed of episode `index` of `split`."""
  if split == "train":
    return index
  if split == "test":
    return TEST_SEED_OFFSET + index
  raise ValueError(f"unknown split {split!r}; bouncing_shapes has 'train' and 'test'")


class BouncingShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured balls and squares bouncing under gravity, with per-chunk event captions."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [
      # The default (first) config is small: 1 object, 24x24, 16 frames.
      bouncing_config("small", WorldConfig(), train_episodes=256, test_episodes=32),
      bouncing_config("multi", WorldConfig(min_objects=1, max_objects=3), train_episodes=1024,
                      test_episodes=64),
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksums file to find (nothing is downloaded). tfds' default looks for one next to the
    # module and, for a module on a plain path, needs the `importlib_resources` package.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    w = self.builder_config.world
    T, C = w.num_frames, w.num_chunks
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n")[0],
        features=tfds.features.FeaturesDict({
            "seed": np.int64,
            "frames": tfds.features.Tensor(shape=(T, w.height, w.width, 3), dtype=np.uint8),
            "centres": tfds.features.Tensor(shape=(T, None, 2), dtype=np.float32),
            "velocities": tfds.features.Tensor(shape=(T, None, 2), dtype=np.float32),
            "colours": tfds.features.Sequence(tfds.features.Text()),
            "shapes": tfds.features.Sequence(tfds.features.Text()),
            "radii": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "caption": tfds.features.Text(),
            "chunk_captions": tfds.features.Sequence(tfds.features.Text(), length=C),
            "events": tfds.features.Sequence(tfds.features.Text(), length=C),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager   # nothing to download
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.train_episodes),
            "test": self._generate_examples("test", cfg.test_episodes)}

  def _generate_examples(self, split: str, num: int):
    world = self.builder_config.world
    for i in range(num):
      seed = split_seed(split, i)
      yield seed, episode_record(simulate(world, seed))


def episode_record(ep) -> dict:
  """The feature dict of one Episode (what `_generate_examples` writes)."""
  return {
      "seed": ep.seed,
      "frames": ep.frames,
      "centres": ep.centres,
      "velocities": ep.velocities,
      "colours": [c for c, _, _ in ep.objects],
      "shapes": [s for _, s, _ in ep.objects],
      "radii": np.array([r for _, _, r in ep.objects], np.float32),
      "caption": ep.caption,
      "chunk_captions": list(ep.chunk_captions),
      "events": [", ".join(ev) for ev in ep.events],
  }


def download_config() -> tfds.download.DownloadConfig:
  """Local generation only: never look for a prepared copy on GCS."""
  return tfds.download.DownloadConfig(try_download_gcs=False)


def make_builder(data_dir, world: WorldConfig | None = None, train_episodes: int = 256,
                 test_episodes: int = 32, name: str = "custom") -> BouncingShapes:
  """A prepared `bouncing_shapes` builder for `world` under data_dir (generated if missing).

  Returns:
    The builder; read with `builder.as_data_source("train")` (random access, no TensorFlow).
  """
  cfg = bouncing_config(name, world, train_episodes, test_episodes)
  # tfds refuses a config object named like a registered one unless it is that very object.
  registered = {c.name for c in BouncingShapes.BUILDER_CONFIGS}
  builder = BouncingShapes(data_dir=str(data_dir), file_format="array_record",
                           config=cfg.name if cfg.name in registered else cfg)
  builder.download_and_prepare(download_config=download_config())
  return builder
