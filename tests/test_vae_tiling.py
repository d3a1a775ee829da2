"""Tiled VAE calls against a loop-by-loop numpy rendering of the official TileProcessor
(official tile_parallel.py), with deterministic fake tile functions so every difference shows."""

import math

import numpy as np
import pytest

from magi_jax.models.vae_tiling import TileConfig, tiled_decode, tiled_encode

TC = TileConfig(32, 32, 8, 0.25, 0.0, True)


def fake_encode(x):      # (B,3,T,h,w) -> (B,2,T/4,h/8,w/8), depends on the whole tile
  x = np.asarray(x, np.float32)
  lat = x[:, :2, ::4, ::8, ::8]
  return lat + 0.01 * x.sum() + 0.1 * x.shape[3] + 0.01 * x.shape[4]


def fake_decode(z):      # (B,c,T',h',w') -> (B,c,4T',8h',8w')
  z = np.asarray(z, np.float32)
  up = z.repeat(4, 2).repeat(8, 3).repeat(8, 4)
  return up + 0.01 * z.sum() + 0.1 * z.shape[3]


class Vae:
  class cfg:
    patch_size, patch_length = 8, 4

  def __init__(self, enc, dec):
    self.encode, self.decode = enc, dec


def blend(a, b, e, axis):
  b = b.copy()
  e = min(a.shape[axis], b.shape[axis], e)
  for y in range(e):
    sa = [slice(None)] * 5
    sb = [slice(None)] * 5
    sa[axis] = a.shape[axis] - e + y
    sb[axis] = y
    b[tuple(sb)] = a[tuple(sa)] * (1 - y / e) + b[tuple(sb)] * (y / e)
  return b


def reference(fn, x, tile, stride, E, keep, in_place):
  T, H, W = x.shape[2:]
  nT, nH, nW = (math.ceil(n / s) for n, s in zip((T, H, W), stride))
  raw = {}
  for f in range(nT):
    for i in range(nH):
      for j in range(nW):
        raw[f, i, j] = fn(x[:, :, f * stride[0]:f * stride[0] + tile[0],
                            i * stride[1]:i * stride[1] + tile[1],
                            j * stride[2]:j * stride[2] + tile[2]])
  cur = raw if in_place else {k: v.copy() for k, v in raw.items()}
  out = {}
  for f in range(nT):
    for i in range(nH):
      for j in range(nW):
        t = cur[f, i, j]
        src = cur if in_place else raw
        if i > 0:
          t = blend(src[f, i - 1, j], t, E[1], 3)
        if j > 0:
          t = blend(src[f, i, j - 1], t, E[2], 4)
        cur[f, i, j] = t
        out[f, i, j] = t[:, :, :keep[0], :keep[1], :keep[2]]
  return np.concatenate([np.concatenate([np.concatenate([out[f, i, j] for j in range(nW)], 4)
                                         for i in range(nH)], 3) for f in range(nT)], 2)


@pytest.mark.parametrize("shape", [(16, 48, 48), (8, 40, 64), (24, 32, 56)])
def test_tiled_encode_blends_in_place(shape):
  x = np.random.default_rng(0).normal(size=(1, 3) + shape).astype(np.float32)
  got = np.asarray(tiled_encode(Vae(fake_encode, None), x, TC))
  want = reference(fake_encode, x, (8, 32, 32), (8, 24, 24), (0, 1, 1), (2, 3, 3), in_place=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 6, 6), (3, 5, 8), (2, 4, 7)])
def test_tiled_decode_blends_against_raw_neighbours(shape):
  z = np.random.default_rng(1).normal(size=(1, 2) + shape).astype(np.float32)
  got = np.asarray(tiled_decode(Vae(None, fake_decode), z, TC))
  want = reference(fake_decode, z, (2, 4, 4), (2, 3, 3), (0, 8, 8), (8, 24, 24), in_place=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert got.shape[2:] == (4 * shape[0], 8 * shape[1], 8 * shape[2])


def test_without_spatial_tiling_only_time_is_tiled():
  tc = TileConfig(32, 32, 8, 0.25, 0.0, allow_spatial_tiling=False)
  z = np.random.default_rng(2).normal(size=(1, 2, 4, 6, 5)).astype(np.float32)
  got = np.asarray(tiled_decode(Vae(None, fake_decode), z, tc))
  want = np.concatenate([fake_decode(z[:, :, :2]), fake_decode(z[:, :, 2:])], axis=2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  x = np.random.default_rng(3).normal(size=(1, 3, 16, 48, 40)).astype(np.float32)
  got = np.asarray(tiled_encode(Vae(fake_encode, None), x, tc))
  want = np.concatenate([fake_encode(x[:, :, :8]), fake_encode(x[:, :, 8:])], axis=2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
