"""The bouncing-world metrics on hand-drawn videos whose right answers are known: discs at
known (sub-pixel) centres, shifted copies, blank predictions, uniform motion, noisy colours."""

import chex
import numpy as np
import pytest

from magi_jax.proj.bouncing import metrics as bm

RED, GREEN, BLUE, YELLOW = (230, 40, 40), (40, 200, 40), (60, 90, 255), (230, 220, 40)
PALETTE = {"red": RED, "green": GREEN, "blue": BLUE, "yellow": YELLOW}
H = W = 32


def disc(cy, cx, r=4.0, colour=BLUE, h=H, w=W, ss=8):
  """(h, w, 3) uint8 anti-aliased disc (8x8 supersampled coverage) on black."""
  o = (np.arange(ss) + 0.5) / ss - 0.5
  y = np.arange(h)[:, None, None, None] + o[None, None, :, None]
  x = np.arange(w)[None, :, None, None] + o[None, None, None, :]
  cov = (((y - cy) ** 2 + (x - cx) ** 2) <= r * r).mean(axis=(2, 3))
  return np.rint(cov[..., None] * np.asarray(colour, float)).astype(np.uint8)


def video(path, **kw):
  return np.stack([disc(cy, cx, **kw) for cy, cx in path])


def test_bright_mask_threshold_and_dtypes():
  f = np.zeros((2, 4, 5, 3), np.uint8)
  f[0, 1, 2] = (0, 81, 0)    # max channel above 80: object
  f[0, 2, 2] = (80, 80, 80)  # exactly 80: not an object (strict)
  f[1, 3, 4] = (255, 0, 0)
  m = bm.bright_mask(f)
  chex.assert_shape(m, (2, 4, 5))
  chex.assert_type(m, bool)
  assert m.sum() == 2 and m[0, 1, 2] and m[1, 3, 4]
  np.testing.assert_array_equal(bm.bright_mask(f.astype(np.float32)), m)
  np.testing.assert_array_equal(bm.bright_pixel_count(f), [1, 1])


def test_centres_of_discs_within_a_tenth_of_a_pixel():
  rng = np.random.default_rng(0)
  path = rng.uniform(8.0, 24.0, size=(12, 2))
  c = bm.centres(video(path))
  chex.assert_shape(c, (12, 2))
  chex.assert_type(c, np.float64)
  np.testing.assert_array_less(np.abs(c - path), 0.1)


def test_centres_weighting_and_blank_frame():
  f = np.zeros((2, 3, 5, 3), np.uint8)
  f[0, 1, 0] = (180, 0, 0)  # weight 100
  f[0, 1, 4] = (0, 0, 130)  # weight 50 -> x = (0*100 + 4*50) / 150
  c = bm.centres(f)
  np.testing.assert_allclose(c[0], [1.0, 4.0 / 3.0])
  assert np.isnan(c[1]).all()


def test_centre_error_of_a_shifted_copy_is_the_shift():
  path = np.array([[10.0, 10.0], [11.0, 12.5], [12.3, 14.0], [13.0, 15.2]])
  true = video(path)
  for dy, dx in [(0, 3), (-2, 0), (3, 4)]:
    pred = np.roll(true, (dy, dx), axis=(1, 2))  # disc far from the edges: no wrap
    err = bm.centre_error(pred, true)
    chex.assert_shape(err, (4,))
    np.testing.assert_allclose(err, np.hypot(dy, dx), atol=1e-9)
  np.testing.assert_allclose(bm.centre_error(true, true), 0.0, atol=1e-12)


def test_blank_prediction_is_penalised_by_the_diagonal():
  true = video([[16.0, 16.0]] * 3)
  far = video([[4.0, 28.0]] * 3)  # a bad but non-empty guess
  blank = bm.blank_frames(true)
  chex.assert_equal_shape([blank, true])
  assert blank.dtype == true.dtype and not blank.any()
  np.testing.assert_allclose(bm.centre_error(blank, true), np.hypot(H, W))
  assert bm.centre_error(blank, true).mean() > bm.centre_error(far, true).mean()
  assert bm.bright_ratio(blank, true) == 0.0
  # Both empty costs nothing; an object hallucinated into an empty truth costs the diagonal.
  np.testing.assert_array_equal(bm.centre_error(blank, blank), 0.0)
  np.testing.assert_allclose(bm.centre_error(true, blank), np.hypot(H, W))


def test_mse_and_bright_ratio_known_values():
  a = np.zeros((1, 2, 2, 3), np.uint8)
  b = np.full((1, 2, 2, 3), 255, np.uint8)
  assert bm.mse(a, b) == 1.0 and bm.mse(b, b) == 0.0
  c = a.copy()
  c[0, 0, 0] = 255  # 3 of 12 values off by the full range
  assert bm.mse(c, a) == pytest.approx(0.25)
  one = video([[16.0, 16.0]], r=3.0)
  two = np.concatenate([one, one], axis=2)  # two identical discs side by side
  assert bm.bright_ratio(two, np.concatenate([one, np.zeros_like(one)], axis=2)) == 2.0
  with pytest.raises(ValueError):
    bm.mse(a, np.zeros((2, 2, 2, 3)))


def test_copy_last_frame():
  prefix = video([[10.0, 10.0], [12.0, 13.0]])
  out = bm.copy_last_frame(prefix, 3)
  chex.assert_shape(out, (3, H, W, 3))
  assert out.dtype == np.uint8
  for k in range(3):
    np.testing.assert_array_equal(out[k], prefix[-1])


def test_constant_velocity_is_exact_on_uniform_motion():
  v = np.array([1.25, -0.75])
  path = np.array([10.0, 20.0]) + np.arange(7)[:, None] * v
  frames = video(path)
  prefix = frames[:3]
  cv = bm.constant_velocity_centres(prefix, 4)
  chex.assert_shape(cv, (4, 2))
  # Extrapolation of the measured centroids is exact up to the centroid's own error.
  measured = bm.centres(prefix)
  np.testing.assert_allclose(cv, measured[-1] + np.arange(1, 5)[:, None] * (measured[-1] -
                                                                             measured[-2]))
  np.testing.assert_array_less(np.abs(cv - path[3:]), 0.35)  # 0.1 px per frame, x up to 4


def test_constant_velocity_frames_whole_pixel_motion_reproduces_the_future():
  path = np.array([8.0, 6.0]) + np.arange(6)[:, None] * np.array([2.0, 3.0])
  frames = video(path)
  out = bm.constant_velocity_frames(frames[:2], 4)
  chex.assert_shape(out, (4, H, W, 3))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, frames[2:])  # integer velocity: pixel-exact
  r = bm.continuation_report(frames[2:], frames[2:], frames[:2])
  assert r["mse_const_velocity"] == 0.0 and r["centre_error_const_velocity"] < 0.2


def test_constant_velocity_frames_do_not_wrap():
  frames = video([[16.0, 24.0], [16.0, 28.0]], r=2.0)
  out = bm.constant_velocity_frames(frames, 2)  # the disc leaves through the right edge
  assert not out[1].any()  # nothing reappears on the left
  assert not out[0][:, :16].any()


def test_continuation_report_keys_and_consistency():
  path = np.array([6.0, 6.0]) + np.arange(10)[:, None] * np.array([1.0, 2.0])
  frames = video(path)
  prefix, true = frames[:4], frames[4:]
  pred = np.roll(true, (0, 1), axis=(1, 2))  # a good model: one pixel off
  r = bm.continuation_report(pred, true, prefix)
  assert set(r) == {
      "centre_error_model", "centre_error_copy_last", "centre_error_const_velocity",
      "mse_model", "mse_blank", "mse_copy_last", "mse_const_velocity",
      "bright_ratio_model", "bright_ratio_copy_last"}
  assert all(type(v) is float for v in r.values())
  assert r["centre_error_model"] == pytest.approx(bm.centre_error(pred, true).mean())
  assert r["centre_error_model"] == pytest.approx(1.0, abs=1e-9)
  copy = bm.copy_last_frame(prefix, 6)
  # The true centres move by sqrt(5) per frame away from the last prefix frame.
  expected_copy = np.mean(np.hypot(1.0, 2.0) * np.arange(1, 7))
  assert r["centre_error_copy_last"] == pytest.approx(expected_copy, abs=0.1)
  assert r["centre_error_const_velocity"] < 0.2
  assert r["mse_copy_last"] == pytest.approx(bm.mse(copy, true))
  assert r["mse_blank"] == pytest.approx(bm.mse(np.zeros_like(true), true))
  assert r["mse_const_velocity"] == 0.0
  assert r["bright_ratio_model"] == pytest.approx(1.0) and r["bright_ratio_copy_last"] == 1.0
  # A blank model loses to every baseline on the centre error.
  rb = bm.continuation_report(bm.blank_frames(true), true, prefix)
  assert rb["centre_error_model"] == pytest.approx(np.hypot(H, W))
  assert rb["centre_error_model"] > rb["centre_error_copy_last"]
  assert rb["mse_model"] == rb["mse_blank"] and rb["bright_ratio_model"] == 0.0


def test_dominant_colour_robust_to_noise_of_another_colour():
  rng = np.random.default_rng(1)
  v = video([[10.0, 10.0], [12.0, 14.0], [14.0, 18.0]], r=5.0, colour=RED)
  noisy = v.copy()
  # 25 green noise pixels per frame on the background (a red disc has ~78 pixels).
  for t in range(3):
    ys, xs = rng.integers(22, 32, 25), rng.integers(0, 32, 25)
    noisy[t, ys, xs] = GREEN
  assert bm.dominant_colour(noisy, PALETTE) == "red"
  # Slightly off colours still map to the nearest palette entry.
  tinted = video([[16.0, 16.0]], r=5.0, colour=(70, 110, 235))
  assert bm.dominant_colour(tinted, PALETTE) == "blue"
  assert bm.dominant_colour(np.zeros((2, 8, 8, 3), np.uint8), PALETTE) is None


def test_text_control_accuracy():
  red = video([[16.0, 16.0]], colour=RED)
  yellow = video([[16.0, 16.0]], colour=YELLOW)
  blank = np.zeros_like(red)
  acc = bm.text_control_accuracy([red, yellow, blank, red], ["red", "yellow", "green", "blue"],
                                 PALETTE)
  assert acc == 0.5
  with pytest.raises(ValueError):
    bm.text_control_accuracy([red], ["red", "blue"], PALETTE)


def test_evaluation_blocks_are_disjoint_and_block_0_is_unchanged():
  """`--eval_seed=N` picks block N of the test split; no two blocks (and no block and the
  training seeds) share an episode seed."""
  from experiments.configs import bouncing_tiny
  from magi_jax.proj.bouncing.evaluation import BLOCK, held_out
  from magi_jax.proj.bouncing.tfds_builder import split_seed
  from magi_jax.proj.bouncing.training import world_config
  from magi_jax.proj.bouncing.world import simulate
  c = bouncing_tiny.get_config()
  np.testing.assert_array_equal(held_out(c, 3).frames,
                                simulate(world_config(c), split_seed("test", 3)).frames)
  seeds = {b: {split_seed("test", b * BLOCK + i) for i in range(64)} for b in range(3)}
  assert not (seeds[0] & seeds[1] or seeds[1] & seeds[2] or seeds[0] & seeds[2])
  assert not seeds[1] & {split_seed("train", i) for i in range(c.data.train_episodes)}
  assert not np.array_equal(held_out(c, 3, 1).frames, held_out(c, 3).frames)
  with pytest.raises(ValueError, match="outside a block"):
    held_out(c, BLOCK)
