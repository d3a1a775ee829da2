"""Training on the model's own context (magi_jax/train/own_context.py): which chunks are
replaced, what the estimate pass sees, stop-gradient, causality, and the config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from magi_jax.configs import ConfigError, tiny_config
from magi_jax.convert.load import random_module
from magi_jax.diffusion import flow
from magi_jax.diffusion.conditioning import (Conditioning, ConditioningConfig,
                                             sample_conditioning)
from magi_jax.models.dit import VideoDiT
from magi_jax.train.objective import Objective, TrainModel, loss_given, velocity_of_row
from magi_jax.train.own_context import (OwnContext, estimate_conditioning, own_context_batch,
                                        with_own_context)

W = 2            # latent frames per chunk
L, CC = 8, 32    # caption length / channels


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2,
                    num_query_groups=1, kv_channels=32, caption_channels=CC,
                    caption_max_length=L, in_channels=4, out_channels=4).model
  return TrainModel(random_module(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0)), 0))


def _batch(seg, seed=0, C=4, h=4, w=4):
  rng = np.random.default_rng(seed)
  N, K = seg.shape
  return {"x1": jnp.asarray(rng.normal(size=(N, C, K * W, h, w)), jnp.float32),
          "segment_ids": jnp.asarray(seg, jnp.int32),
          "text_emb": jnp.asarray(rng.normal(size=(N, K, L, CC)), jnp.float32),
          "text_mask": jnp.ones((N, K, L), jnp.float32)}


def _cond(t, clean, drop):
  t = jnp.asarray(t, jnp.float32)
  clean = jnp.asarray(clean)
  return Conditioning(t=t, clean=clean, text_drop=jnp.asarray(drop), frame_t=flow.frame_t(t, W),
                      frame_weight=jnp.repeat(~clean, W, axis=1).astype(jnp.float32))


def test_selection_is_the_chosen_videos_clean_chunks_at_one_level_with_captions():
  seg = jnp.asarray(np.array([[1, 1, 1, 2, 2, 3, 3, 0]] * 256, np.int32))
  cond = sample_conditioning(jax.random.key(0), seg, W, ConditioningConfig(p_v2v=0.7, p_i2v=0.0))
  own = OwnContext(p=0.5, t_min=0.2, t_max=0.5)
  est, frames = estimate_conditioning(jax.random.key(1), seg, cond, W, own)
  sel = np.asarray(frames)[:, ::W]
  clean, t, t_est = np.asarray(cond.clean), np.asarray(cond.t), np.asarray(est.t)
  assert not np.any(sel & ~clean)                         # only clean chunks are replaced
  np.testing.assert_array_equal(t_est[~sel], t[~sel])     # the rest is drawn as before
  np.testing.assert_array_equal(np.asarray(est.text_drop)[~sel], np.asarray(cond.text_drop)[~sel])
  assert not np.any(np.asarray(est.text_drop)[sel])       # selected chunks keep their captions
  assert np.all((t_est[sel] >= 0.2) & (t_est[sel] <= 0.5))
  np.testing.assert_array_equal(np.asarray(est.frame_t)[:, ::W], t_est)
  np.testing.assert_array_equal(np.asarray(est.frame_weight), np.asarray(cond.frame_weight))
  videos = [(0, 3), (3, 5), (5, 7)]
  chosen, with_clean = 0, 0
  for row in range(seg.shape[0]):
    for a, b in videos:
      c, s = clean[row, a:b], sel[row, a:b]
      if not c.any():
        continue
      with_clean += 1
      assert s[c].all() or not s.any()                     # a video is chosen whole
      if s.any():
        chosen += 1
        assert len(set(t_est[row, a:b][c].tolist())) == 1  # one level per video
  assert 0.4 < chosen / with_clean < 0.6, (chosen, with_clean)
  everything = estimate_conditioning(jax.random.key(1), seg, cond, W, dataclasses.replace(own, p=1))
  np.testing.assert_array_equal(np.asarray(everything[1])[:, ::W], clean)


def test_replaced_frames_are_the_models_estimate_and_the_rest_is_untouched(model):
  """The clean chunk of video 1 becomes the DiT's clean estimate of it at the drawn level
  (computed here by a separate call on that chunk alone); noisy chunks and the other video's
  chunks keep the data."""
  seg = np.array([[1, 1, 1, 2, 2]], np.int32)
  batch = _batch(seg)
  cond = _cond([[0.98, 0.6, 0.3, 0.5, 0.2]], [[True, False, False, False, False]],
               [[True, False, False, False, False]])
  for prediction in ("velocity", "clean"):
    obj = Objective(chunk_width=W, prediction=prediction, own_context=OwnContext(p=1.0))
    key = jax.random.key(3)
    new = own_context_batch(model, batch, cond, key, obj)
    x1, x1n = np.asarray(batch["x1"]), np.asarray(new["x1"])
    np.testing.assert_array_equal(x1n[:, :, W:], x1[:, :, W:])
    assert not np.allclose(x1n[:, :, :W], x1[:, :, :W])
    # The same draws by hand, on chunk 0 alone (block-causal: it sees nothing else).
    k_sel, k_noise = jax.random.split(key)
    est, _ = estimate_conditioning(k_sel, batch["segment_ids"], cond, W, obj.own_context)
    t_s = float(est.t[0, 0])
    assert 0.2 <= t_s <= 0.5
    noise = jax.random.normal(k_noise, batch["x1"].shape, jnp.float32)[:, :, :W]
    alone = {"x1": batch["x1"][:, :, :W], "segment_ids": jnp.ones((1, 1), jnp.int32),
             "text_emb": batch["text_emb"][:, :1], "text_mask": batch["text_mask"][:, :1]}
    c1 = _cond([[t_s]], [[False]], [[False]])
    out, _ = velocity_of_row(model, alone, c1, noise, obj)
    x_t = (1 - t_s) * noise + t_s * alone["x1"]
    want = np.asarray(out) if prediction == "clean" else np.asarray(x_t + (1 - t_s) * out)
    np.testing.assert_allclose(x1n[:, :, :W], want, atol=2e-5, rtol=1e-5)


def test_estimate_does_not_see_later_chunks(model):
  seg = np.array([[1, 1, 1]], np.int32)
  batch = _batch(seg)
  cond = _cond([[0.97, 0.5, 0.1]], [[True, False, False]], [[True, False, False]])
  obj = Objective(chunk_width=W, own_context=OwnContext(p=1.0))
  a = own_context_batch(model, batch, cond, jax.random.key(0), obj)["x1"]
  later = dict(batch, x1=batch["x1"].at[:, :, W:].add(5.0))
  b = own_context_batch(model, later, cond, jax.random.key(0), obj)["x1"]
  np.testing.assert_allclose(np.asarray(a[:, :, :W]), np.asarray(b[:, :, :W]), atol=1e-6)


def test_no_gradient_through_the_estimate(model):
  """With own context on, the gradient is the gradient of the loss on a batch whose clean
  chunk is the estimate held fixed: nothing flows back through the estimate pass."""
  seg = np.array([[1, 1, 1]], np.int32)
  batch = _batch(seg)
  cond = _cond([[0.97, 0.5, 0.1]], [[True, False, False]], [[True, False, False]])
  obj = Objective(chunk_width=W, own_context=OwnContext(p=1.0))
  x0 = jax.random.normal(jax.random.key(7), batch["x1"].shape, jnp.float32)
  graphdef, params = nnx.split(model)
  fixed = own_context_batch(model, batch, cond, jax.random.key(0), obj)

  def with_estimate(p):
    m = nnx.merge(graphdef, p)
    return loss_given(m, own_context_batch(m, batch, cond, jax.random.key(0), obj), cond, x0,
                      obj)[0]

  def held(p):
    return loss_given(nnx.merge(graphdef, p), fixed, cond, x0, obj)[0]

  g1, g2 = jax.grad(with_estimate)(params), jax.grad(held)(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6,
                                                       rtol=1e-5), g1, g2)
  assert float(with_estimate(params)) != float(loss_given(model, batch, cond, x0, obj)[0])


def test_off_draws_exactly_what_a_run_without_it_draws(model):
  seg = np.array([[1, 1, 1, 2, 2, 0]], np.int32)
  batch = _batch(seg)
  base = Objective(chunk_width=W, conditioning=ConditioningConfig(p_v2v=1.0, p_i2v=0.0))
  on = dataclasses.replace(base, own_context=OwnContext(p=1.0))
  key = jax.random.key(5)
  k_cond, k_noise = jax.random.split(key)
  cond = sample_conditioning(k_cond, batch["segment_ids"], W, base.conditioning)
  x0 = jax.random.normal(k_noise, batch["x1"].shape, jnp.float32)
  want = loss_given(model, batch, cond, x0, base)[0]
  assert float(base.loss(model, batch, key, 0)[0]) == float(want)
  # On, the same levels and noise, with the clean chunks replaced (own key: fold_in(key, 2)).
  own = own_context_batch(model, batch, cond, jax.random.fold_in(key, 2), on)
  np.testing.assert_allclose(float(on.loss(model, batch, key, 0)[0]),
                             float(loss_given(model, own, cond, x0, on)[0]), rtol=1e-6)
  # A batch of images has no clean chunks: its objective turns it off.
  assert not on.for_batch({"image_rows": None}).own_context.on


def test_from_step_gates_the_pass_under_jit(model):
  seg = np.array([[1, 1, 1]], np.int32)
  batch = _batch(seg)
  base = Objective(chunk_width=W, conditioning=ConditioningConfig(p_v2v=1.0, p_i2v=0.0))
  on = dataclasses.replace(base, own_context=OwnContext(p=1.0))
  gated = dataclasses.replace(base, own_context=OwnContext(p=1.0, from_step=10))
  key = jax.random.key(2)
  graphdef, params = nnx.split(model)
  loss = jax.jit(lambda p, s: gated.loss(nnx.merge(graphdef, p), batch, key, s)[0])
  off_loss, on_loss = float(base.loss(model, batch, key, 0)[0]), float(on.loss(model, batch,
                                                                                key, 0)[0])
  assert off_loss != on_loss
  np.testing.assert_allclose(float(loss(params, 9)), off_loss, rtol=1e-6)
  np.testing.assert_allclose(float(loss(params, 10)), on_loss, rtol=1e-6)


def test_with_own_context_mixes_frames():
  x1 = jnp.zeros((1, 2, 4, 1, 1))
  est = jnp.ones((1, 2, 4, 1, 1))
  out = np.asarray(with_own_context(x1, est, jnp.array([[True, True, False, False]])))
  np.testing.assert_array_equal(out[0, :, :, 0, 0], [[1, 1, 0, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("p, t, message", [
    (1.5, (0.2, 0.5), "own_context must be in"),
    (0.5, (0.6, 0.5), "t_min <= t_max < 1"),
    (0.5, (0.2, 1.0), "t_min <= t_max < 1"),
    (0.5, (0.2,), "own_context_t"),
    (0.5, (0.2, 0.5, -1), "own_context_from must be >= 0"),
])
def test_bad_settings_are_refused_by_the_config(p, t, message):
  from experiments.configs.bouncing_tiny import get_config
  from magi_jax.train import build
  c = get_config("smoke")
  c.objective.own_context = p
  c.objective.own_context_t = t[:2]
  if len(t) > 2:
    c.objective.own_context_from = t[2]
  with pytest.raises(ConfigError, match=message):
    build.objective(c)


def test_distillation_refuses_own_context():
  from experiments.configs.bouncing_distill import get_config
  from magi_jax.train import build
  c = get_config("smoke")
  c.objective.own_context = 0.5
  with pytest.raises(ConfigError, match="base-training option"):
    build.objective(c)
