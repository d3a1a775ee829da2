"""Splash-attention backend: its mask decomposition (static block-causal mask + segment ids
from kv_ranges) against `dense_mask`, the kernel against `reference_attention` (values and
gradients; Pallas interpreter off TPU), and the ValueErrors for masks it cannot express.

Tolerance: float32 1e-5. The kernel computes the same float32 sums as the reference but in a
different order (online softmax over 128-wide key blocks, q pre-multiplied by the scale), so it
agrees to float32 rounding (observed max |diff| ~6e-7 for values, ~1e-6 for gradients), not
bit for bit.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax.attention import ChunkMask, block_causal_chunk_ranges, dense_mask
from magi_jax.attention.reference import reference_attention
from magi_jax.parallel.splash import (BlockCausalMask, check_supported, effective_mask,
                                      segment_ids, splash_attention)

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


# One compiled program per shape; kv_ranges are traced (the jit contract of the module).
@jax.jit
def splash_jit(q, k, v, kv_ranges):
  return splash_attention(q, k, v, ChunkMask(kv_ranges, q_block=QB), scale=q.shape[-1] ** -0.5)


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
  from magi_jax.train.segments import segment_layout
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]], jnp.int32)   # 0 = padding chunk
  _, start, _ = segment_layout(seg)
  mask = ChunkMask(ranges(3, np.asarray(start)), q_block=3)
  s = 3 * 6
  check_supported(mask, s, s)
  np.testing.assert_array_equal(np.asarray(effective_mask(mask)), np.asarray(dense_mask(mask, s)))


# ---------------------------------------------------------------------------------------------
# Unsupported masks.

def test_sliding_window_raises():
  r = block_causal_chunk_ranges(0, N_CHUNKS, [2] * N_CHUNKS) * QB       # chunk c sees c-1, c
  mask = ChunkMask(jnp.asarray(r[None], jnp.int32), q_block=QB)
  q, k, v = rand_qkv(0, 1, S, 2, 2, D)
  with pytest.raises(ValueError, match="sliding-window"):
    splash_attention(q, k, v, mask, scale=0.125)


def test_kv_cache_raises():
  q, _, _ = rand_qkv(0, 1, S, 2, 2, D)
  _, k, v = rand_qkv(1, 1, S + QB, 2, 2, D)
  mask = ChunkMask(ranges(QB, BLOCK_CAUSAL) + QB, q_block=QB)
  with pytest.raises(ValueError, match=r"Sk == Sq"):
    splash_attention(q, k, v, mask, scale=0.125)


@pytest.mark.parametrize("bad,match", [
    ([[0, 2 * QB], [0, 2 * QB]], "past its own chunk"),                   # non-causal
    ([[0, QB], [0, QB]], "whole of its own chunk"),                       # chunk 1 misses itself
    ([[QB // 2, QB], [QB // 2, 2 * QB]], "neither a segment start"),      # start mid-chunk
])
def test_other_unsupported_ranges_raise(bad, match):
  mask = ChunkMask(jnp.asarray([bad], jnp.int32), q_block=QB)
  with pytest.raises(ValueError, match=match):
    check_supported(mask, 2 * QB, 2 * QB)


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
