"""What a real run mixes: images as one-frame videos, aspect-ratio buckets and a held-out
split, prepared offline, and the training streams that mix them by weight.

A folder of wide (32x64) and square (32x32) videos and wide / square images is prepared with
two buckets and val_fraction 0.25: each file lands in the bucket of its aspect ratio and the
split its name hashes to; images become one chunk of one latent frame. Training mixes one
stream per train group, images at data.image_ratio per video step; the mix resumes exactly.
"""

from __future__ import annotations

import json

import chex
import numpy as np
import pytest
from PIL import Image

from magi_jax.data.mix import MixedIterator
from magi_jax.data.prepared.job import nearest_bucket, split_of
from magi_jax.data.prepared.records import PreparedSource
from magi_jax.media.write import write_video
from magi_jax.train.data import train_iterator
from magi_jax.train.prepare import prepare_from_config
from test_prepare import prep_config
from test_train_video_folder import FPC, moving_square

pytestmark = pytest.mark.usefixtures("compile_cache")

VAL = 0.25
# name -> (split, kind, bucket); the splits are what split_of gives these names at 0.25.
FILES = {"wide_a.mp4": ("train", "video", "32x64"), "wide_b.mp4": ("train", "video", "32x64"),
         "wide_c.mp4": ("val", "video", "32x64"), "square_a.mp4": ("val", "video", "32x32"),
         "square_b.mp4": ("train", "video", "32x32"),
         "img_w0.png": ("train", "image", "32x64"), "img_w1.png": ("train", "image", "32x64"),
         "img_w2.png": ("val", "image", "32x64"), "img_s0.png": ("train", "image", "32x32"),
         "img_s1.png": ("train", "image", "32x32")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  d = tmp_path_factory.mktemp("mix_videos")
  captions = {}
  for k, name in enumerate(FILES):
    colour = (40 + 20 * k, 200 - 15 * k, 90)
    if name.endswith(".mp4"):
      sq = moving_square(colour, k)
      frames = np.concatenate([sq, sq[:, :, ::-1]], axis=2) if name.startswith("wide") else sq
      write_video(str(d / name), frames, fps=24)
    else:
      h, w = (40, 80) if "_w" in name else (30, 30)
      img = np.full((h, w, 3), 30, np.uint8)
      img[h // 4:h // 2, w // 4:w // 2] = colour
      Image.fromarray(img).save(d / name)
    captions[name] = f"item {k}"
  with open(d / "captions.json", "w") as f:
    json.dump(captions, f)
  return str(d)


def mix_config(folder, out):
  c = prep_config(folder, out)
  c.data.buckets = ((32, 32), (32, 64))
  c.data.val_fraction = VAL
  return c


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("mix_prepared") / "data")
  lines = []
  manifest = prepare_from_config(mix_config(folder, out), videos_per_shard=4, echo=lines.append,
                                 progress=False)
  return out, manifest, lines


def test_bucket_and_split_rules():
  assert nearest_bucket(1080, 1920, ((480, 832), (832, 480), (624, 624))) == (480, 832)
  assert nearest_bucket(1920, 1080, ((480, 832), (832, 480), (624, 624))) == (832, 480)
  assert nearest_bucket(500, 520, ((480, 832), (832, 480), (624, 624))) == (624, 624)
  assert [split_of(n, VAL) for n in FILES] == [s for s, _, _ in FILES.values()]
  assert split_of("anything.mp4", 0.0) == "train"
  names = [f"v{i}.mp4" for i in range(2000)]
  share = np.mean([split_of(n, 0.1) == "val" for n in names])
  assert 0.08 < share < 0.12, share


def test_each_file_lands_in_its_bucket_split_and_kind(prepared):
  out, manifest, lines = prepared
  want = {}
  for split, kind, size in FILES.values():
    g = want.setdefault(f"{split}/{kind}/{size}", {"clips": 0, "chunks": 0})
    n = 2 if kind == "video" else 1              # 16-frame videos: 2 clips of one chunk
    g["clips"] += n
    g["chunks"] += n
  assert manifest["groups"] == want
  assert manifest["totals"]["skipped"] == 0
  assert any("train/image/32x64: 2 clips" in line for line in lines), lines
  src = PreparedSource(out)
  for g, idx in src.groups().items():
    split, kind, size = g.split("/")
    h, w = (int(v) // 8 for v in size.split("x"))
    for i in idx:
      rec = src.record(i)
      assert FILES[rec["video"]] == (split, kind, size)
      T = 1 if kind == "image" else FPC // 4
      chex.assert_shape(rec["latents"], (T, h, w, 16))
      assert rec["chunk_captions"] == [f"item {list(FILES).index(rec['video'])}"]


def test_training_streams_mix_images_and_buckets_and_resume(prepared, folder, tmp_path):
  out, _, _ = prepared
  c = mix_config(folder, out)
  c.data.kind = "prepared"
  c.data.image_ratio = 4.0
  it = train_iterator(c, None, str(tmp_path), num_threads=0).it
  assert isinstance(it, MixedIterator)
  assert it.names == ["train/image/32x32", "train/image/32x64", "train/video/32x32",
                      "train/video/32x64"]
  # images share 4 / 5 by chunks (2 : 2), videos 1 / 5 (2 : 4 chunks)
  np.testing.assert_allclose(it.p, [0.4, 0.4, 1 / 15, 2 / 15])
  seen = {}
  for _ in range(12):
    name = it.pick(it.step)
    b = next(it)
    seen[name] = seen.get(name, 0) + 1
    h, w = (32 // 8, 64 // 8) if name.endswith("32x64") else (4, 4)
    if "/image/" in name:
      chex.assert_shape(b["latents"], (2, 2 * FPC // 4, h, w, 16))   # 4 one-frame chunks
      chex.assert_shape(b["segment_ids"], (2, 4))
      assert b["image_rows"].tolist() == [1, 1]
    else:
      chex.assert_shape(b["latents"], (2, 2 * FPC // 4, h, w, 16))
      chex.assert_shape(b["segment_ids"], (2, 2))
      assert "image_rows" not in b
  assert len(seen) >= 3, seen

  state = json.loads(json.dumps(it.get_state()))
  after = [next(it) for _ in range(5)]
  again = train_iterator(c, None, str(tmp_path), num_threads=0).it
  again.set_state(state)
  for a, b in zip(after, [next(again) for _ in range(5)]):
    chex.assert_trees_all_equal(a, b)


def test_trains_on_the_mix_with_a_validation_loss_per_level(prepared, folder, tmp_path):
  """validation.every=2 over 4 steps: two points in validation.jsonl, per-level buckets, the
  same held-out batches and noise each time (a second evaluation of the same weights agrees)."""
  from magi_jax.train.trainer import train
  out, _, _ = prepared
  c = mix_config(folder, out)
  c.data.kind = "prepared"
  c.data.image_ratio = 4.0
  c.total_steps = 4
  c.validation.every, c.validation.batches = 2, 3
  lines = []
  work = tmp_path / "work"
  result = train(c, str(work), echo=lines.append)
  assert result.step == 4 and np.isfinite(float(result.last_metrics["loss"]))
  rows = [json.loads(r) for r in (work / "validation.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert np.isfinite(r["val/loss"]) and r["val/loss"] > 0
    assert any(k.startswith("val/loss_t/") for k in r), r
  assert rows[0]["val/loss"] != rows[1]["val/loss"]          # the weights moved
  assert sum("validation at step" in line for line in lines) == 2, lines

  from magi_jax.train.validation import held_out_batches
  a, b = held_out_batches(c), held_out_batches(c)
  chex.assert_trees_all_equal(a, b)


def test_validation_needs_a_held_out_split(folder, tmp_path):
  from magi_jax.configs import ConfigError
  from magi_jax.train.validation import held_out_batches
  c = mix_config(folder, "")
  c.validation.every = 10
  with pytest.raises(ConfigError, match="needs a held-out split: train on prepared data"):
    held_out_batches(c)
