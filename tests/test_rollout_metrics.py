"""The long-rollout drift measurement (issue 15): object counting, "one object of the right
colour" and per-chunk drift on hand-drawn videos whose right answers are known (the truth
itself, known shifts, a split, a fade to black, a recolouring, speckle), the longer held-out
simulation being the same world as the training-length episode, and one end-to-end
`rollout()` of a tiny randomly initialised bouncing model."""

import json

import chex
import numpy as np
import pytest

from magi_jax.proj.bouncing import metrics as bm
from test_eval_metrics import BLUE, GREEN, H, PALETTE, RED, W, disc, video

F = 4                                          # frames per chunk of the hand-made videos
DIAGONAL = float(np.hypot(H, W))


def moving_disc(num_chunks=3, colour=BLUE, r=4.0):
  """A disc moving by (0.5, 0.75) px per frame from (10, 8): far from every edge."""
  path = np.array([10.0, 8.0]) + np.arange(num_chunks * F)[:, None] * np.array([0.5, 0.75])
  return path, video(path, colour=colour, r=r)


def test_component_labels_of_a_hand_drawn_mask():
  m = np.zeros((2, 4, 5), bool)
  m[0, 0, 0] = m[0, 0, 1] = m[0, 1, 1] = True       # an L of 3 pixels: flat indices 0, 1, 6
  m[0, 2, 3] = True                                 # diagonal to nothing of the L: alone
  m[0, 3, 4] = True                                 # diagonal neighbour of (2, 3)
  m[1, 1, 1:4] = True                               # frame 1: a bar, first pixel 20 + 6 = 26
  lab = bm.component_labels(m, connectivity=8)
  chex.assert_shape(lab, (2, 4, 5))
  assert lab.dtype == np.int64
  assert (lab[~m] == -1).all()
  assert lab[0, 0, 0] == lab[0, 0, 1] == lab[0, 1, 1] == 0
  assert lab[0, 2, 3] == lab[0, 3, 4] == 13          # 8-connected: one component
  assert (lab[1, 1, 1:4] == 26).all()                # labels are unique across frames
  lab4 = bm.component_labels(m, connectivity=4)
  assert lab4[0, 2, 3] == 13 and lab4[0, 3, 4] == 19  # 4-connected: two
  with pytest.raises(ValueError, match="connectivity"):
    bm.component_labels(m, connectivity=6)


def test_component_labels_follow_a_long_winding_path():
  """A snake (rows 0, 2, 4, 6, 8 joined at alternate ends) whose smallest index, pixel (0, 0),
  is at one end: its label must travel the whole 49-pixel path; a blob beside it stays apart."""
  m = np.zeros((1, 9, 11), bool)
  m[0, 0::2, :9] = True
  m[0, 1, 8] = m[0, 3, 0] = m[0, 5, 8] = m[0, 7, 0] = True
  m[0, 4, 10] = True
  lab = bm.component_labels(m, connectivity=4)
  assert (lab[0, :, :9][m[0, :, :9]] == 0).all()
  assert lab[0, 4, 10] == 4 * 11 + 10
  frames = np.repeat(m[..., None], 3, axis=-1).astype(np.uint8) * 255
  np.testing.assert_array_equal(bm.object_components(frames, min_pixels=1, connectivity=4), [2])
  np.testing.assert_array_equal(bm.object_components(frames), [1])   # the blob is speckle


def test_object_components_counts_discs_and_ignores_speckle():
  f = np.stack([disc(10, 10), disc(10, 10) + disc(22, 22)])     # one disc; two discs
  np.testing.assert_array_equal(bm.object_components(f), [1, 2])
  s = f[:1].copy()
  s[0, 28, 2] = GREEN                                          # a single speckle pixel
  s[0, 2, 26] = s[0, 2, 27] = GREEN                            # a 2-pixel speck
  assert bm.object_components(s)[0] == 1                       # default min_pixels 3: speckle
  assert bm.object_components(s, min_pixels=1)[0] == 3
  s[0, 28, 26] = s[0, 28, 27] = s[0, 29, 27] = GREEN            # 3 pixels: an object
  assert bm.object_components(s)[0] == 2
  assert bm.object_components(np.zeros((2, 8, 8, 3), np.uint8)).tolist() == [0, 0]
  with pytest.raises(ValueError, match="min_pixels"):
    bm.object_components(s, min_pixels=0)


def test_the_smallest_world_objects_are_never_speckle():
  """The documented rule: a ball or square of extent 1.5 px in the darkest default colour
  covers at least 6 pixels above the threshold at any sub-pixel position (> min_pixels)."""
  from magi_jax.proj.bouncing.world import WorldConfig, render
  cfg = WorldConfig(min_radius=1.5, max_radius=1.5)
  path = np.random.default_rng(0).uniform(2.0, 21.0, size=(200, 1, 2))
  for shape in ("ball", "square"):
    frames = render(cfg, [("green", shape, 1.5)], path)
    assert bm.bright_pixel_count(frames).min() >= 6
    np.testing.assert_array_equal(bm.object_components(frames), 1)


def test_one_object_of_colour_rules():
  blue, red = video([[16.0, 16.0]]), video([[16.0, 16.0]], colour=RED)
  split = video([[8.0, 8.0]], r=3.0) + video([[22.0, 22.0]], r=3.0)
  blank = np.zeros_like(blue)
  frames = np.concatenate([blue, red, split, blank])
  np.testing.assert_array_equal(bm.one_object_of_colour(frames, "blue", PALETTE),
                                [True, False, False, False])
  np.testing.assert_array_equal(bm.one_object_of_colour(frames, "red", PALETTE),
                                [False, True, False, False])
  # Speckle neither counts as an object nor votes: ~100 isolated green pixels outnumber the
  # disc's ~50, so the whole-frame vote says green, but the object is blue.
  speckled = blue.copy()
  ys, xs = np.meshgrid(np.arange(0, 32, 3), np.arange(0, 32, 3), indexing="ij")
  speckled[0, ys.ravel(), xs.ravel()] = GREEN
  speckled[0, 10:23, 10:23] = blue[0, 10:23, 10:23]             # keep the disc itself clean
  assert bm.object_components(speckled)[0] == 1
  assert bm.dominant_colour(speckled, PALETTE) == "green"
  assert bm.one_object_of_colour(speckled, "blue", PALETTE).tolist() == [True]
  with pytest.raises(ValueError, match="palette"):
    bm.one_object_of_colour(blue, "purple", PALETTE)


def test_chunk_means():
  np.testing.assert_allclose(bm.chunk_means([1, 2, 3, 4, 5, 6], 2), [1.5, 3.5, 5.5])
  for bad, n in (([1, 2, 3], 2), ([], 2), ([1, 2], 0)):
    with pytest.raises(ValueError):
      bm.chunk_means(bad, n)


def test_chunk_drift_of_the_truth_is_perfect():
  _, true = moving_disc()
  d = bm.chunk_drift(true, true, F, palette=PALETTE, colour_name="blue")
  assert set(d) == {"centre_error", "one_object", "one_object_frames"}
  chex.assert_shape([d["centre_error"], d["one_object"], d["one_object_frames"]], [(3,)] * 3)
  np.testing.assert_array_equal(d["centre_error"], 0.0)
  assert d["one_object"].dtype == bool and d["one_object"].all()
  np.testing.assert_array_equal(d["one_object_frames"], 1.0)
  # Without a colour the truth's dominant colour is the one to keep.
  d2 = bm.chunk_drift(true, true, F, palette=PALETTE)
  assert d2["one_object"].all()
  with pytest.raises(ValueError, match="no object"):
    bm.chunk_drift(true, np.zeros_like(true), F, palette=PALETTE)
  with pytest.raises(ValueError):
    bm.chunk_drift(true[:10], true[:10], F, palette=PALETTE, colour_name="blue")


def test_chunk_drift_of_a_known_shift():
  _, true = moving_disc()
  pred = true.copy()
  pred[F:2 * F] = np.roll(true[F:2 * F], (3, 4), axis=(1, 2))     # chunk 1 off by (3, 4)
  pred[2 * F:] = np.roll(true[2 * F:], (-2, 0), axis=(1, 2))       # chunk 2 off by (-2, 0)
  d = bm.chunk_drift(pred, true, F, palette=PALETTE, colour_name="blue")
  np.testing.assert_allclose(d["centre_error"], [0.0, 5.0, 2.0], atol=1e-9)
  assert d["one_object"].all()                   # moved, but still one blue object


def test_chunk_drift_flags_a_split_a_fade_and_a_recolouring():
  path, true = moving_disc()
  # Chunk 0, frame 2 only: the object splits into two blobs either side of where it was.
  split = true.copy()
  (cy, cx) = path[2]
  split[2] = disc(cy, cx - 6, r=3.0) + disc(cy, cx + 6, r=3.0)
  d = bm.chunk_drift(split, true, F, palette=PALETTE, colour_name="blue")
  np.testing.assert_array_equal(d["one_object"], [False, True, True])
  np.testing.assert_allclose(d["one_object_frames"], [0.75, 1.0, 1.0])
  # The pair is symmetric about the true centre: the centroid does not see the split.
  assert d["centre_error"][0] < 0.1
  # Chunk 2 fades to black (30% brightness: max channel <= 77 < 80, no object pixel).
  fade = true.copy()
  fade[2 * F:] = np.rint(true[2 * F:] * 0.3).astype(np.uint8)
  d = bm.chunk_drift(fade, true, F, palette=PALETTE, colour_name="blue")
  np.testing.assert_array_equal(d["one_object"], [True, True, False])
  np.testing.assert_array_equal(d["one_object_frames"], [1.0, 1.0, 0.0])
  np.testing.assert_allclose(d["centre_error"], [0.0, 0.0, DIAGONAL])
  # Chunk 1 turns red at the right place: right position, wrong colour.
  _, red = moving_disc(colour=RED)
  recol = true.copy()
  recol[F:2 * F] = red[F:2 * F]
  d = bm.chunk_drift(recol, true, F, palette=PALETTE, colour_name="blue")
  np.testing.assert_array_equal(d["one_object"], [True, False, True])
  np.testing.assert_array_less(d["centre_error"], 0.2)     # both centroids within 0.1 px


def test_baseline_centre_errors_on_uniform_motion():
  v = np.array([1.0, 2.0])
  path = np.array([6.0, 6.0]) + np.arange(8)[:, None] * v
  frames = video(path)
  base = bm.baseline_centre_errors(frames[4:], frames[:4])
  assert set(base) == {"copy_last", "const_velocity"}
  np.testing.assert_allclose(base["copy_last"], np.hypot(1.0, 2.0) * np.arange(1, 5), atol=0.1)
  np.testing.assert_array_less(base["const_velocity"], 0.35)


def test_a_longer_held_out_episode_is_the_same_world():
  from experiments.configs import bouncing_tiny
  from magi_jax.proj.bouncing.evaluation import held_out
  c = bouncing_tiny.get_config()
  K = 4                                             # the demo world: 16 frames of 4 per chunk
  for i, block in ((0, 0), (5, 0), (2, 1)):
    short, long = held_out(c, i, block), held_out(c, i, block, num_chunks=2 * K)
    assert short.frames.shape[0] == 4 * K and long.frames.shape[0] == 8 * K
    assert len(long.chunk_captions) == 2 * K and long.seed == short.seed
    np.testing.assert_array_equal(long.frames[:4 * K], short.frames)
    np.testing.assert_array_equal(long.centres[:4 * K], short.centres)
    assert long.objects == short.objects
    assert long.chunk_captions[:K - 1] == short.chunk_captions[:K - 1]
  np.testing.assert_array_equal(held_out(c, 3, num_chunks=K).frames, held_out(c, 3).frames)
  with pytest.raises(ValueError, match="num_chunks"):
    held_out(c, 0, num_chunks=0)


def test_rollout_refuses_what_it_cannot_score():
  from experiments.configs import bouncing_tiny
  from magi_jax.proj.bouncing.evaluation import rollout
  c = bouncing_tiny.get_config("smoke")
  with pytest.raises(ValueError, match="generates nothing"):
    rollout(c, None, None, num_episodes=2, chunks=c.sample.prefix_chunks)
  with pytest.raises(ValueError, match="num_episodes"):
    rollout(c, None, None, num_episodes=0, chunks=6)
  c.data.world = dict(c.data.world, min_objects=2, max_objects=2)
  with pytest.raises(ValueError, match="single-object"):
    rollout(c, None, None, num_episodes=2, chunks=6)


def test_rollout_end_to_end_on_a_tiny_random_model():
  """Plumbing, not quality: 2 episodes of the smoke world (2 chunks of 4 frames, here with up
  to 2 objects so that multi-object episodes are skipped) continued from 1 clean chunk to 6
  chunks by a random 1-layer model (2 sampler steps, the smoke window of 2)."""
  from experiments.configs import bouncing_tiny
  from magi_jax.proj.bouncing.evaluation import format_rollout, held_out, rollout
  from magi_jax.train import build
  c = bouncing_tiny.get_config("smoke")
  c.sample.num_steps = 2
  c.data.world = dict(c.data.world, max_objects=2)
  tok = build.tokenizer_for(c)
  model = build.build_model(c, tok, with_teacher=False)
  r = rollout(c, model, tok, num_episodes=2, chunks=6)
  json.dumps(r)                                               # JSON-ready for eval.json
  assert {"chunks", "train_chunks", "prefix_chunks", "num_episodes", "eval_seed", "num_steps",
          "per_chunk", "one_object_all_chunks", "episodes", "targets"} <= set(r)
  assert (r["chunks"], r["train_chunks"], r["prefix_chunks"], r["num_steps"]) == (6, 2, 1, 2)
  rows = r["per_chunk"]
  assert [row["chunk"] for row in rows] == [1, 2, 3, 4, 5]      # exactly the generated chunks
  assert [row["beyond_training"] for row in rows] == [False, True, True, True, True]
  eps = r["episodes"]
  assert len(eps) == 2
  # Single-object episodes only, the first two of block 0, in order.
  singles = [i for i in range(eps[-1]["index"] + 1) if len(held_out(c, i).objects) == 1]
  assert [e["index"] for e in eps] == singles[:2]
  P = r["prefix_chunks"] * 4
  for e in eps:
    assert len(e["centre_error"]) == len(e["one_object"]) == 5
    ep = held_out(c, e["index"], num_chunks=6)
    assert e["colour"] == ep.objects[0][0]
    copy = bm.chunk_means(bm.baseline_centre_errors(ep.frames[P:], ep.frames[:P])["copy_last"],
                          4)
    e["copy_last"] = copy
  for j, row in enumerate(rows):
    assert row["centre_error_model"] == pytest.approx(np.mean([e["centre_error"][j]
                                                               for e in eps]))
    assert row["centre_error_copy_last"] == pytest.approx(np.mean([e["copy_last"][j]
                                                                   for e in eps]))
    assert np.isfinite(row["centre_error_const_velocity"])
    assert row["one_object_fraction"] == np.mean([e["one_object"][j] for e in eps])
  assert r["one_object_all_chunks"] == np.mean([all(e["one_object"]) for e in eps])
  assert r["targets"] == {"rollout_one_object>=0.9": r["one_object_all_chunks"] >= 0.9}
  table = format_rollout(r)
  body = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
  assert [line.split("|")[1].strip() for line in body] == ["1", "2*", "3*", "4*", "5*"]
