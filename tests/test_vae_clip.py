"""A synthetic clip through the fixture VAE (fp32): tiled encode -> tiled decode shapes and frame
counts (official tile_parallel.py, video_generate.py), tiled == untiled where one tile covers the
input, and the decoded frames streamed chunk by chunk into an mp4 that reads back with the right
frame count."""

import dataclasses
import json
import os

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from magi_jax.official.vae import load_official_vae
from magi_jax.media import (VideoWriter, decoded_frames, prefix_latent_frames_for_video,
                            read_video, to_uint8)
from magi_jax.models.vae import vae_config_from_dict
from magi_jax.models.vae_tiling import TileConfig, tiled_decode, tiled_encode

with open(os.path.join(FIXTURES, "vae_config.json")) as _f:
  _CFG = json.load(_f)
# The fixture's tile settings (32 px, 8 frames, overlap 0.25) with a taller tile, so that a
# 32 x 64 clip is one tile high and three wide (32 + 32 + 16 px): latent tiles 2 x 6 x 4 with
# stride 2 x 4 x 3. Few distinct tile shapes keep the eager per-op compiles (and the test) short.
TC = dataclasses.replace(TileConfig(**_CFG["tiled_call_kwargs"]), tile_sample_min_height=48)
FPS = 2 * TC.tile_sample_min_length        # the pipeline's temporal tile is fps // 2 frames
H, W = 32, 64


@pytest.fixture(scope="module")
def vae():
  return load_official_vae(os.path.join(FIXTURES, "vae_weights.safetensors"),
                           vae_config_from_dict(_CFG))


def moving_square(n, h=H, w=W):
  """(1, 3, n, h, w) float32 in [-1, 1]: a colour gradient and a red square moving right."""
  y, x = np.mgrid[:h, :w].astype(np.float32)
  bg = np.stack([x / w, y / h, np.full_like(x, 0.3)])
  clip = np.repeat(bg[:, None], n, axis=1)
  for i in range(n):
    c = 3 * i % (w - 12)
    clip[:, i, 8:20, c:c + 12] = np.array([1.0, 0.0, 0.0])[:, None, None]
  return (clip * 2 - 1)[None]


@pytest.fixture(scope="module")
def latents(vae):
  """17 frames: temporal tiles of 8 + 8 + 1 frames, three spatial tiles across."""
  return tiled_encode(vae, moving_square(17), TC)


def test_clip_roundtrip_shapes_and_frame_counts(vae, latents):
  z = latents
  n_lat = prefix_latent_frames_for_video(17, fps=FPS)     # 2 + 2 + 1 (1 frame -> 1 latent)
  assert n_lat == 5
  chex.assert_shape(z, (1, 16, n_lat, H // 8, W // 8))
  chex.assert_type(z, jnp.float32)
  chex.assert_tree_all_finite(z)
  out = tiled_decode(vae, z, TC)
  n_out = decoded_frames(n_lat, TC.tile_sample_min_length // vae.cfg.patch_length)  # 8+8+1
  assert n_out == 17
  chex.assert_shape(out, (1, 3, n_out, H, W))
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  # Temporal tiles do not interact: each is the tiled decode of its own latents.
  np.testing.assert_allclose(out[:, :, 8:16], tiled_decode(vae, z[:, :, 2:4], TC), atol=1e-6)
  np.testing.assert_allclose(out[:, :, 16:], tiled_decode(vae, z[:, :, 4:], TC), atol=1e-6)
  # The left tile is never blended into: its kept 24 px columns are its own decode.
  left = vae.decode(z[:, :, :2, :, :4])
  np.testing.assert_allclose(out[:, :, :8, :, :24], left[..., :24], atol=1e-6)
  # ... while the spatially tiled decode differs from one untiled decode (tiles really used).
  assert not np.allclose(out[:, :, :8], vae.decode(z[:, :, :2]), atol=1e-3)


def test_tiled_equals_untiled_when_one_tile_covers_the_input(vae):
  whole = TileConfig(96, 96, 8, 0.25, 0.0, True)       # stride 72 px >= 64: one spatial tile
  clip = moving_square(8)
  z = vae.encode(clip)
  chex.assert_shape(z, (1, 16, 2, H // 8, W // 8))
  np.testing.assert_allclose(tiled_encode(vae, clip, whole), z, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(tiled_decode(vae, z, whole), vae.decode(z), rtol=1e-6, atol=1e-6)
  # A single image: encoded as 4 repeated frames, one latent frame decodes to one frame.
  img = clip[:, :, :1]
  z1 = tiled_encode(vae, img, whole)
  chex.assert_shape(z1, (1, 16, 1, H // 8, W // 8))
  np.testing.assert_allclose(z1, vae.encode(img), rtol=1e-6, atol=1e-6)
  x1 = tiled_decode(vae, z1, whole)
  chex.assert_shape(x1, (1, 3, 1, H, W))
  np.testing.assert_allclose(x1, vae.decode(z1), rtol=1e-6, atol=1e-6)


def test_time_only_tiling_is_untiled_decode_per_temporal_tile(vae, latents):
  tc = dataclasses.replace(TC, allow_spatial_tiling=False)
  z = latents[:, :, 2:]                                # 3 latents -> temporal tiles 2 + 1
  out = tiled_decode(vae, z, tc)
  chex.assert_shape(out, (1, 3, 9, H, W))
  np.testing.assert_allclose(out[:, :, :8], vae.decode(z[:, :, :2]), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out[:, :, 8:], vae.decode(z[:, :, 2:]), rtol=1e-6, atol=1e-6)


def test_decoded_chunks_stream_into_an_mp4(vae, latents, tmp_path):
  z = latents
  path = tmp_path / "clip.mp4"
  written = []
  with VideoWriter(path, H, W, fps=FPS) as w:
    for s in range(0, z.shape[2], 2):                  # one temporal tile per chunk
      frames = to_uint8(tiled_decode(vae, z[:, :, s:s + 2], TC)[0]).transpose(1, 2, 3, 0)
      chex.assert_shape(frames, (None, H, W, 3))
      chex.assert_type(frames, np.uint8)
      w.append(frames)
      written.append(frames)
  written = np.concatenate(written)
  assert w.num_frames == len(written) == decoded_frames(5, tile_latents=2) == 17
  back = read_video(path, H, W, fps=FPS, max_frames=None)
  assert back.shape == (17, H, W, 3) and back.dtype == np.uint8
  # H.264 at CRF 23 smears the random decoder's pixel noise (mean |error| ~50); frame-mean
  # colours survive (max error ~2).
  mean = lambda v: v.astype(np.float32).mean(axis=(1, 2))
  err = np.abs(mean(back) - mean(written))
  assert err.max() < 8, err
