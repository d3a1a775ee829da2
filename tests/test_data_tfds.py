"""tfds builders written as array_record and read back with as_data_source, without TensorFlow."""

from __future__ import annotations

import json
import os
import sys

import chex
import numpy as np
import pytest

from magi_jax.data import DataError
from magi_jax.proj.bouncing.world import WorldConfig, simulate
from magi_jax.proj.bouncing.tfds_builder import TEST_SEED_OFFSET, BouncingShapes
from magi_jax.proj.bouncing.tfds_builder import make_builder as make_bouncing
from magi_jax.data.tfds_video_folder import make_builder as make_video
from magi_jax.media.read import read_video
from magi_jax.media.write import write_video

TINY = WorldConfig(num_frames=8, frames_per_chunk=4, min_objects=1, max_objects=2)


def _text(b):
  assert isinstance(b, bytes)
  return b.decode("utf-8")


def test_bouncing_round_trip_equals_simulate(tmp_path):
  builder = make_bouncing(tmp_path, TINY, train_episodes=4, test_episodes=2, name="tiny")
  assert "tensorflow" not in sys.modules
  for split, seeds in (("train", range(4)), ("test", range(TEST_SEED_OFFSET,
                                                            TEST_SEED_OFFSET + 2))):
    ds = builder.as_data_source(split)
    assert len(ds) == len(seeds)
    recs = {int(ds[i]["seed"]): ds[i] for i in range(len(ds))}
    assert sorted(recs) == list(seeds)
    for seed, rec in recs.items():
      ep = simulate(TINY, seed)
      chex.assert_type(rec["frames"], np.uint8)
      chex.assert_shape(rec["frames"], (8, 24, 24, 3))
      np.testing.assert_array_equal(rec["frames"], ep.frames)
      np.testing.assert_array_equal(rec["centres"], ep.centres)
      np.testing.assert_array_equal(rec["velocities"], ep.velocities)
      assert _text(rec["caption"]) == ep.caption
      assert [_text(c) for c in rec["chunk_captions"]] == ep.chunk_captions
      assert [_text(e).split(", ") for e in rec["events"]] == ep.events
      assert [(_text(c), _text(s)) for c, s in zip(rec["colours"], rec["shapes"])] == \
          [(c, s) for c, s, _ in ep.objects]
      np.testing.assert_allclose(rec["radii"], [r for _, _, r in ep.objects], rtol=1e-6)


def test_bouncing_worlds_do_not_collide_and_rebuilds_reuse(tmp_path):
  a = make_bouncing(tmp_path, TINY, train_episodes=2, test_episodes=1, name="w")
  b = make_bouncing(tmp_path, WorldConfig(num_frames=8, gravity=0.0), train_episodes=2,
                    test_episodes=1, name="w")
  assert a.data_dir != b.data_dir
  assert a.builder_config.name.startswith("w_")
  rec_b = b.as_data_source("train")[0]
  np.testing.assert_array_equal(
      rec_b["frames"], simulate(WorldConfig(num_frames=8, gravity=0.0), rec_b["seed"]).frames)
  files = sorted(os.listdir(a.data_dir))
  stamp = os.path.getmtime(os.path.join(a.data_dir, files[0]))
  again = make_bouncing(tmp_path, TINY, train_episodes=2, test_episodes=1, name="w")
  assert again.data_dir == a.data_dir
  assert os.path.getmtime(os.path.join(a.data_dir, files[0])) == stamp


def test_bouncing_default_config_is_small(tmp_path):
  cfg = BouncingShapes(data_dir=str(tmp_path)).builder_config
  assert cfg.name.startswith("small_") and cfg.train_episodes <= 1024


class _Encoder:
  """A deterministic stand-in for the T5 encoder: rows depend on the text."""
  L, D = 5, 3

  def encode(self, texts):
    emb = np.zeros((len(texts), self.L, self.D), np.float32)
    mask = np.zeros((len(texts), self.L), np.int32)
    for i, t in enumerate(texts):
      n = min(len(t), self.L)
      emb[i, :n] = np.arange(n)[:, None] * 0.5 + len(t) + np.arange(self.D)
      mask[i, :n] = 1
    return emb, mask


def _write(folder, name, n, seed=0):
  rng = np.random.default_rng(seed)
  frames = np.repeat(rng.integers(0, 255, (n, 1, 1, 3), np.uint8), 32, 1).repeat(32, 2)
  write_video(os.path.join(folder, name), frames, fps=24)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("videos")
  _write(folder, "a.mp4", 12, 0)
  _write(folder, "b.mp4", 8, 1)
  with open(folder / "captions.json", "w") as f:
    json.dump({"a.mp4": "a red ball",
               "b.mp4": {"caption": "a blue square", "chunk_captions": ["it waits", "it goes"]}},
              f)
  return folder


def test_video_folder_clips_captions_and_embeddings(tmp_path, video_folder):
  enc = _Encoder()
  builder = make_video(tmp_path, video_folder, height=32, width=32, clip_frames=8,
                       frames_per_chunk=4, stride=4, encoder=enc)
  ds = builder.as_data_source("train")
  recs = {(_text(ds[i]["video"]), int(ds[i]["start_frame"])): ds[i] for i in range(len(ds))}
  assert sorted(recs) == [("a.mp4", 0), ("a.mp4", 4), ("b.mp4", 0)]
  decoded = {n: read_video(os.path.join(video_folder, n), 32, 32, fps=24, max_frames=None)
             for n in ("a.mp4", "b.mp4")}
  for (name, start), rec in recs.items():
    chex.assert_type(rec["frames"], np.uint8)
    np.testing.assert_array_equal(rec["frames"], decoded[name][start:start + 8])
    texts = [_text(c) for c in rec["chunk_captions"]]
    assert texts == (["a red ball"] * 2 if name == "a.mp4" else ["it waits", "it goes"])
    emb, mask = enc.encode(texts)
    chex.assert_type(rec["text_emb"], np.float16)
    chex.assert_shape(rec["text_emb"], (2, _Encoder.L, _Encoder.D))
    np.testing.assert_array_equal(rec["text_emb"], emb.astype(np.float16))
    np.testing.assert_array_equal(rec["text_mask"], mask)


def test_video_folder_without_encoder_has_no_embeddings(tmp_path, video_folder):
  builder = make_video(tmp_path, video_folder, height=16, width=16, clip_frames=8,
                       frames_per_chunk=4)
  ds = builder.as_data_source("train")
  assert len(ds) == 2 and "text_emb" not in ds[0]
  chex.assert_shape(ds[0]["frames"], (8, 16, 16, 3))


def _folder(tmp_path, videos, captions):
  folder = tmp_path / "v"
  folder.mkdir()
  for name, n in videos.items():
    if n is None:
      (folder / name).write_bytes(b"this is not an mp4 file at all" * 10)
    else:
      _write(folder, name, n)
  if captions is not None:
    (folder / "captions.json").write_text(json.dumps(captions))
  return folder


@pytest.mark.parametrize("videos, captions, match", [
    ({"a.mp4": 8, "b.mp4": 8}, {"a.mp4": "x"}, r"b\.mp4: no caption"),
    ({"a.mp4": 4}, {"a.mp4": "x"}, r"a\.mp4: video has \d+ frames .* fewer than clip_frames"),
    ({"bad.mp4": None}, {"bad.mp4": "x"}, r"bad\.mp4"),
    ({"a.mp4": 8}, None, r"captions\.json"),
    ({"a.mp4": 8}, {"a.mp4": "x", "gone.mp4": "y"}, r"gone\.mp4"),
    ({"a.mp4": 8}, {"a.mp4": {"caption": "x", "chunk_captions": ["one"]}}, r"a\.mp4: has 1 "),
])
def test_video_folder_errors_name_the_file(tmp_path, videos, captions, match):
  folder = _folder(tmp_path, videos, captions)
  with pytest.raises(DataError, match=match):
    make_video(tmp_path / "data", folder, height=16, width=16, clip_frames=8, frames_per_chunk=4)


def test_video_folder_config_errors(tmp_path, video_folder):
  with pytest.raises(DataError, match="height 20 is not a multiple of 16"):
    make_video(tmp_path, video_folder, height=20, width=16, clip_frames=8, frames_per_chunk=4)
  with pytest.raises(DataError, match="stride 3"):
    make_video(tmp_path, video_folder, height=16, width=16, clip_frames=8, frames_per_chunk=4,
               stride=3)
  with pytest.raises(DataError, match="does not exist"):
    make_video(tmp_path, tmp_path / "nope", height=16, width=16, clip_frames=8,
               frames_per_chunk=4)
