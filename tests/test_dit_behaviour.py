"""Behaviour of one DiT forward call (official dit_module.py, dit_model.py) on a tiny random model:
block causality and kv windows, the KV-cache path, batching, caption dropout, precision modes, the
distilled and 24B-shaped variants, input validation and compile reuse.

Compiled functions are shared through module-level fixtures: a 2-core CI machine runs this file
in well under a minute.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_model
from magi_jax.models import CacheError, InputError, KVCache, KVCacheStore, Precision
from magi_jax.official.forward import jit_forward, official_forward

C_LAT, L, C_CAP = 16, 64, 32            # latent channels, caption length / channels (tiny)
CHUNK_WIDTH = 2                          # chunk width (latent frames)
TOKENS_PER_CHUNK = CHUNK_WIDTH * 4 * 4   # tokens per chunk at 8x8 latents = 32


def make_inputs(seed, N=1, chunks_in_flight=3, chunk_width=CHUNK_WIDTH, H=8, W=8, valid=None,
                channels=C_LAT):
  r = np.random.default_rng(seed)
  x = r.standard_normal((N, channels, chunks_in_flight * chunk_width, H, W)).astype(np.float32)
  t = r.uniform(0.05, 0.95, (N, chunks_in_flight)).astype(np.float32)
  y = r.standard_normal((N * chunks_in_flight, 1, L, C_CAP)).astype(np.float32)
  if valid is None:
    valid = r.integers(1, L + 1, N * chunks_in_flight)
  mask = (np.arange(L)[None, :] < np.asarray(valid)[:, None]).astype(np.int32)[:, None, :]
  return x, t, y, mask


def chunk_ranges(*rows, tokens_per_chunk=TOKENS_PER_CHUNK):
  """[[a, b], ...] in chunk units -> token units."""
  return np.asarray(rows, np.int32) * tokens_per_chunk


def frames(v, c, chunk_width=CHUNK_WIDTH):
  """Latent frames of chunk c."""
  return np.asarray(v)[:, :, c * chunk_width:(c + 1) * chunk_width]


BLOCK_CAUSAL = chunk_ranges([0, 1], [0, 2], [0, 3])
WINDOW = chunk_ranges([0, 1], [0, 2], [1, 3])


@pytest.fixture(scope="module")
def model():
  return make_model()


@pytest.fixture(scope="module")
def fwd(model):
  return jit_forward(model, return_kv=True, return_activations=True)


@pytest.fixture(scope="module")
def base_inputs():
  return make_inputs(0, valid=[5, 64, 23])


@pytest.fixture(scope="module")
def full(fwd, base_inputs):
  """The 3-chunk block-causal call every other test compares against."""
  return fwd(*base_inputs, BLOCK_CAUSAL, chunk_width=CHUNK_WIDTH)


# ---------------------------------------------------------------------------------------------
# (a) block causality

def test_full_call_shapes(full, base_inputs):
  x = base_inputs[0]
  chex.assert_shape(full.velocity, x.shape)
  chex.assert_type(full.velocity, jnp.float32)
  chex.assert_shape((full.kv.k, full.kv.v), (2, 1, 3 * TOKENS_PER_CHUNK, 2, 32))
  assert np.all(np.isfinite(np.asarray(full.velocity)))
  assert float(jnp.std(full.velocity)) > 1e-3


@pytest.mark.parametrize("what", ["x", "y", "mask", "t"])
def test_block_causality(fwd, full, base_inputs, what):
  x, t, y, mask = (a.copy() for a in base_inputs)
  if what == "x":
    x[:, :, 2 * CHUNK_WIDTH:] += np.random.default_rng(1).standard_normal(
        x[:, :, 2 * CHUNK_WIDTH:].shape)
  elif what == "y":
    y[2] = np.random.default_rng(2).standard_normal(y[2].shape)
  elif what == "mask":
    mask[2, 0, :] = (np.arange(L) < 60)
  else:
    t[0, 2] = 0.5 * t[0, 2] + 0.4
  out = fwd(x, t, y, mask, BLOCK_CAUSAL, chunk_width=CHUNK_WIDTH)
  for c in (0, 1):
    assert np.array_equal(frames(out.velocity, c), frames(full.velocity, c)), c
  assert np.array_equal(np.asarray(out.kv.k[:, :, :2 * TOKENS_PER_CHUNK]),
                        np.asarray(full.kv.k[:, :, :2 * TOKENS_PER_CHUNK]))
  assert not np.allclose(frames(out.velocity, 2), frames(full.velocity, 2), atol=1e-4)


def test_earlier_chunks_are_seen(fwd, full, base_inputs):
  """The converse: perturbing chunk 0 changes chunks 1 and 2 (attention does read back)."""
  x, t, y, mask = base_inputs
  x = x.copy()
  x[:, :, :CHUNK_WIDTH] += 1.0
  out = fwd(x, t, y, mask, BLOCK_CAUSAL, chunk_width=CHUNK_WIDTH)
  for c in (1, 2):
    assert not np.allclose(frames(out.velocity, c), frames(full.velocity, c), atol=1e-4), c


# ---------------------------------------------------------------------------------------------
# (b) kv-range windows

def test_kv_window_excludes_old_chunks(fwd, base_inputs):
  """Chunk 2 with range [TOKENS_PER_CHUNK, 3·TOKENS_PER_CHUNK) does not attend to chunk 0.

  In a one-call, multi-layer forward chunk 0 can still reach chunk 2 *through* chunk 1 (chunk
  1's hidden state after layer 0 saw chunk 0, and chunk 2 attends to it in layer 1). So the
  check is made (i) on layer 0's output, and (ii) on the final output with chunk 1 also
  windowed to itself.
  """
  x, t, y, mask = base_inputs
  xp = x.copy()
  xp[:, :, :CHUNK_WIDTH] += np.random.default_rng(3).standard_normal(xp[:, :, :CHUNK_WIDTH].shape)
  a = fwd(x, t, y, mask, WINDOW, chunk_width=CHUNK_WIDTH)
  b = fwd(xp, t, y, mask, WINDOW, chunk_width=CHUNK_WIDTH)
  l0a = np.asarray(a.activations["videodit_blocks.layers.0"])[:, 2 * TOKENS_PER_CHUNK:]
  l0b = np.asarray(b.activations["videodit_blocks.layers.0"])[:, 2 * TOKENS_PER_CHUNK:]
  assert np.array_equal(l0a, l0b)
  # Chunk 1 sees chunk 0, and chunk 2 sees chunk 1 in layer 1: the change arrives there.
  assert not np.allclose(frames(a.velocity, 1), frames(b.velocity, 1), atol=1e-4)
  assert not np.allclose(frames(a.velocity, 2), frames(b.velocity, 2), atol=1e-5)

  self_only_1 = chunk_ranges([0, 1], [1, 2], [1, 3])
  a = fwd(x, t, y, mask, self_only_1, chunk_width=CHUNK_WIDTH)
  b = fwd(xp, t, y, mask, self_only_1, chunk_width=CHUNK_WIDTH)
  for c in (1, 2):
    assert np.array_equal(frames(a.velocity, c), frames(b.velocity, c)), c
  assert not np.allclose(frames(a.velocity, 0), frames(b.velocity, 0), atol=1e-4)


def test_window_changes_the_output(fwd, full, base_inputs):
  out = fwd(*base_inputs, WINDOW, chunk_width=CHUNK_WIDTH)
  for c in (0, 1):
    assert np.array_equal(frames(out.velocity, c), frames(full.velocity, c))
  assert not np.allclose(frames(out.velocity, 2), frames(full.velocity, 2), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (c) KV cache == no cache

def _chunk2(inputs):
  x, t, y, mask = inputs
  return x[:, :, 2 * CHUNK_WIDTH:], t[:, 2:], y[2:], mask[2:]


def test_cache_two_chunks_equals_full_call(fwd, full, base_inputs):
  cache = KVCache(full.kv.k[:, :, :2 * TOKENS_PER_CHUNK], full.kv.v[:, :, :2 * TOKENS_PER_CHUNK])
  out = fwd(*_chunk2(base_inputs), chunk_ranges([0, 3]), slice_point=2, chunk_width=CHUNK_WIDTH,
            cache=cache)
  chex.assert_shape(out.velocity, (1, C_LAT, CHUNK_WIDTH, 8, 8))
  chex.assert_trees_all_close(out.velocity, frames(full.velocity, 2), atol=1e-5, rtol=1e-5)
  # The call's own keys/values are those of chunk 2 in the full call.
  chex.assert_trees_all_close((out.kv.k, out.kv.v),
                              (full.kv.k[:, :, 2 * TOKENS_PER_CHUNK:],
                               full.kv.v[:, :, 2 * TOKENS_PER_CHUNK:]),
                              atol=1e-5, rtol=1e-5)


def test_cache_one_chunk_window_equals_full_call(fwd, base_inputs):
  full_w = fwd(*base_inputs, WINDOW, chunk_width=CHUNK_WIDTH)
  cache = KVCache(full_w.kv.k[:, :, TOKENS_PER_CHUNK:2 * TOKENS_PER_CHUNK],
                  full_w.kv.v[:, :, TOKENS_PER_CHUNK:2 * TOKENS_PER_CHUNK])
  out = fwd(*_chunk2(base_inputs), chunk_ranges([1, 3]), slice_point=2, chunk_width=CHUNK_WIDTH,
            cache=cache)
  chex.assert_trees_all_close(out.velocity, frames(full_w.velocity, 2), atol=1e-5, rtol=1e-5)


def test_cache_store_round_trip(fwd, full, base_inputs):
  k, v = full.kv.k, full.kv.v
  store = KVCacheStore(capacity_chunks=2, tokens_per_chunk=TOKENS_PER_CHUNK)
  store.write(0, KVCache(k[:, :, :2 * TOKENS_PER_CHUNK], v[:, :, :2 * TOKENS_PER_CHUNK]))
  assert (store.first_chunk, store.end_chunk) == (0, 2)
  cache = store.read(2, 2)
  chex.assert_shape(cache.k, (2, 1, 2 * TOKENS_PER_CHUNK, 2, 32))
  out = fwd(*_chunk2(base_inputs), chunk_ranges([0, 3]), slice_point=2, chunk_width=CHUNK_WIDTH,
            cache=cache)
  chex.assert_trees_all_close(out.velocity, frames(full.velocity, 2), atol=1e-5, rtol=1e-5)

  # Writing chunk 2 evicts chunk 0 (capacity 2): [1, 3) remains.
  store.write(2, out.kv)
  assert (store.first_chunk, store.end_chunk) == (1, 3)
  with pytest.raises(CacheError):
    store.read(2, 2)
  chex.assert_trees_all_close(store.read(3, 2).k, k[:, :, TOKENS_PER_CHUNK:], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(store.read(2, 1).v),
                                np.asarray(v[:, :, TOKENS_PER_CHUNK:2 * TOKENS_PER_CHUNK]))
  assert store.read(2, 0) is None
  with pytest.raises(CacheError):
    store.read(4, 1)                       # chunk 3 was never written
  with pytest.raises(CacheError, match="gap"):
    store.write(4, out.kv)
  with pytest.raises(CacheError):
    store.write(3, KVCache(k[:, :, :TOKENS_PER_CHUNK + 1],       # not whole chunks
                           v[:, :, :TOKENS_PER_CHUNK + 1]))
  assert store.nbytes() == 2 * (2 * 1 * 2 * TOKENS_PER_CHUNK * 2 * 32 * 4)  # k and v, 2 chunks, f32

  # A cache read from the store drives the one-chunk-window call as well.
  cache1 = store.read(2, 1)
  full_w = fwd(*base_inputs, WINDOW, chunk_width=CHUNK_WIDTH)
  out1 = fwd(*_chunk2(base_inputs), chunk_ranges([1, 3]), slice_point=2, chunk_width=CHUNK_WIDTH,
             cache=cache1)
  chex.assert_trees_all_close(out1.velocity, frames(full_w.velocity, 2), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# (d) batch

def test_batch_elements_equal_their_own_calls(fwd):
  N = 3
  x, t, y, mask = make_inputs(10, N=N, chunks_in_flight=1, valid=[5, 64, 20])
  drop = np.array([False, True, False])
  out = fwd(x, t, y, mask, chunk_ranges([0, 1], [1, 2], [2, 3]), drop, chunk_width=CHUNK_WIDTH)
  chex.assert_shape(out.velocity, x.shape)
  for b in range(N):
    one = fwd(x[b:b + 1], t[b:b + 1], y[b:b + 1], mask[b:b + 1], chunk_ranges([0, 1]),
              drop[b:b + 1], chunk_width=CHUNK_WIDTH)
    chex.assert_trees_all_close(out.velocity[b:b + 1], one.velocity, atol=1e-5, rtol=1e-5)
  # The elements really differ from each other.
  assert not np.allclose(out.velocity[0], out.velocity[2], atol=1e-3)


def test_batch_with_cache_uses_element_major_offsets(model):
  """N = 2, chunks_in_flight = 1 at slice_point 1 with a one-chunk cache per element: element
  b's keys start at b·(slice_point·TOKENS_PER_CHUNK + S) in the official ranges."""
  f = jit_forward(model)
  N = 2
  x, t, y, mask = make_inputs(11, N=N, chunks_in_flight=1, valid=[7, 40])
  r = np.random.default_rng(12)
  ck = jnp.asarray(r.standard_normal((2, N, TOKENS_PER_CHUNK, 2, 32)), jnp.float32)
  cv = jnp.asarray(r.standard_normal((2, N, TOKENS_PER_CHUNK, 2, 32)), jnp.float32)
  per_elem = 1 * TOKENS_PER_CHUNK + TOKENS_PER_CHUNK
  kv = np.array([[0, 2 * TOKENS_PER_CHUNK],
                 [per_elem + TOKENS_PER_CHUNK, per_elem + 2 * TOKENS_PER_CHUNK]], np.int32)
  out = f(x, t, y, mask, kv, slice_point=1, chunk_width=CHUNK_WIDTH, cache=KVCache(ck, cv))
  own = [[0, 2 * TOKENS_PER_CHUNK], [TOKENS_PER_CHUNK, 2 * TOKENS_PER_CHUNK]]
  for b in range(N):
    one = f(x[b:b + 1], t[b:b + 1], y[b:b + 1], mask[b:b + 1], np.array([own[b]]),
            slice_point=1, chunk_width=CHUNK_WIDTH,
            cache=KVCache(ck[:, b:b + 1], cv[:, b:b + 1]))
    chex.assert_trees_all_close(out.velocity[b:b + 1], one.velocity, atol=1e-5, rtol=1e-5)
  # Element 0 attends to its cache, so the cache content matters.
  alt = f(x, t, y, mask, kv, slice_point=1, chunk_width=CHUNK_WIDTH, cache=KVCache(ck * 2, cv * 2))
  assert not np.allclose(alt.velocity[0], out.velocity[0], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(alt.velocity[1]), np.asarray(out.velocity[1]))


# ---------------------------------------------------------------------------------------------
# (e) caption dropout

def test_caption_dropout_mask_selects_adaln_row(fwd, full, base_inputs):
  kept = fwd(*base_inputs, BLOCK_CAUSAL, np.array([False]), chunk_width=CHUNK_WIDTH)
  dropped = fwd(*base_inputs, BLOCK_CAUSAL, np.array([True]), chunk_width=CHUNK_WIDTH)
  np.testing.assert_array_equal(np.asarray(kept.velocity), np.asarray(full.velocity))
  for c in range(3):
    assert not np.allclose(frames(dropped.velocity, c), frames(kept.velocity, c), atol=1e-4)
  # Cross-attention still reads y when the caption is "dropped".
  x, t, y, mask = base_inputs
  y2 = y.copy()
  y2[0] += 1.0
  dropped_y2 = fwd(x, t, y2, mask, BLOCK_CAUSAL, np.array([True]), chunk_width=CHUNK_WIDTH)
  assert not np.allclose(frames(dropped_y2.velocity, 0), frames(dropped.velocity, 0), atol=1e-4)


def test_padding_caption_tokens_are_ignored(fwd, full, base_inputs):
  """Only the xattn_mask tokens of each row are keys of its chunk's cross-attention."""
  x, t, y, mask = base_inputs                    # valid tokens per row: 5, 64, 23
  y2 = y.copy()
  y2[0, 0, 5:] = 100.0
  y2[2, 0, 23:] = -3.0
  out = fwd(x, t, y2, mask, BLOCK_CAUSAL, chunk_width=CHUNK_WIDTH)
  np.testing.assert_array_equal(np.asarray(out.velocity), np.asarray(full.velocity))
  y2[0, 0, 4] += 1.0                             # the last valid token of row 0 does count
  out = fwd(x, t, y2, mask, BLOCK_CAUSAL, chunk_width=CHUNK_WIDTH)
  assert not np.allclose(frames(out.velocity, 0), frames(full.velocity, 0), atol=1e-4)


def test_caption_mask_with_holes_is_packed(fwd, full, base_inputs):
  """Valid tokens are packed to the front in order: a mask with holes equals the compacted
  caption with a prefix mask."""
  x, t, y, mask = base_inputs
  r = np.random.default_rng(8)
  y_holes = r.standard_normal(y.shape).astype(np.float32)
  m_holes = np.zeros_like(mask)
  for row, n in enumerate([5, 64, 23]):
    pos = np.sort(r.choice(L, n, replace=False))
    m_holes[row, 0, pos] = 1
    y_holes[row, 0, pos] = y[row, 0, :n]
  out = fwd(x, t, y_holes, m_holes, BLOCK_CAUSAL, chunk_width=CHUNK_WIDTH)
  chex.assert_trees_all_close(out.velocity, full.velocity, atol=1e-6, rtol=1e-6)


def test_caption_dropout_picks_null_rows_minus2_and_minus1(model):
  """Kept -> null_caption_embedding[-2], dropped -> [-1] (as the official): changing row -1 only
  changes the dropped output."""
  m2 = nnx.clone(model)
  emb = m2.y_embedder.null_caption_embedding
  emb[...] = emb[...].at[-1].add(1.0)
  x, t, y, mask = make_inputs(60, N=2, chunks_in_flight=1)
  kv = chunk_ranges([0, 1], [1, 2])
  drop = np.array([False, True])
  a = jit_forward(model)(x, t, y, mask, kv, drop)
  b = jit_forward(m2)(x, t, y, mask, kv, drop)
  np.testing.assert_array_equal(np.asarray(a.velocity[0]), np.asarray(b.velocity[0]))
  assert not np.allclose(np.asarray(a.velocity[1]), np.asarray(b.velocity[1]), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# (f) bf16 mode

def _copy_params(src, dst):
  """dst's parameters <- src's, each cast to dst's leaf dtype."""
  s_src = nnx.state(src, nnx.Param)
  s_dst = nnx.state(dst, nnx.Param)
  nnx.update(dst, jax.tree.map(lambda a, b: jnp.asarray(a).astype(b.dtype), s_src, s_dst))
  return dst


def test_bf16_close_to_fp32(model, full, base_inputs):
  m16 = _copy_params(model, make_model(precision=Precision.bf16(), seed=7))
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(m16, nnx.Param))}
  assert jnp.dtype(jnp.bfloat16) in dtypes and jnp.dtype(jnp.float32) in dtypes
  # The weights are the fp32 model's (rounded).
  np.testing.assert_allclose(np.asarray(m16.layers.q.kernel[...], np.float32),
                             np.asarray(model.layers.q.kernel[...]), rtol=1e-2, atol=1e-6)
  out = jit_forward(m16, return_kv=True)(*base_inputs, BLOCK_CAUSAL, chunk_width=CHUNK_WIDTH)
  chex.assert_type(out.velocity, jnp.float32)
  # The hidden stream, and with it the KV cache, is bf16 (official post-load dtype promotion).
  chex.assert_type((out.kv.k, out.kv.v), jnp.bfloat16)
  chex.assert_shape(out.velocity, full.velocity.shape)
  ref = np.asarray(full.velocity)
  err = np.abs(np.asarray(out.velocity) - ref).max() / np.abs(ref).max()
  assert err < 5e-2, err
  assert err > 1e-5, "bf16 mode gave the fp32 result: nothing was rounded"


# ---------------------------------------------------------------------------------------------
# (g) distilled model

def test_distill_needs_and_uses_step_size():
  dm = make_model(distill=True, seed=3)
  f = jit_forward(dm)
  x, t, y, mask = make_inputs(20, chunks_in_flight=1)
  kv = chunk_ranges([0, 1])
  with pytest.raises(InputError, match="step_size"):
    f(x, t, y, mask, kv)
  with pytest.raises(InputError, match="step_size"):
    dm(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask), kv)
  a = f(x, t, y, mask, kv, step_size=3.0)
  b = f(x, t, y, mask, kv, step_size=8.0)
  assert np.all(np.isfinite(np.asarray(a.velocity)))
  assert not np.allclose(np.asarray(a.velocity), np.asarray(b.velocity), atol=1e-4)
  assert f.compiled._cache_size() == 1          # step_size is traced


# ---------------------------------------------------------------------------------------------
# (h) 24B-shaped mini config

def test_24b_shaped_mini_config():
  kw = dict(gated_linear_unit=True, in_channels=32, out_channels=32)
  m24 = make_model(half_channel_vae=True, x_rescale_factor=0.1, seed=4, **kw)
  x, t, y, mask = make_inputs(30, chunks_in_flight=2)
  kv = chunk_ranges([0, 1], [0, 2])
  out = jit_forward(m24)(x, t, y, mask, kv)
  chex.assert_shape(out.velocity, (1, 16, 2 * CHUNK_WIDTH, 8, 8))
  chex.assert_type(out.velocity, jnp.float32)
  assert np.all(np.isfinite(np.asarray(out.velocity)))

  # Same weights without half_channel_vae / x_rescale: the 24B model on x must be the plain
  # 32-channel model on [0.1x, 0.1x], first 16 output channels, divided by 0.1.
  plain = _copy_params(m24, make_model(x_rescale_factor=1.0, seed=5, **kw))
  xs = (0.1 * x).astype(np.float32)
  ref = jit_forward(plain)(np.concatenate([xs, xs], axis=1), t, y, mask, kv)
  chex.assert_shape(ref.velocity, (1, 32, 2 * CHUNK_WIDTH, 8, 8))
  chex.assert_trees_all_close(out.velocity, ref.velocity[:, :16] / 0.1, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# (i) other shapes: MQA, non-square latents, chunk width 3

def test_mqa_non_square_chunk_width_3():
  m = make_model(hidden_size=96, num_attention_heads=3, num_query_groups=1, kv_channels=32,
                 seed=6)
  f = jit_forward(m, return_kv=True)
  chunk_width, H, W = 3, 8, 12
  tokens_per_chunk = chunk_width * (H // 2) * (W // 2)
  x, t, y, mask = make_inputs(40, chunks_in_flight=2, chunk_width=chunk_width, H=H, W=W)
  kv = chunk_ranges([0, 1], [0, 2], tokens_per_chunk=tokens_per_chunk)
  out = f(x, t, y, mask, kv, chunk_width=chunk_width)
  chex.assert_shape(out.velocity, (1, C_LAT, 2 * chunk_width, H, W))
  chex.assert_shape(out.kv.k, (2, 1, 2 * tokens_per_chunk, 1, 32))
  assert np.all(np.isfinite(np.asarray(out.velocity)))
  x2 = x.copy()
  x2[:, :, chunk_width:] *= -1.0
  out2 = f(x2, t, y, mask, kv, chunk_width=chunk_width)
  assert np.array_equal(np.asarray(out2.velocity)[:, :, :chunk_width],
                        np.asarray(out.velocity)[:, :, :chunk_width])
  assert not np.allclose(np.asarray(out2.velocity)[:, :, chunk_width:],
                         np.asarray(out.velocity)[:, :, chunk_width:], atol=1e-4)
  # And through the cache: chunk 1 alone after chunk 0.
  one = f(x[:, :, chunk_width:], t[:, 1:], y[1:], mask[1:], kv[1:], slice_point=1,
          chunk_width=chunk_width,
          cache=KVCache(out.kv.k[:, :, :tokens_per_chunk], out.kv.v[:, :, :tokens_per_chunk]))
  chex.assert_trees_all_close(one.velocity, out.velocity[:, :, chunk_width:], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Backends inside the model

@pytest.mark.parametrize("backend", ["dot_product", "blockwise"])
def test_model_backends_agree(model, full, base_inputs, backend):
  out = jit_forward(model, backend=backend)(*base_inputs, BLOCK_CAUSAL, chunk_width=CHUNK_WIDTH)
  chex.assert_trees_all_close(out.velocity, full.velocity, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# (j) input errors

def test_input_errors(fwd, full, base_inputs):
  x, t, y, mask = base_inputs
  with pytest.raises(InputError, match="channels"):
    fwd(x[:, :8], t, y, mask, BLOCK_CAUSAL)
  with pytest.raises(InputError, match="divisible by patch_size"):
    fwd(x[..., :7, :], t, y, mask, BLOCK_CAUSAL)
  with pytest.raises(InputError, match=r"t must be"):
    fwd(x, np.concatenate([t, t]), y, mask, BLOCK_CAUSAL)
  with pytest.raises(InputError, match="cannot be split"):
    fwd(x, np.full((1, 4), 0.5, np.float32), y, mask, BLOCK_CAUSAL)
  with pytest.raises(InputError, match="chunk_width"):
    fwd(x, t, y, mask, BLOCK_CAUSAL, chunk_width=3)
  with pytest.raises(InputError, match="y must"):
    fwd(x, t, y[:2], mask, BLOCK_CAUSAL)
  with pytest.raises(InputError, match="xattn_mask"):
    fwd(x, t, y, mask[..., :10], BLOCK_CAUSAL)
  with pytest.raises(InputError, match="kv_range must"):
    fwd(x, t, y, mask, BLOCK_CAUSAL[:2])
  # kv ranges that need keys outside [cache; current].
  xc, tc, yc, mc = _chunk2(base_inputs)
  cache1 = KVCache(full.kv.k[:, :, TOKENS_PER_CHUNK:2 * TOKENS_PER_CHUNK],
                   full.kv.v[:, :, TOKENS_PER_CHUNK:2 * TOKENS_PER_CHUNK])
  with pytest.raises(InputError, match="outside"):
    fwd(xc, tc, yc, mc, chunk_ranges([0, 3]), slice_point=2, chunk_width=CHUNK_WIDTH, cache=cache1)
  with pytest.raises(InputError, match="outside"):
    fwd(xc, tc, yc, mc, chunk_ranges([1, 3]), slice_point=2, chunk_width=CHUNK_WIDTH)
  with pytest.raises(InputError, match="outside"):
    fwd(x, t, y, mask, chunk_ranges([0, 1], [0, 2], [0, 4]))
  with pytest.raises(InputError, match="layers"):
    fwd(xc, tc, yc, mc, chunk_ranges([1, 3]), slice_point=2, chunk_width=CHUNK_WIDTH,
        cache=KVCache(cache1.k[:1], cache1.v[:1]))


def test_input_errors_from_direct_model_call(model, base_inputs):
  x, t, y, mask = base_inputs
  with pytest.raises(InputError, match="channels"):
    official_forward(model, jnp.asarray(x[:, :4]), jnp.asarray(t), jnp.asarray(y),
                     jnp.asarray(mask), BLOCK_CAUSAL)


# ---------------------------------------------------------------------------------------------
# (k) compile reuse

def test_jit_reuse_across_slice_points(model):
  f = jit_forward(model)
  x, t, y, mask = make_inputs(50, chunks_in_flight=2)
  a = f(x, t, y, mask, chunk_ranges([0, 1], [0, 2]), chunk_width=CHUNK_WIDTH)
  assert f.compiled._cache_size() == 1
  # Same shapes, other slice_point, ranges and values: no recompilation.
  b = f(x, t, y, mask, chunk_ranges([3, 4], [3, 5]), slice_point=3, chunk_width=CHUNK_WIDTH)
  f(x * 0.5, t * 0.5, y, mask, chunk_ranges([5, 6], [6, 7]), slice_point=5, chunk_width=CHUNK_WIDTH)
  assert f.compiled._cache_size() == 1
  # Without a cache, shifting every chunk in time changes no relative position:
  # the output is the same up to the float32 rounding of the time rescale.
  chex.assert_trees_all_close(a.velocity, b.velocity, atol=1e-5, rtol=1e-5)


def test_bad_cache_and_dropout_mask_shapes_raise_input_error():
  from magi_jax.models import InputError, KVCache
  model = make_model()
  fwd = jit_forward(model)
  x = np.zeros((1, 16, 2, 8, 8), np.float32)
  args = (x, np.array([[0.5]]), np.zeros((1, 1, 64, 32), np.float32), np.ones((1, 1, 64)),
          np.array([[0, 64]]))
  good = np.zeros((2, 1, 32, 2, 32), np.float32)
  for bad, word in ((np.zeros((2, 2, 32, 2, 32), np.float32), "N=1"),
                    (np.zeros((2, 1, 32, 1, 32), np.float32), "kv_groups"),
                    (np.zeros((2, 1, 20, 2, 32), np.float32), "whole number")):
    with pytest.raises(InputError, match=word):
      fwd(*args, slice_point=1, cache=KVCache(bad, bad))
  fwd(*args, slice_point=1, cache=KVCache(good, good))          # the right shape is accepted
  with pytest.raises(InputError, match="caption_dropout_mask"):
    fwd(*args[:4], np.array([[0, 32]]), np.array([True, False]))
