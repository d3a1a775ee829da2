"""Training on real data, end to end and tiny: a folder of mp4 files + captions.json becomes
TFDS clips with precomputed T5 rows (the tiny T5 fixture), packed by the grain pipeline, encoded
per chunk by a (random tiny) VAE inside the jitted step, and trained for two checkpointed steps.
Config mistakes (chunk_width against frames_per_chunk, the demo text path) fail up front.
"""

from __future__ import annotations

import json
import os

import chex
import jax
import numpy as np
import pytest

from experiments.configs.train_common import train_config
from magi_jax.configs import ConfigError
from magi_jax.media.write import write_video
from magi_jax.train import build
from magi_jax.train.data import train_iterator
from magi_jax.train.trainer import train

pytestmark = pytest.mark.usefixtures("compile_cache")

T5_TINY = os.path.join(os.path.dirname(__file__), "fixtures", "text", "t5_tiny")
T5_WIDTH = 64            # d_model of the tiny T5 (its config.json)
MAX_LEN = 16
SIZE, FRAMES, FPC = 32, 16, 8


def moving_square(colour, seed):
  """(16, 32, 32, 3) uint8: a coloured square crossing a dark background."""
  rng = np.random.default_rng(seed)
  frames = np.full((FRAMES, SIZE, SIZE, 3), 20, np.uint8)
  y0 = int(rng.integers(0, SIZE - 10))
  for t in range(FRAMES):
    x0 = (2 * t) % (SIZE - 8)
    frames[t, y0:y0 + 8, x0:x0 + 8] = colour
  return frames


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  write_video(str(d / "red.mp4"), moving_square((230, 40, 40), 0), fps=24)
  write_video(str(d / "blue.mp4"), moving_square((60, 90, 255), 1), fps=24)
  with open(d / "captions.json", "w") as f:
    json.dump({"red.mp4": "a red square moves right",
               "blue.mp4": {"caption": "a blue square",
                            "chunk_captions": ["a blue square enters", "a blue square leaves"]}},
              f)
  return str(d)


def make_config(folder, data_dir):
  c = train_config()
  c.total_steps = 2
  c.checkpoint_every = 1
  c.log_every = 1
  c.tensorboard = False
  c.sample_at_end = False
  c.optim.warmup_steps = 1
  d = c.data
  d.kind, d.video_dir, d.data_dir = "video_folder", folder, data_dir
  d.height = d.width = SIZE
  d.clip_frames, d.stride, d.frames_per_chunk = FPC, FPC, FPC
  d.batch_size, d.bin_chunks, d.pack_window, d.min_chunks = 2, 2, 4, 1
  c.vae.kind = "random_tiny"        # 16 channels, 8x space, 4x time: 8 frames -> 2 x 4x4
  c.objective.chunk_width = FPC // 4
  c.text.kind, c.text.t5_path, c.text.max_length = "precomputed", T5_TINY, MAX_LEN
  c.model.preset = "tiny"
  c.model.overrides = dict(num_layers=1, hidden_size=64, ffn_hidden_size=128,
                           num_attention_heads=2, num_query_groups=1, kv_channels=32,
                           caption_channels=T5_WIDTH, caption_max_length=MAX_LEN)
  return c


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
  base = tmp_path_factory.mktemp("vf_run")
  c = make_config(folder, str(base / "tfds"))
  workdir = str(base / "work")
  lines = []
  result = train(c, workdir, echo=lines.append)
  return c, workdir, result, lines


def test_trains_two_checkpointed_steps_with_finite_loss(run):
  c, workdir, result, lines = run
  assert result.step == 2 and not result.stopped_by_signal
  loss = float(result.last_metrics["loss"])
  assert np.isfinite(loss) and loss > 0, result.last_metrics
  ckdir = os.path.join(workdir, "checkpoints")
  assert {"1", "2"} <= set(os.listdir(ckdir)), os.listdir(ckdir)
  assert any("step 2/2" in l for l in lines), lines
  # The DiT takes T5 rows (no demo text encoder) and trained in latent space.
  assert result.model.text_encoder is None
  mcfg = result.model.dit.cfg
  assert (mcfg.in_channels, mcfg.caption_channels, mcfg.caption_max_length) == (16, T5_WIDTH,
                                                                              MAX_LEN)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params))


def test_batches_encode_to_per_chunk_latents(run):
  c, workdir, _, _ = run
  batch = next(train_iterator(c, None, workdir, num_threads=0))
  chex.assert_shape(batch["frames"], (2, 2 * FPC, SIZE, SIZE, 3))
  assert batch["frames"].dtype == np.uint8
  chex.assert_shape(batch["segment_ids"], (2, 2))
  chex.assert_shape(batch["text_emb"], (2, 2, MAX_LEN, T5_WIDTH))
  chex.assert_shape(batch["text_mask"], (2, 2, MAX_LEN))
  assert "text_tokens" not in batch
  encode = jax.jit(build.frame_encoder(c))
  x1 = np.asarray(encode(batch["frames"]))
  chex.assert_shape(x1, (2, 16, 4, SIZE // 8, SIZE // 8))
  assert np.isfinite(x1).all() and x1.std() > 0

  # Per-chunk encoding: a chunk's latents do not depend on its row or position. Swap the two
  # chunks of row 0 and put row 1's first chunk in both slots of the other row.
  f = np.asarray(batch["frames"])
  c0, c1, d0 = f[0, :FPC], f[0, FPC:], f[1, :FPC]
  assert not np.array_equal(c0, c1)
  moved = np.stack([np.concatenate([c1, c0]), np.concatenate([d0, d0])])
  y = np.asarray(encode(moved))
  chunk_width = c.objective.chunk_width
  tol = dict(atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(y[0, :, :chunk_width], x1[0, :, chunk_width:], **tol)
  chex.assert_trees_all_close(y[0, :, chunk_width:], x1[0, :, :chunk_width], **tol)
  chex.assert_trees_all_close(y[1, :, :chunk_width], x1[1, :, :chunk_width], **tol)
  chex.assert_trees_all_close(y[1, :, chunk_width:], x1[1, :, :chunk_width], **tol)
  assert np.abs(x1[0, :, :chunk_width] - x1[0, :, chunk_width:]).max() > 1e-3  # frames differ


def test_chunk_width_must_match_frames_per_chunk_under_the_vae(folder, tmp_path):
  c = make_config(folder, str(tmp_path / "tfds"))
  c.objective.chunk_width = FPC          # the pixel-space value; the VAE needs FPC / 4
  with pytest.raises(ConfigError, match=r"objective\.chunk_width.*data\.frames_per_chunk"):
    train(c, str(tmp_path / "work"), echo=lambda s: None)
  with pytest.raises(ConfigError, match=r"data\.frames_per_chunk.*objective\.chunk_width"):
    build.frame_encoder(c)
  assert not os.path.exists(tmp_path / "work" / "checkpoints" / "1")


def test_demo_text_is_rejected_for_video_folder(folder, tmp_path):
  c = make_config(folder, str(tmp_path / "tfds"))
  c.text.kind = "demo"
  with pytest.raises(ConfigError, match="text.kind='demo'.*precomputed"):
    train(c, str(tmp_path / "work"), echo=lambda s: None)
