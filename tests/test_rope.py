"""MAGI-1's learnable 3D RoPE (official dit_module.py): relative positions, which dims rotate,
norms, grid."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax.models.rope import apply_rope, default_bands, rope_positions, rope_table

NB = 4          # bands per axis of the tiny model: (128 // 4) // 8
HD = 32         # head dim (kv_channels) of the tiny model; 6·NB = 24 dims rotate


def _vec(seed, n=1, heads=1, hd=HD):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, heads, hd)), jnp.float32)


def _bands(seed=0):
  # Trained bands are arbitrary values: do not rely on the default 1/10000^(k/nb).
  r = np.random.default_rng(seed)
  return jnp.asarray(r.uniform(0.05, 1.0, NB), jnp.float32)


# ---------------------------------------------------------------------------------------------
# (a) relative positions on the time axis

@pytest.mark.parametrize("t1,t2,d", [(0, 3, 5), (7, 2, 4), (1, 1, 9)])
def test_time_axis_scores_depend_on_differences_only(t1, t2, d):
  frames = 20
  bands = _bands(1)
  sin, cos = rope_table(bands, frames, 1, 1)
  chex.assert_shape((sin, cos), (frames, 3 * NB))
  q, k = _vec(1), _vec(2)

  def score(a, b):
    qa = apply_rope(q, sin[a:a + 1], cos[a:a + 1])
    kb = apply_rope(k, sin[b:b + 1], cos[b:b + 1])
    return float(jnp.sum(qa * kb))

  s0, s1 = score(t1, t2), score(t1 + d, t2 + d)
  np.testing.assert_allclose(s1, s0, rtol=1e-5, atol=1e-5)
  if t1 != t2:
    # ... while the score does change with the difference itself.
    assert abs(score(t1, t2 + 1) - s0) > 1e-3


def test_time_axis_scores_on_a_spatial_grid_with_frame_offset():
  """Same (h, w), time shifted by d, tables built with different frame offsets (as a call with
  a KV cache does): scores agree; the offset table matches the matching rows of a long table."""
  H, W, frames, off = 2, 3, 3, 4
  bands = _bands(2)
  s_long, c_long = rope_table(bands, off + frames, H, W)
  s_off, c_off = rope_table(bands, frames, H, W, frame_offset=off)
  hw = H * W
  np.testing.assert_allclose(np.asarray(s_off), np.asarray(s_long[off * hw:]), atol=2e-6)
  np.testing.assert_allclose(np.asarray(c_off), np.asarray(c_long[off * hw:]), atol=2e-6)

  q, k = _vec(3), _vec(4)
  token_index = lambda t, h, w: (t * H + h) * W + w
  rq = lambda s, c, i: apply_rope(q, s[i:i + 1], c[i:i + 1])
  rk = lambda s, c, i: apply_rope(k, s[i:i + 1], c[i:i + 1])
  # q at (0, 1, 2), k at (2, 1, 2) in the long table vs q at (off+0), k at (off+2) from the
  # offset table (rows 0 and 2 of it).
  q_at, k_at = token_index(0, 1, 2), token_index(2, 1, 2)
  a = float(jnp.sum(rq(s_long, c_long, q_at) * rk(s_long, c_long, k_at)))
  b = float(jnp.sum(rq(s_off, c_off, q_at) * rk(s_off, c_off, k_at)))
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_time_positions_are_absolute_with_offset():
  pos = np.asarray(rope_positions(3, 1, 1, frame_offset=5))
  chex.assert_shape(pos, (3, 3))
  np.testing.assert_allclose(pos[:, 0], [5.0, 6.0, 7.0], rtol=1e-6)
  np.testing.assert_array_equal(pos[:, 1:], 0.0)


# ---------------------------------------------------------------------------------------------
# (b) which dims rotate, against an independent numpy rotation

def test_only_first_6nb_dims_rotate_in_neox_pairs():
  H, W, frames = 2, 2, 3
  bands = _bands(3)
  sin, cos = rope_table(bands, frames, H, W, frame_offset=2)
  S = frames * H * W
  x = np.random.default_rng(5).standard_normal((2, S, 3, HD)).astype(np.float32)
  out = np.asarray(apply_rope(jnp.asarray(x), sin, cos))
  chex.assert_shape(out, x.shape)

  # Independent angles: time absolute (offset 2), H/W centred and scaled to a 16x16-area grid.
  rescale = np.sqrt(H * W / 256)
  ph = (np.arange(H) - (H - 1) / 2) / (H - 1) * (H / rescale - 1)
  pw = (np.arange(W) - (W - 1) / 2) / (W - 1) * (W / rescale - 1)
  b = np.asarray(bands, np.float64)
  r = 3 * NB
  want = x.astype(np.float64).copy()
  for t in range(frames):
    for i in range(H):
      for j in range(W):
        s = (t * H + i) * W + j
        ang = np.concatenate([(2 + t) * b, ph[i] * b, pw[j] * b])     # slots T | H | W
        for m in range(r):
          u1, u2 = x[:, s, :, m], x[:, s, :, m + r]
          want[:, s, :, m] = u1 * np.cos(ang[m]) - u2 * np.sin(ang[m])
          want[:, s, :, m + r] = u2 * np.cos(ang[m]) + u1 * np.sin(ang[m])
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  # Dims 6·nb .. hd-1 pass through bit for bit; the rotated ones did change.
  np.testing.assert_array_equal(out[..., 2 * r:], x[..., 2 * r:])
  assert np.abs(out[..., :2 * r] - x[..., :2 * r]).max() > 0.1


def test_default_bands():
  np.testing.assert_allclose(np.asarray(default_bands(4)),
                             [1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# (c) norms

def test_rotation_preserves_pair_norms():
  H, W, frames = 3, 5, 4
  sin, cos = rope_table(_bands(4), frames, H, W, frame_offset=7)
  S = frames * H * W
  x = jnp.asarray(np.random.default_rng(6).standard_normal((S, 2, HD)), jnp.float32)
  out = apply_rope(x, sin, cos)
  r = 3 * NB
  n_in = np.hypot(np.asarray(x[..., :r]), np.asarray(x[..., r:2 * r]))
  n_out = np.hypot(np.asarray(out[..., :r]), np.asarray(out[..., r:2 * r]))
  np.testing.assert_allclose(n_out, n_in, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jnp.sum(out * out, -1), jnp.sum(x * x, -1), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# (d) spatial grid

@pytest.mark.parametrize("H,W,h_max,w_max", [(45, 45, 7.5, 7.5), (45, 80, 5.5, 10.1666667),
                                             (4, 4, 7.5, 7.5)])
def test_spatial_coordinates_span_reference_grid(H, W, h_max, w_max):
  pos = np.asarray(rope_positions(1, H, W))
  chex.assert_shape(pos, (H * W, 3))
  chex.assert_type(pos, np.float32)
  np.testing.assert_allclose([pos[:, 1].min(), pos[:, 1].max()], [-h_max, h_max], rtol=1e-5)
  np.testing.assert_allclose([pos[:, 2].min(), pos[:, 2].max()], [-w_max, w_max], rtol=1e-5)
  # T-major, then H, then W: token (h, w) = h·W + w; centred, evenly spaced.
  grid_h = pos[:, 1].reshape(H, W)
  grid_w = pos[:, 2].reshape(H, W)
  np.testing.assert_allclose(grid_h[:, 0], np.linspace(-h_max, h_max, H), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grid_w[0], np.linspace(-w_max, w_max, W), rtol=1e-5, atol=1e-6)
  assert np.all(grid_h == grid_h[:, :1]) and np.all(grid_w == grid_w[:1])
