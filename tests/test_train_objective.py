"""The training objective: timestep law, monotone levels, clean chunks, packing, causality."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from magi_jax.configs import tiny_config
from magi_jax.convert.load import random_module
from magi_jax.models.dit import VideoDiT
from magi_jax.text.rows import NULL_CAPTION_VALID
from magi_jax.diffusion import flow
from magi_jax.diffusion import timestep_sampling as timesteps
from magi_jax.diffusion.conditioning import Conditioning, ConditioningConfig, sample_conditioning
from magi_jax.train.objective import (Objective, TrainModel, caption_rows, loss_given,
                                      velocity_of_row)
from magi_jax.diffusion.segments import packed_frame_positions, packed_kv_ranges, segment_layout

CHUNK_WIDTH = 2  # latent frames per chunk
L, CC = 8, 32   # caption length / channels


# ------------------------------------------------------------------ timesteps
def test_shifted_logit_normal_puts_about_70_percent_below_0_3():
  t = np.asarray(timesteps.sample_t(jax.random.key(0), (400_000,)))
  assert 0.0 < t.min() and t.max() < 1.0
  frac = float(np.mean(t < 0.3))
  # Closed form: P(n < logit(0.3 / (w + 0.3 (1 - w)))) with n ~ N(0, 0.5²) = 0.692.
  assert abs(frac - 0.692) < 0.005, frac
  # Without the shift the same draws put only ~4.5% below 0.3.
  u = np.asarray(timesteps.sample_t(jax.random.key(0), (400_000,), shift_w=1.0))
  assert np.mean(u < 0.3) < 0.06


def test_shift_is_monotone_and_fixes_the_ends():
  u = jnp.linspace(0, 1, 101)
  t = np.asarray(timesteps.shift(u))
  assert t[0] == 0 and abs(t[-1] - 1) < 1e-6
  assert np.all(np.diff(t) > 0) and np.all(t[1:-1] < np.asarray(u)[1:-1])


def test_sort_and_cummin_respect_segments():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  v = jnp.array([[0.1, 0.5, 0.3, 0.2, 0.9, 0.7]])
  s = np.asarray(timesteps.sort_desc_within_segments(v, seg))
  np.testing.assert_allclose(s, [[0.5, 0.3, 0.1, 0.9, 0.2, 0.7]], rtol=1e-6)
  m = np.asarray(timesteps.cummin_within_segments(jnp.array([[0.5, 0.7, 0.1, 0.2, 0.9, 0.4]]),
                                                  seg))
  np.testing.assert_allclose(m, [[0.5, 0.5, 0.1, 0.2, 0.2, 0.4]], rtol=1e-6)


# ------------------------------------------------------------------ conditioning
LAYOUTS = np.array([[1, 1, 1, 1, 2, 2, 3, 0],
                    [1, 1, 1, 1, 1, 1, 1, 1],
                    [1, 2, 3, 4, 5, 6, 0, 0],
                    [1, 1, 1, 2, 2, 2, 2, 2]] * 64, np.int32)


@pytest.fixture(scope="module", params=["sorted", "staggered"])
def conds(request):
  cfg = ConditioningConfig(p_v2v=0.4, p_i2v=0.3, text_dropout=0.2, levels=request.param)
  fn = jax.jit(lambda k: sample_conditioning(k, LAYOUTS, CHUNK_WIDTH, cfg))
  return cfg, [jax.device_get(fn(jax.random.key(i))) for i in range(8)]


def _segments(row):
  out = {}
  for k, s in enumerate(row):
    if s:
      out.setdefault(int(s), []).append(k)
  return out


def test_levels_monotone_clean_chunks_leading_and_nearly_clean(conds):
  cfg, cs = conds
  for c in cs:
    chex.assert_shape(c.t, LAYOUTS.shape)
    chex.assert_shape(c.frame_t, (LAYOUTS.shape[0], LAYOUTS.shape[1] * CHUNK_WIDTH))
    for r, row in enumerate(LAYOUTS):
      for chunks in _segments(row).values():
        t = c.t[r, chunks]
        assert np.all(np.diff(t) <= 0), t                      # earlier chunks cleaner
        clean = c.clean[r, chunks]
        n = int(clean.sum())
        assert np.all(clean[:n]) and not np.any(clean[n:])     # clean chunks lead
        assert n < len(chunks)                                 # something to learn
        assert np.all(t[:n] >= cfg.clean_t_min)                # at most 5% noise
        assert np.all(c.text_drop[r, chunks][:n])              # no text on clean chunks
        assert len(set(c.text_drop[r, chunks][n:].tolist())) <= 1   # dropout per video
    pad = LAYOUTS == 0
    assert not np.any(c.clean[pad]) and not np.any(c.text_drop[pad])


def _unshift(t, w):
  """The grid position u with timesteps.shift(u, w) == t."""
  return t / (w + (1.0 - w) * t)


def test_staggered_levels_are_the_sampler_windows_states():
  """levels='staggered': the first noisy chunk of a video sits anywhere on the denoising grid
  (uniform), each later one exactly `stagger` grid units behind it (pure noise once behind the
  grid's start), and the grid maps to t by the sampler's shift."""
  w, stagger = 1.0 / 3.0, 0.5
  cfg = ConditioningConfig(p_v2v=1.0, p_i2v=0.0, levels="staggered", stagger=stagger, t_shift=w)
  seg = np.array([[1, 1, 1, 1]] * 4096, np.int32)
  c = jax.device_get(jax.jit(lambda k: sample_conditioning(k, seg, CHUNK_WIDTH, cfg))(
      jax.random.key(3)))
  first_grid = []
  for r in range(seg.shape[0]):
    n = int(c.clean[r].sum())
    assert 1 <= n <= 3
    g = _unshift(c.t[r, n:].astype(np.float64), w)
    if c.t[r, n] == c.t[r, n - 1]:
      continue          # capped at the prefix's level (grid > 0.97): never cleaner than it
    want = np.clip(g[0] - stagger * np.arange(len(g)), 0.0, 1.0)
    np.testing.assert_allclose(g, want, atol=2e-5)
    first_grid.append(g[0])
  hist = np.histogram(first_grid, bins=5, range=(0.0, 1.0))[0] / len(first_grid)
  np.testing.assert_allclose(hist, 0.2, atol=0.03)            # uniform on the grid
  # Next to a clean prefix the first noisy chunk is at pure noise (grid < 0.1) in ~10% of
  # videos; the default sorted draws (the cleanest of up to three logit-normal draws) ~never.
  assert 0.07 < np.mean(np.asarray(first_grid) < 0.1) < 0.13
  sorted_c = jax.device_get(sample_conditioning(
      jax.random.key(3), seg, CHUNK_WIDTH, ConditioningConfig(p_v2v=1.0, p_i2v=0.0)))
  n = sorted_c.clean.sum(axis=1)
  first_sorted = sorted_c.t[np.arange(seg.shape[0]), n]
  assert np.mean(_unshift(first_sorted, 1.0 / 3.0) < 0.1) < 0.02


@pytest.mark.parametrize("field, value, message", [
    ("levels", "random", "conditioning.levels must be one of"),
    ("stagger", 0.0, "conditioning.stagger must be in"),
    ("stagger", 1.5, "conditioning.stagger must be in")])
def test_bad_level_settings_are_refused(field, value, message):
  with pytest.raises(ValueError, match=message):
    ConditioningConfig(**{field: value})


def test_loss_weights_cover_exactly_the_noisy_frames(conds):
  _, cs = conds
  for c in cs:
    w = c.frame_weight.reshape(LAYOUTS.shape + (CHUNK_WIDTH,))
    assert np.all(w[LAYOUTS == 0] == 0)
    assert np.all(w[c.clean] == 0)
    noisy = (LAYOUTS > 0) & ~c.clean
    # Noisy chunks count fully except the I2V image frame (frame 0 of a video's chunk 0).
    img = (w[..., 0] == 0) & noisy
    assert np.all(w[noisy][:, 1:] == 1)
    starts = np.zeros_like(LAYOUTS, bool)
    starts[:, 0] = True
    starts[:, 1:] = LAYOUTS[:, 1:] != LAYOUTS[:, :-1]
    assert np.all(starts[img])                                 # only at a video's first chunk
    ft = c.frame_t.reshape(w.shape)
    assert np.all(ft[img][:, 0] >= 0.95)                       # the image is (nearly) clean


def test_task_mix_frequencies(conds):
  cfg, cs = conds
  multi = v2v = i2v = 0
  for c in cs:
    w = c.frame_weight.reshape(LAYOUTS.shape + (CHUNK_WIDTH,))
    for r, row in enumerate(LAYOUTS):
      for chunks in _segments(row).values():
        if len(chunks) < 2:
          continue
        multi += 1
        v2v += bool(c.clean[r, chunks[0]])
        i2v += bool(w[r, chunks[0], 0] == 0 and not c.clean[r, chunks[0]])
  assert abs(v2v / multi - cfg.p_v2v) < 0.05
  assert abs(i2v / multi - cfg.p_i2v) < 0.05


# ------------------------------------------------------------------ segments
def test_segment_layout_and_packed_ranges():
  seg = jnp.array([[1, 1, 2, 2, 2, 0]])
  index, start, length = (np.asarray(a) for a in segment_layout(seg))
  np.testing.assert_array_equal(index, [[0, 1, 0, 1, 2, 0]])
  np.testing.assert_array_equal(start, [[0, 0, 2, 2, 2, 5]])
  np.testing.assert_array_equal(length, [[2, 2, 3, 3, 3, 1]])
  r = np.asarray(packed_kv_ranges(jnp.concatenate([seg, seg]), 10))
  want = [[0, 10], [0, 20], [20, 30], [20, 40], [20, 50], [50, 60]]
  np.testing.assert_array_equal(r[0], want)
  np.testing.assert_array_equal(r[1], want)                    # each row its own keys
  fi, ft = (np.asarray(a) for a in packed_frame_positions(seg, 2))
  np.testing.assert_array_equal(fi[0], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1])
  np.testing.assert_array_equal(ft[0], [4] * 4 + [6] * 6 + [2] * 2)


# ------------------------------------------------------------------ the model side
@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2,
                    num_query_groups=1, kv_channels=32, caption_channels=CC,
                    caption_max_length=L, in_channels=4, out_channels=4).model
  dit = random_module(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0)), 0)
  return TrainModel(dit)


def _batch(seg, rng, C=4, h=4, w=4):
  N, K = seg.shape
  return {"x1": jnp.asarray(rng.normal(size=(N, C, K * CHUNK_WIDTH, h, w)), jnp.float32),
          "segment_ids": jnp.asarray(seg, jnp.int32),
          "text_emb": jnp.asarray(rng.normal(size=(N, K, L, CC)), jnp.float32),
          "text_mask": jnp.asarray((np.arange(L) < 5)[None, None].repeat(N, 0).repeat(K, 1),
                                   jnp.float32)}


def _cond(t, clean, drop, weight_frames):
  t = jnp.asarray(t, jnp.float32)
  return Conditioning(t=t, clean=jnp.asarray(clean), text_drop=jnp.asarray(drop),
                      frame_t=flow.frame_t(t, CHUNK_WIDTH),
                      frame_weight=jnp.asarray(weight_frames, jnp.float32))


def _take(batch, rows, chunks):
  """Sub-batch: `rows` x `chunks` (per-chunk arrays) with frames of those chunks."""
  frames = np.concatenate([np.arange(k * CHUNK_WIDTH, (k + 1) * CHUNK_WIDTH) for k in chunks])
  rows, chunks = np.asarray(rows), np.asarray(chunks)
  return {"x1": batch["x1"][rows][:, :, frames],
          "segment_ids": jnp.ones((len(rows), len(chunks)), jnp.int32),
          "text_emb": batch["text_emb"][rows][:, chunks],
          "text_mask": batch["text_mask"][rows][:, chunks]}


@pytest.mark.parametrize("prediction", ["velocity", "clean"])
def test_packed_and_unpacked_agree(model, prediction):
  """Videos A (3 chunks), B (2 chunks) packed into one 6-chunk row (+1 padding chunk) give the
  outputs and the loss they give alone."""
  rng = np.random.default_rng(0)
  obj = Objective(chunk_width=CHUNK_WIDTH, prediction=prediction)
  seg = np.array([[1, 1, 1, 2, 2, 0]], np.int32)
  batch = _batch(seg, rng)
  t = np.array([[0.97, 0.6, 0.2, 0.5, 0.1, 0.0]])
  clean = np.array([[True, False, False, False, False, False]])
  drop = np.array([[True, False, False, True, True, False]])
  weight = np.repeat((seg > 0) & ~clean, CHUNK_WIDTH, axis=1).astype(np.float32)
  x0 = jnp.asarray(rng.normal(size=batch["x1"].shape), jnp.float32)
  packed, _ = velocity_of_row(model, batch, _cond(t, clean, drop, weight), x0, obj)
  loss_p, _ = loss_given(model, batch, _cond(t, clean, drop, weight), x0, obj)

  fr = lambda ks: np.concatenate([np.arange(k * CHUNK_WIDTH, (k + 1) * CHUNK_WIDTH) for k in ks])
  a, b = [0, 1, 2], [3, 4]
  errs, ws = [], []
  for ks in (a, b):
    ks = np.asarray(ks)
    sub = _take(batch, [0], ks)
    cond = _cond(t[:, ks], clean[:, ks], drop[:, ks], weight[:, fr(ks)])
    v, _ = velocity_of_row(model, sub, cond, x0[:, :, fr(ks)], obj)
    np.testing.assert_allclose(np.asarray(packed[:, :, fr(ks)]), np.asarray(v), atol=2e-5,
                               rtol=1e-5)
    errs.append(np.asarray(flow.per_frame_sq_error(v, x0[:, :, fr(ks)], sub["x1"],
                                                   prediction)))
    ws.append(weight[:, fr(ks)])
  loss_u = np.sum(np.concatenate(errs, 1) * np.concatenate(ws, 1)) / np.sum(np.concatenate(ws, 1))
  np.testing.assert_allclose(float(loss_p), loss_u, rtol=1e-5)


def test_block_causal_and_clean_chunks_get_gradients(model):
  """Loss on chunk 1 depends on chunk 0 (clean, no loss) but not on chunk 2 (later)."""
  rng = np.random.default_rng(1)
  obj = Objective(chunk_width=CHUNK_WIDTH)
  seg = np.array([[1, 1, 1]], np.int32)
  batch = _batch(seg, rng)
  t = np.array([[0.98, 0.4, 0.1]])
  clean = np.array([[True, False, False]])
  weight = np.zeros((1, 3 * CHUNK_WIDTH), np.float32)
  weight[:, CHUNK_WIDTH:2 * CHUNK_WIDTH] = 1                   # only chunk 1 counts
  cond = _cond(t, clean, clean, weight)
  x0 = jnp.asarray(rng.normal(size=batch["x1"].shape), jnp.float32)

  def f(x1):
    return loss_given(model, dict(batch, x1=x1), cond, x0, obj)[0]

  g = np.asarray(jax.grad(f)(batch["x1"]))
  assert np.abs(g[:, :, :CHUNK_WIDTH]).max() > 1e-6            # through chunk 0's keys/values
  assert np.abs(g[:, :, 2 * CHUNK_WIDTH:]).max() == 0.0        # chunk 2 is in the future
  # ... and the model's parameters see chunk 0 as well (the DiT's gradient is not blocked).
  graphdef, params = nnx.split(model, nnx.Param)
  def h(p, x1):
    return loss_given(nnx.merge(graphdef, p), dict(batch, x1=x1), cond, x0, obj)[0]
  g1 = jax.grad(h)(params, batch["x1"])
  x1b = batch["x1"].at[:, :, :CHUNK_WIDTH].add(1.0)
  g2 = jax.grad(h)(params, x1b)
  diff = jax.tree.reduce(max, jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g1, g2))
  assert diff > 1e-6


def test_caption_rows_use_the_null_caption_where_text_is_off(model):
  rng = np.random.default_rng(2)
  seg = np.array([[1, 1, 2]], np.int32)
  batch = _batch(seg, rng)
  cond = _cond(np.zeros((1, 3)), np.zeros((1, 3), bool), np.array([[True, False, False]]),
               np.ones((1, 3 * CHUNK_WIDTH)))
  y, m = (np.asarray(a) for a in caption_rows(model, batch, cond))
  null = np.asarray(model.dit.y_embedder.null_caption_embedding[...])
  np.testing.assert_array_equal(y[0], null)
  np.testing.assert_array_equal(m[0], (np.arange(L) < NULL_CAPTION_VALID).astype(np.float32))
  np.testing.assert_array_equal(y[1], np.asarray(batch["text_emb"])[0, 1])
  np.testing.assert_array_equal(m[2], np.asarray(batch["text_mask"])[0, 2])


def test_clean_prediction_velocity_round_trip():
  rng = np.random.default_rng(3)
  x0, x1 = (jnp.asarray(rng.normal(size=(1, 2, 4, 2, 2)), jnp.float32) for _ in range(2))
  tf = jnp.asarray([[0.1, 0.3, 0.6, 0.9]])
  xt = flow.interpolate(x0, x1, tf)
  v = flow.clean_to_velocity(x1, xt, tf)
  np.testing.assert_allclose(np.asarray(v), np.asarray(x1 - x0), atol=1e-5)
  with pytest.raises(ValueError, match="prediction"):
    Objective(chunk_width=2, prediction="epsilon")


def test_ema_decay_warms_up():
  from magi_jax.train.step import ema_warmup_decay
  d = [float(ema_warmup_decay(0.999, s)) for s in (0, 10, 100, 10_000)]
  assert d[0] == pytest.approx(0.1) and d[1] == pytest.approx(11 / 20)
  assert d[2] == pytest.approx(101 / 110) and d[3] == pytest.approx(0.999)
  # After 1,400 steps the random initialisation keeps a negligible share of the average.
  share = np.prod([float(ema_warmup_decay(0.999, s)) for s in range(1400)])
  assert share < 1e-3
