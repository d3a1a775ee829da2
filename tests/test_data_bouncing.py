"""The bouncing-shapes world: determinism, physics invariants, events, captions, rendering."""

from __future__ import annotations

import chex
import numpy as np
import pytest

from magi_jax.proj.bouncing.world import (WorldConfig, caption_words, coverage, rollout, simulate,
                                    vocabulary)

MULTI = WorldConfig(min_objects=2, max_objects=3)


def _mass(shape, r):
  return np.pi * r * r if shape == "ball" else 4.0 * r * r


def test_episode_format_and_determinism():
  cfg = WorldConfig()
  a, b = simulate(cfg, 7), simulate(cfg, 7)
  chex.assert_shape(a.frames, (16, 24, 24, 3))
  chex.assert_type(a.frames, np.uint8)
  chex.assert_shape(a.centres, (16, 1, 2))
  chex.assert_type([a.centres, a.velocities], np.float32)
  assert a.frames.tobytes() == b.frames.tobytes()
  np.testing.assert_array_equal(a.centres, b.centres)
  assert (a.caption, a.chunk_captions, a.events, a.objects) == \
      (b.caption, b.chunk_captions, b.events, b.objects)
  assert len(a.chunk_captions) == len(a.events) == cfg.num_chunks
  assert a.seed == 7


def test_different_seeds_differ():
  cfg = WorldConfig()
  eps = [simulate(cfg, s) for s in range(4)]
  for i in range(4):
    for j in range(i + 1, 4):
      assert not np.array_equal(eps[i].frames, eps[j].frames)
      assert not np.allclose(eps[i].centres, eps[j].centres)


def test_objects_stay_in_frame_and_colours_distinct():
  for seed in range(12):
    ep = simulate(MULTI, seed)
    r = np.array([o[2] for o in ep.objects])
    lo = r[None, :, None] - 0.5
    hi = np.array([MULTI.height - 0.5, MULTI.width - 0.5])[None, None, :] - r[None, :, None]
    assert np.all(ep.centres >= lo - 1e-4) and np.all(ep.centres <= hi + 1e-4), seed
    colours = [o[0] for o in ep.objects]
    assert len(set(colours)) == len(colours) >= 2


def test_elastic_walls_keep_speed_without_gravity():
  cfg = WorldConfig(gravity=0.0, num_frames=48)
  for seed in range(4):
    ep = simulate(cfg, seed)
    speed = np.linalg.norm(ep.velocities[:, 0].astype(np.float64), axis=-1)
    np.testing.assert_allclose(speed, speed[0], rtol=1e-5)
    # Between frames an object moves at most its speed (less when it bounced in between).
    step = np.linalg.norm(np.diff(ep.centres[:, 0].astype(np.float64), axis=0), axis=-1)
    assert np.all(step <= speed[0] + 1e-4)
    assert any("hits" in e for ev in ep.events for e in ev), "no wall was hit: test is vacuous"


def test_energy_is_conserved_under_gravity():
  cfg = WorldConfig(num_frames=64)   # elastic walls, gravity 0.25: E = v^2/2 + g (floor - y)
  for seed in range(4):
    ep = simulate(cfg, seed)
    floor = cfg.height - 0.5 - ep.objects[0][2]
    v = ep.velocities[:, 0].astype(np.float64)
    energy = 0.5 * (v ** 2).sum(-1) + cfg.gravity * (floor - ep.centres[:, 0, 0])
    np.testing.assert_allclose(energy, energy[0], rtol=1e-5)


def test_collisions_conserve_kinetic_energy():
  cfg = WorldConfig(gravity=0.0, min_objects=3, max_objects=3, num_frames=48)
  collided = 0
  for seed in range(4):
    ep = simulate(cfg, seed)
    m = np.array([_mass(s, r) for _, s, r in ep.objects])
    v = ep.velocities.astype(np.float64)
    kinetic = 0.5 * (m[None] * (v ** 2).sum(-1)).sum(-1)
    np.testing.assert_allclose(kinetic, kinetic[0], rtol=1e-5)
    collided += sum("collides" in e for ev in ep.events for e in ev)
  assert collided > 0, "no collision happened: test is vacuous"


def test_head_on_equal_balls_swap_velocities_in_the_right_chunk():
  cfg = WorldConfig(gravity=0.0, frames_per_chunk=4, num_frames=12)
  objects = [("red", "ball", 3.0), ("blue", "ball", 3.0)]
  # Gap 16 - 6 = 10 px closing at 2 px/frame: contact at t = 5, i.e. chunk 1 (frames 4..7).
  ep = rollout(cfg, objects, [[12.0, 4.0], [12.0, 20.0]], [[0.0, 1.0], [0.0, -1.0]])
  np.testing.assert_allclose(ep.velocities[4], [[0.0, 1.0], [0.0, -1.0]], atol=1e-6)
  np.testing.assert_allclose(ep.velocities[6], [[0.0, -1.0], [0.0, 1.0]], atol=1e-6)
  assert "the red ball collides with the blue ball" in ep.events[1]
  assert not any("collides" in e for e in ep.events[0] + ep.events[2])
  assert ep.chunk_captions[1].startswith("a red ball and a blue ball; ")


def test_wall_hit_event_lands_in_its_chunk():
  cfg = WorldConfig(gravity=0.0, frames_per_chunk=4, num_frames=16)
  # Right wall limit 23.5 - 3 = 20.5; from x = 12.2 at 1 px/frame the hit is at t = 8.3,
  # nearest frame 8, chunk 2.
  ep = rollout(cfg, [("red", "ball", 3.0)], [[12.0, 12.2]], [[0.0, 1.0]])
  assert ep.events == [["the red ball flies"], ["the red ball flies"],
                       ["the red ball hits the right wall"], ["the red ball flies"]]
  assert ep.chunk_captions[2] == "a red ball; the red ball hits the right wall"
  assert ep.velocities[-1, 0, 1] == pytest.approx(-1.0)
  # Floor: dropped from rest 8 px above it with g = 0.25 hits at t = sqrt(64) = 8 -> chunk 2.
  g = WorldConfig(gravity=0.25, frames_per_chunk=4, num_frames=16)
  floor = g.height - 0.5 - 3.0
  ep = rollout(g, [("blue", "square", 3.0)], [[floor - 8.0, 12.0]], [[0.0, 0.0]])
  assert [("hits the floor" in " ".join(ev)) for ev in ep.events] == [False, False, True, False]
  assert ep.velocities[8, 0, 0] < 0 < ep.velocities[7, 0, 0]


def test_rolling_on_the_floor():
  cfg = WorldConfig(frames_per_chunk=4, num_frames=8)
  floor = cfg.height - 0.5 - 3.0
  ep = rollout(cfg, [("green", "ball", 3.0)], [[floor, 5.0]], [[0.0, 0.5]])
  assert ep.events == [["the green ball rolls"], ["the green ball rolls"]]
  np.testing.assert_allclose(ep.centres[:, 0, 0], floor)


def test_captions_name_the_colours_and_use_the_vocabulary():
  vocab = set(vocabulary(MULTI))
  for seed in range(10):
    ep = simulate(MULTI, seed)
    for colour, shape, _ in ep.objects:
      assert f"{colour} {shape}" in ep.caption
      assert all(colour in c for c in ep.chunk_captions)
    for c, ev in zip(ep.chunk_captions, ep.events):
      assert c == f"{ep.caption}; {', '.join(ev)}"
      assert set(caption_words(c)) <= vocab
  assert caption_words("a red ball, a blue square; the red ball flies") == \
      ["a", "red", "ball", "a", "blue", "square", "the", "red", "ball", "flies"]
  assert vocabulary(MULTI) == sorted(vocab) and "red" in vocab and "collides" in vocab


def test_rendered_centroid_and_area_match_the_state():
  cfg = WorldConfig(num_frames=16)
  yy, xx = np.mgrid[:cfg.height, :cfg.width]
  for seed in range(6):
    ep = simulate(cfg, seed)
    w = ep.frames.astype(np.float64).sum(-1)
    cy = (w * yy).sum((1, 2)) / w.sum((1, 2))
    cx = (w * xx).sum((1, 2)) / w.sum((1, 2))
    np.testing.assert_allclose(cy, ep.centres[:, 0, 0], atol=0.3)
    np.testing.assert_allclose(cx, ep.centres[:, 0, 1], atol=0.3)
    colour, shape, r = ep.objects[0]
    cov = coverage(cfg, shape, r, ep.centres[:, 0].astype(np.float64))
    np.testing.assert_allclose(cov.sum((1, 2)), _mass(shape, r), rtol=0.03)
    assert np.all(ep.frames[cov == 0] == 0)                          # black background
    assert np.all(ep.frames[cov == 1] == np.array(dict(cfg.colours)[colour], np.uint8))


def test_subpixel_motion_changes_pixels():
  cfg = WorldConfig(gravity=0.0)
  a = rollout(cfg, [("red", "ball", 3.0)], [[12.0, 12.0]], [[0.0, 0.25]])
  assert not np.array_equal(a.frames[0], a.frames[1])


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_frames=15), "num_frames"),
    (dict(max_radius=7.0), "max_radius"),
    (dict(max_objects=5), "max_objects"),
    (dict(max_objects=4), "too many objects"),
    (dict(shapes=("triangle",)), "shapes"),
    (dict(gravity=-1.0), "gravity"),
    (dict(restitution=0.0), "restitution"),
    (dict(gravity=50.0), "substeps"),
    (dict(min_radius=3.0, max_radius=2.0), "min_radius"),
    (dict(colours=(("Red", (255, 0, 0)),)), "colours"),
    (dict(height=0), "height"),
])
def test_config_validation_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    WorldConfig(**kwargs)


def test_bad_seed_and_bad_state():
  with pytest.raises(ValueError, match="seed"):
    simulate(WorldConfig(), -1)
  with pytest.raises(ValueError, match="outside the frame"):
    rollout(WorldConfig(), [("red", "ball", 3.0)], [[0.0, 12.0]], [[0.0, 0.0]])
  with pytest.raises(ValueError, match="distinct colours"):
    rollout(WorldConfig(max_objects=2), [("red", "ball", 3.0), ("red", "square", 3.0)],
            [[5.0, 5.0], [15.0, 15.0]], [[0.0, 0.0]] * 2)
