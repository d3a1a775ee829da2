"""magi_jax/diffusion/shortcut.py: the shortcut-distillation targets against the sampler's
schedule and step-size embedding, and hand-computed two-step Euler averages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax.diffusion import schedule, shortcut
from magi_jax.models.embedders import distill_step_size


def test_cycle_is_the_reports_and_bad_cycles_are_refused():
  sizes = [float(shortcut.step_size_at(i)) for i in range(22)]
  assert sizes[:11] == [1 / 64] * 8 + [1 / 32, 1 / 16, 1 / 8] and sizes[11:] == sizes[:11]
  jitted = jax.jit(shortcut.step_size_at)(jnp.int32(10))           # traced step
  assert float(jitted) == 1 / 8
  for bad, match in (((), "empty"), ((1 / 3,), "not 1/2"), ((1.0,), "not 1/2"),
                     ((0.0,), "not 1/2")):
    with pytest.raises(shortcut.ShortcutError, match=match):
      shortcut.check_cycle(bad)


@pytest.mark.parametrize("steps", [8, 16, 32, 64])
def test_embedded_step_size_is_what_the_sampler_gives_the_model(steps):
  assert float(shortcut.embedded_step_size(1 / steps)) == distill_step_size(steps)


@pytest.mark.parametrize("steps", [8, 16, 64])
def test_a_step_of_size_one_over_n_walks_the_samplers_schedule(steps):
  ts = schedule.timesteps(steps)                          # the sampler's bit-exact f32 grid
  np.testing.assert_allclose(np.asarray(shortcut.warp(np.linspace(0, 1, steps + 1))), ts,
                             atol=2e-7)
  nxt = np.asarray(shortcut.next_level(ts[:-1], 1 / steps))
  np.testing.assert_allclose(nxt, ts[1:], atol=2e-6)
  np.testing.assert_allclose(np.asarray(shortcut.unwarp(ts)), np.linspace(0, 1, steps + 1),
                             atol=2e-6)


def test_next_level_is_monotone_capped_and_keeps_clean_chunks():
  t = jnp.array([[0.0, 0.2, 0.9, 1.0]])
  clean = jnp.array([[False, False, True, False]])
  out = np.asarray(shortcut.next_level(t, 1 / 8, clean))
  assert out[0, 2] == np.float32(0.9) and out[0, 3] == 1.0      # clean: still; t = 1: capped
  assert out[0, 0] > 0 and out[0, 1] > np.float32(0.2)
  big = np.asarray(shortcut.next_level(t, 1.0))
  np.testing.assert_array_equal(big, np.ones_like(big))


def _toy(a, b):
  """v(x, t, s) = a·x + b·t (per frame) + s: a linear model whose Euler steps are easy to
  write out by hand."""
  def velocity(x, t, s):
    frames = x.shape[2] // t.shape[1]
    tf = jnp.repeat(t, frames, axis=1)[:, None, :, None, None]
    return a * x + b * tf + s
  return velocity


def test_self_consistency_target_is_the_two_step_euler_average():
  rng = np.random.default_rng(0)
  N, C, K, F, H, W = 2, 3, 3, 2, 2, 2
  x = rng.normal(size=(N, C, K * F, H, W)).astype(np.float32)
  t = np.array([[0.9, 0.4, 0.1], [1.0, 0.55, 0.0]], np.float32)
  clean = np.array([[True, False, False], [False, False, False]])
  a, b, s = 0.3, -0.7, 1 / 16
  got = np.asarray(shortcut.self_consistency_target(_toy(a, b), jnp.asarray(x), jnp.asarray(t), s,
                                                    jnp.asarray(clean)))
  # By hand, in float64, chunk by chunk.
  warp = lambda u: (u * u / 3) / (1 + (1 / 3 - 1) * u * u)
  unwarp = lambda t: np.sqrt(t / (1 / 3 - (1 / 3 - 1) * t))
  want = np.zeros_like(x, dtype=np.float64)
  for n in range(N):
    for k in range(K):
      sl = (n, slice(None), slice(k * F, (k + 1) * F))
      xk = x[sl].astype(np.float64)
      t0 = float(t[n, k])
      if clean[n, k]:
        t1 = t2 = t0
      else:
        t1 = warp(min(unwarp(t0) + s, 1.0))
        t2 = warp(min(unwarp(t1) + s, 1.0))
      v1 = a * xk + b * t0 + s
      v2 = a * (xk + (t1 - t0) * v1) + b * t1 + s
      want[sl] = v1 if t2 == t0 else ((t1 - t0) * v1 + (t2 - t1) * v2) / (t2 - t0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Where the chunk moves, the velocity changes between the two steps, so the target is not
  # the first step's velocity; where it stays (clean, or at t = 1), it is.
  v1 = np.asarray(_toy(a, b)(jnp.asarray(x), jnp.asarray(t), s))
  assert np.abs(got[0, :, 2:] - v1[0, :, 2:]).max() > 1e-3
  np.testing.assert_allclose(got[0, :, :2], v1[0, :, :2], rtol=1e-6)     # clean chunk
  np.testing.assert_allclose(got[1, :, :2], v1[1, :, :2], rtol=1e-6)     # t = 1 chunk


def test_held_frames_keep_their_value_for_the_second_step():
  """An I2V image frame is written back by the sampler every step: the second velocity sees
  it unmoved, the other frames of its chunk moved."""
  seen = []

  def velocity(x, t, s):
    seen.append(x)
    return jnp.ones_like(x)

  x = jnp.zeros((1, 1, 4, 1, 1))
  t = jnp.array([[0.2, 0.5]])
  hold = jnp.array([[True, False, False, False]])
  shortcut.self_consistency_target(velocity, x, t, 1 / 8, hold_frames=hold)
  moved = np.asarray(seen[1])[0, 0, :, 0, 0]
  d1 = np.asarray(shortcut.next_level(t, 1 / 8) - t)[0]
  np.testing.assert_allclose(moved, [0.0, d1[0], d1[1], d1[1]], rtol=1e-6)


def test_self_consistency_target_carries_no_gradient():
  x = jnp.ones((1, 1, 2, 1, 1))
  t = jnp.array([[0.3, 0.1]])
  g = jax.grad(lambda a: shortcut.self_consistency_target(_toy(a, 0.0), x, t, 1 / 8).sum())(0.5)
  assert float(g) == 0.0


def test_guided_velocity_with_scales_one_is_the_teachers_text_velocity():
  rng = np.random.default_rng(1)
  v_text, v_prev, v_alone = (rng.normal(size=(1, 2, 4, 2, 2)).astype(np.float32)
                             for _ in range(3))
  np.testing.assert_array_equal(np.asarray(shortcut.guided_velocity(v_text, v_prev, v_alone,
                                                                    1.0, 1.0)), v_text)
  got = np.asarray(shortcut.guided_velocity(v_text, v_prev, v_alone, 2.0, 7.5))
  np.testing.assert_allclose(got, -1.0 * v_alone + (2.0 - 7.5) * v_prev + 7.5 * v_text,
                             rtol=1e-6)
