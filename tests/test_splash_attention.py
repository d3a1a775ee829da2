"""Splash-attention backend: its mask encodings (static block-causal mask + segment ids,
key-prefix segment ids, static per-chunk ranges) against `dense_mask`, the kernel against
`reference_attention` (values and gradients; Pallas interpreter off TPU), the plan and
`supports` truth tables, and the ValueErrors for masks it cannot express (never a silently
different mask).

Tolerance: float32 1e-5. The kernel computes the same float32 sums as the reference but in a
different order (online softmax over 128-wide key blocks, q pre-multiplied by the scale), so it
agrees to float32 rounding (observed max |diff| ~6e-7 for values, ~2e-6 for gradients), not
bit for bit.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax.attention import ChunkMask, chunk_kv_ranges, dense_mask
from magi_jax.attention.reference import reference_attention
from magi_jax.attention.splash import (BlockCausalMask, ChunkRangeMask, check_supported,
                                      effective_mask, plan, prefix_segment_ids, segment_ids,
                                      splash_attention, supports)

HIGHEST = jax.lax.Precision.HIGHEST
TOL = dict(atol=1e-5, rtol=1e-5)


def ranges(q_block, starts):
  """(B, n, 2) int32 kv ranges: chunk i of row b sees [starts[b][i] * q_block, (i+1) * q_block)."""
  starts = np.asarray(starts)
  n = starts.shape[1]
  hi = np.broadcast_to((np.arange(n) + 1) * q_block, starts.shape)
  return jnp.asarray(np.stack([starts * q_block, hi], axis=-1), jnp.int32)


def rand_qkv(seed, B, S, Hq, Hkv, D, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  q = r.standard_normal((B, S, Hq, D))
  k = r.standard_normal((B, S, Hkv, D))
  v = r.standard_normal((B, S, Hkv, D))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def reference(q, k, v, mask, scale):
  return reference_attention(q, k, v, mask, scale=scale, precision=HIGHEST)


# One compiled program per shape; kv_ranges are traced, promised causal segments.
@jax.jit
def splash_jit(q, k, v, kv_ranges):
  mask = ChunkMask(kv_ranges, q_block=QB, layout="causal_segments")
  return splash_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5)


QB, N_CHUNKS, D = 128, 4, 64
S = QB * N_CHUNKS
BLOCK_CAUSAL = [[0, 0, 0, 0]]
# Row 0: two videos of two chunks; row 1: a 3-chunk video then a 1-chunk one.
PACKED = [[0, 0, 2, 2], [0, 0, 0, 3]]
# Two videos then a padding chunk (sees only itself, as `segments.segment_layout` builds it).
PACKED_PAD = [[0, 1, 1, 3]]


# ---------------------------------------------------------------------------------------------
# Mask construction (no kernel).

def test_static_mask_is_dense_block_causal():
  for qb, n in ((128, 4), (96, 3), (2, 5)):
    s = qb * n
    mask = ChunkMask(ranges(qb, [[0] * n]), q_block=qb)
    static = BlockCausalMask((s, s), qb)[:, :]
    np.testing.assert_array_equal(static, np.asarray(dense_mask(mask, s))[0])
    # the kernel's own (in-kernel) mask function on index arrays agrees too
    qi, ki = np.arange(s)[:, None], np.arange(s)[None, :]
    assert static.dtype == np.bool_
    np.testing.assert_array_equal(BlockCausalMask((s, s), qb).mask_function(qi, ki), static)


def test_static_mask_hash_and_eq():
  assert BlockCausalMask((256, 256), 128) == BlockCausalMask((256, 256), 128)
  assert hash(BlockCausalMask((256, 256), 128)) == hash(BlockCausalMask((256, 256), 128))
  assert BlockCausalMask((256, 256), 128) != BlockCausalMask((256, 256), 64)


@pytest.mark.parametrize("starts", [BLOCK_CAUSAL * 2, PACKED, PACKED_PAD,
                                    [[0, 1, 2, 3]]],                      # window 1 = own chunk
                         ids=["block_causal", "packed", "packed_pad", "own_chunk"])
@pytest.mark.parametrize("qb,pad", [(4, 0), (4, 5), (3, 7)])
def test_segment_ids_reproduce_dense_mask(starts, qb, pad):
  mask = ChunkMask(ranges(qb, starts), q_block=qb)
  s = qb * mask.num_q_blocks
  check_supported(mask, s, s)
  eff = np.asarray(effective_mask(mask, s + pad))
  np.testing.assert_array_equal(eff[:, :s, :s], np.asarray(dense_mask(mask, s)))
  # real queries never see padding keys; padding queries see only padding, and some of it
  assert not eff[:, :s, s:].any()
  assert not eff[:, s:, :s].any()
  if pad:
    assert eff[:, s:, s:].any(axis=-1).all()


def test_segment_ids_values():
  seg = segment_ids(ranges(2, PACKED), 2, 10)
  np.testing.assert_array_equal(
      np.asarray(seg), [[0, 0, 0, 0, 4, 4, 4, 4, -1, -1], [0, 0, 0, 0, 0, 0, 6, 6, -1, -1]])


def test_packed_layout_from_training_segments():
  """The packed rows the trainer builds (`segments.segment_layout`) are covered exactly."""
  from magi_jax.diffusion.segments import segment_layout
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]], jnp.int32)   # 0 = padding chunk
  _, start, _ = segment_layout(seg)
  mask = ChunkMask(ranges(3, np.asarray(start)), q_block=3)
  s = 3 * 6
  check_supported(mask, s, s)
  np.testing.assert_array_equal(np.asarray(effective_mask(mask)), np.asarray(dense_mask(mask, s)))


# ---------------------------------------------------------------------------------------------
# Plans, supports, and the masks splash refuses.

def window_ranges(width, n=N_CHUNKS, cache_chunks=0, B=1):
  """(B, n, 2) int32: chunk c of n (after `cache_chunks` cached chunks) sees `width` chunks."""
  r = chunk_kv_ranges(range(cache_chunks, cache_chunks + n), widths=[width] * n,
                      tokens_per_chunk=QB)
  return jnp.asarray(np.repeat(r[None], B, 0), jnp.int32)


def traced(fn, *arrays):
  """fn(*tracers): runs `fn` at trace time on traced copies of `arrays`, returns its result."""
  out = []
  jax.jit(lambda *a: out.append(fn(*a)) or 0).lower(*arrays)
  return out[0]


def test_plan_kinds():
  seg, kp = ranges(QB, PACKED), jnp.asarray([[[0, 40]], [[0, 7]]], jnp.int32)
  assert plan(ChunkMask(seg, q_block=QB), S, S).kind == "segments"
  assert plan(ChunkMask(kp, q_block=QB, layout="key_prefix"), QB, 40).kind == "key_prefix"
  assert plan(ChunkMask(kp, q_block=QB), QB, 40).kind == "key_prefix"     # rows differ
  p = plan(ChunkMask(window_ranges(2, B=2), q_block=QB), S, S)
  assert p == ("static", ((0, 128), (0, 256), (128, 384), (256, 512)))
  cache = ChunkMask(window_ranges(2, n=2, cache_chunks=1), q_block=QB)     # KV cache, Sk > Sq
  assert plan(cache, 2 * QB, 3 * QB) == ("static", ((0, 256), (128, 384)))
  for layout, kind in (("causal_segments", "segments"), ("key_prefix", "key_prefix")):
    r = seg if layout == "causal_segments" else kp
    sk = S if layout == "causal_segments" else 40
    sq = r.shape[1] * QB
    assert traced(lambda a, layout=layout, sq=sq, sk=sk:
                  plan(ChunkMask(a, q_block=QB, layout=layout), sq, sk).kind, r) == kind


def test_traced_general_mask_raises():
  """Under jit a 'general' mask cannot be checked: an error, not a guessed mask."""
  q, k, v = rand_qkv(0, 1, S, 2, 2, D)
  f = jax.jit(lambda q, k, v, r: splash_attention(q, k, v, ChunkMask(r, q_block=QB),
                                                  scale=0.125))
  for r in (window_ranges(2), ranges(QB, BLOCK_CAUSAL)):
    with pytest.raises(ValueError, match="layout 'general' whose kv_ranges are traced"):
      f(q, k, v, r)


def test_broken_promises_raise():
  with pytest.raises(ValueError, match="promises layout 'causal_segments'.*sliding-window"):
    check_supported(ChunkMask(window_ranges(2), q_block=QB, layout="causal_segments"), S, S)
  with pytest.raises(ValueError, match=r"Sk == Sq"):
    check_supported(ChunkMask(ranges(QB, BLOCK_CAUSAL), q_block=QB, layout="causal_segments"),
                    S, S + QB)
  with pytest.raises(ValueError, match="one query block per row"):
    check_supported(ChunkMask(ranges(QB, BLOCK_CAUSAL), q_block=QB, layout="key_prefix"), S, S)


@pytest.mark.parametrize("bad,match", [
    ([[0, 2 * QB], [0, 2 * QB]], "past its own chunk"),                   # non-causal
    ([[0, QB], [0, QB]], "whole of its own chunk"),                       # chunk 1 misses itself
    ([[QB // 2, QB], [QB // 2, 2 * QB]], "neither a segment start"),      # start mid-chunk
])
def test_non_segment_ranges_named(bad, match):
  """Concrete ranges that are not causal segments: the problem is named, and with rows that
  differ (so no one static mask) they are refused."""
  one = jnp.asarray([bad], jnp.int32)
  with pytest.raises(ValueError, match=match):
    check_supported(ChunkMask(one, q_block=QB, layout="causal_segments"), 2 * QB, 2 * QB)
  assert plan(ChunkMask(one, q_block=QB), 2 * QB, 2 * QB).kind == "static"
  two = jnp.concatenate([one, ranges(QB, [[0, 0]])])
  with pytest.raises(ValueError, match=f"{match}.*batch rows differ"):
    check_supported(ChunkMask(two, q_block=QB), 2 * QB, 2 * QB)


def test_empty_or_out_of_range_static_ranges_raise():
  for bad in ([[0, QB], [QB, QB]], [[0, QB], [QB, 3 * QB]]):           # empty; past Sk
    with pytest.raises(ValueError, match="not a non-empty range"):
      check_supported(ChunkMask(jnp.asarray([bad], jnp.int32), q_block=QB), 2 * QB, 2 * QB)


def test_supports_truth_table():
  seg, win = ranges(QB, PACKED), window_ranges(2, B=2)
  kp = jnp.asarray([[[0, 40]], [[0, 0]]], jnp.int32)
  win_rows_differ = win.at[1, 3, 0].set(0)
  cache = window_ranges(2, n=2, cache_chunks=1)
  mk = lambda r, layout="general": ChunkMask(r, q_block=QB, layout=layout)
  concrete = [
      (mk(seg), S, S, True),                                  # packed rows, checked
      (mk(win), S, S, True),                                  # window, same for every row
      (mk(win_rows_differ), S, S, False),                     # window, rows differ
      (mk(cache), 2 * QB, 3 * QB, True),                      # KV cache, one static mask
      (mk(kp, "key_prefix"), QB, 40, True),                   # captions, Sk != Sq
      (mk(kp), QB, 40, True),                                 # one range per row
      (mk(seg, "key_prefix"), S, S, False),                   # 4 blocks: not key_prefix
      (mk(win, "causal_segments"), S, S, False),              # broken promise
      (mk(seg), S, S + QB, False),                            # not segments, rows differ
      (mk(seg), S + QB, S + QB, False),                       # mask does not cover q
  ]
  for mask, sq, sk, want in concrete:
    assert supports(mask, sq, sk) is want, (mask, sq, sk)
  for r, layout, sq, sk, want in [(seg, "causal_segments", S, S, True),
                                  (seg, "general", S, S, False),
                                  (win, "general", S, S, False),
                                  (kp, "key_prefix", QB, 40, True),
                                  (kp, "general", QB, 40, False),
                                  (seg, "causal_segments", S, S + QB, False)]:
    assert traced(lambda a, layout=layout, sq=sq, sk=sk: supports(mk(a, layout), sq, sk),
                  r) is want, (layout, sq, sk)


def test_chunk_range_mask_is_dense_mask():
  """The static per-chunk mask equals dense_mask, padded queries take the last chunk's range,
  and the in-kernel mask function agrees with the per-block (numpy) one."""
  qb, sk = 4, 20
  r = np.array([[[0, 8], [4, 12], [6, 20]]])
  m = ChunkRangeMask((16, 24), qb, r[0])
  np.testing.assert_array_equal(m[:12, :20], np.asarray(dense_mask(ChunkMask(r, qb), sk))[0])
  np.testing.assert_array_equal(m[12:, :], np.repeat(m[11:12, :], 4, 0))
  assert not m[:, 20:].any()
  qi, ki = np.meshgrid(np.arange(16), np.arange(24), indexing="ij")
  np.testing.assert_array_equal(np.asarray(m.mask_function(jnp.asarray(qi), jnp.asarray(ki))),
                                m[:, :])
  assert m == ChunkRangeMask((16, 24), qb, r[0]) and hash(m) == hash(ChunkRangeMask(
      (16, 24), qb, r[0]))
  assert m != ChunkRangeMask((16, 24), qb, r[0] + 1)


def test_prefix_segment_ids_reproduce_dense_mask():
  r = jnp.asarray([[[0, 5]], [[2, 7]], [[0, 0]], [[0, 99]]], jnp.int32)
  sk = 8
  q_ids, kv_ids = prefix_segment_ids(r, sk, 6, 12)
  eff = np.asarray(q_ids[:, :, None] == kv_ids[:, None, :])
  np.testing.assert_array_equal(eff[:, :, :sk], np.asarray(dense_mask(ChunkMask(r, 6), sk)))
  assert not eff[:, :, sk:].any()                           # padded keys are never seen


def test_training_masks_are_causal_segments():
  """The self-attention mask of a packed training row (`packed_kv_ranges`, what
  velocity_of_row passes the DiT) is what it promises: causal segments."""
  from magi_jax.diffusion.segments import packed_kv_ranges
  tokens_per_chunk = 3
  for seg in ([[1, 1, 2, 2, 2, 0]], [[1, 2, 3, 3, 0, 0], [1, 1, 1, 1, 1, 1]], [[1, 0, 0]]):
    seg = np.asarray(seg, np.int32)
    N, K = seg.shape
    local = np.asarray(packed_kv_ranges(seg, tokens_per_chunk))
    mask = ChunkMask(jnp.asarray(local, jnp.int32), q_block=tokens_per_chunk,
                     layout="causal_segments")
    S = K * tokens_per_chunk
    check_supported(mask, S, S)
    assert plan(ChunkMask(mask.kv_ranges, q_block=tokens_per_chunk), S, S).kind == "segments"
    np.testing.assert_array_equal(np.asarray(effective_mask(mask)),
                                  np.asarray(dense_mask(mask, S)))


# ---------------------------------------------------------------------------------------------
# The kernel (Pallas interpreter off TPU) against the reference.

@pytest.mark.parametrize("starts", [BLOCK_CAUSAL, PACKED, PACKED_PAD],
                         ids=["block_causal", "packed", "packed_pad"])
def test_matches_reference(starts):
  B = len(starts)
  q, k, v = rand_qkv(1, B, S, 2, 2, D)
  kv = ranges(QB, starts)
  out = splash_jit(q, k, v, kv)
  chex.assert_shape(out, q.shape)
  chex.assert_trees_all_close(out, reference(q, k, v, ChunkMask(kv, q_block=QB), D ** -0.5),
                              **TOL)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
def test_gqa_matches_reference(hq, hkv):
  q, k, v = rand_qkv(2, 2, S, hq, hkv, D)
  kv = ranges(QB, PACKED)
  chex.assert_trees_all_close(splash_jit(q, k, v, kv),
                              reference(q, k, v, ChunkMask(kv, q_block=QB), D ** -0.5), **TOL)


def test_padding_to_block_size():
  """q_block 96 x 3 chunks = 288 tokens, padded to 384 inside; eager (concrete ranges)."""
  qb = 96
  q, k, v = rand_qkv(3, 2, 3 * qb, 2, 1, D)
  mask = ChunkMask(ranges(qb, [[0, 0, 0], [0, 1, 1]]), q_block=qb)
  out = splash_attention(q, k, v, mask, scale=0.3)
  chex.assert_trees_all_close(out, reference(q, k, v, mask, 0.3), **TOL)


def test_gradients_match_reference():
  q, k, v = rand_qkv(4, 1, S, 4, 2, D)
  mask = ChunkMask(ranges(QB, [PACKED[0]]), q_block=QB)
  w = jnp.cos(jnp.arange(D, dtype=jnp.float32))

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

  g = jax.jit(jax.grad(loss(lambda q, k, v: splash_attention(q, k, v, mask, scale=0.125)),
                       argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.grad(loss(lambda q, k, v: reference(q, k, v, mask, 0.125)), argnums=(0, 1, 2))(
      q, k, v)
  chex.assert_trees_all_close(g, g_ref, **TOL)


def test_bfloat16_runs_close():
  """bf16: the kernel keeps probabilities in float32 for P @ V, the reference rounds them to
  bf16, so they differ at bf16 rounding level."""
  q, k, v = rand_qkv(5, 1, S, 2, 2, D, jnp.bfloat16)
  kv = ranges(QB, BLOCK_CAUSAL)
  out = splash_jit(q, k, v, kv)
  assert out.dtype == jnp.bfloat16
  ref = reference(q, k, v, ChunkMask(kv, q_block=QB), D ** -0.5)
  chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32), atol=3e-2,
                              rtol=3e-2)


# ---------------------------------------------------------------------------------------------
# Key-prefix (cross-attention) and static-range encodings against the reference.

def _grads_match(fn, q, k, v, mask, scale):
  w = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
  g = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(loss(lambda q, k, v: reference(q, k, v, mask, scale)),
                           argnums=(0, 1, 2)))(q, k, v)
  chex.assert_trees_all_close(g, g_ref, **TOL)


def test_key_prefix_matches_reference():
  """Caption cross-attention: 3 rows of 40 queries against 200 keys (padded to 128 / 256),
  traced ranges, one row sees every key, one a prefix, one nothing (zeros, as the reference)."""
  q, _, _ = rand_qkv(6, 3, 40, 2, 1, 32)
  _, k, v = rand_qkv(7, 3, 200, 2, 1, 32)
  r = jnp.asarray([[[0, 200]], [[0, 50]], [[0, 0]]], jnp.int32)
  mask = ChunkMask(r, q_block=40, layout="key_prefix")
  fn = jax.jit(lambda q, k, v, r: splash_attention(
      q, k, v, ChunkMask(r, q_block=40, layout="key_prefix"), scale=0.2))
  out = fn(q, k, v, r)
  chex.assert_trees_all_close(out, reference(q, k, v, mask, 0.2), **TOL)
  assert not np.asarray(out[2]).any()
  _grads_match(lambda q, k, v: fn(q, k, v, r), q, k, v, mask, 0.2)


def test_static_kv_cache_window_matches_reference():
  """A sampler-like step: 1 cached chunk + 2 current chunks, window of 2 chunks (Sk > Sq),
  the same concrete ranges for both rows -> one static mask; values and gradients."""
  q, _, _ = rand_qkv(8, 2, 2 * QB, 2, 1, 32)
  _, k, v = rand_qkv(9, 2, 3 * QB, 2, 1, 32)
  mask = ChunkMask(window_ranges(2, n=2, cache_chunks=1, B=2), q_block=QB)
  fn = lambda q, k, v: splash_attention(q, k, v, mask, scale=0.2)
  chex.assert_trees_all_close(jax.jit(fn)(q, k, v), reference(q, k, v, mask, 0.2), **TOL)
  _grads_match(fn, q, k, v, mask, 0.2)


def test_static_sliding_window_self_attention_matches_reference():
  """A concrete sliding window over the call's own chunks (formerly refused) now runs exactly."""
  q, k, v = rand_qkv(10, 1, S, 2, 1, D)
  mask = ChunkMask(window_ranges(2), q_block=QB)
  chex.assert_trees_all_close(splash_attention(q, k, v, mask, scale=0.125),
                              reference(q, k, v, mask, 0.125), **TOL)


def test_velocity_of_row_with_splash_matches_flash():
  """velocity_of_row promises causal segments; under jit (traced ranges) splash runs the
  packed-row self-attention and agrees with flash."""
  from flax import nnx
  from magi_jax.configs import tiny_config
  from magi_jax.convert.load import random_module
  from magi_jax.models.dit import VideoDiT
  from magi_jax.diffusion.conditioning import Conditioning
  from magi_jax.train.objective import Objective, TrainModel, velocity_of_row
  chunk_width, L, C = 1, 8, 32
  cfg = tiny_config(num_layers=1, hidden_size=64, ffn_hidden_size=128, caption_channels=C,
                    caption_max_length=L, in_channels=4, out_channels=4).model
  model = TrainModel(random_module(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0)), 0))
  rng = np.random.default_rng(0)
  seg = jnp.asarray([[1, 1, 2, 0]], jnp.int32)
  N, K = seg.shape
  batch = {"x1": jnp.asarray(rng.normal(size=(N, 4, K * chunk_width, 4, 4)), jnp.float32),
           "segment_ids": seg,
           "text_emb": jnp.asarray(rng.normal(size=(N, K, L, C)), jnp.float32),
           "text_mask": jnp.ones((N, K, L), jnp.float32)}
  t = jnp.asarray([[0.9, 0.5, 0.3, 0.0]], jnp.float32)
  cond = Conditioning(t=t, clean=jnp.zeros((N, K), bool), text_drop=jnp.zeros((N, K), bool),
                      frame_t=t, frame_weight=jnp.ones((N, K), jnp.float32))
  x0 = jnp.asarray(rng.normal(size=batch["x1"].shape), jnp.float32)
  graphdef, state = nnx.split(model)

  def run(backend):
    f = lambda s, b, x: velocity_of_row(nnx.merge(graphdef, s), b, cond, x,
                                        Objective(chunk_width=chunk_width, backend=backend))[0]
    return jax.jit(f)(state, batch, x0)

  chex.assert_trees_all_close(run("splash"), run("flash"), atol=2e-5, rtol=1e-5)
