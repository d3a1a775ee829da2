"""The 'flash' backend: tiles smaller than a chunk (and not dividing it), padding, every MAGI
mask, values and gradients against the reference; memory that does not grow with the chunk;
and the 'auto' choice on CPU."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax.attention import ChunkMask, attention, select_backend
from magi_jax.attention.flash import flash_attention
from magi_jax.attention.reference import reference_attention

QB = 20        # tokens per chunk; tiles of 8 x 12 cut chunks mid-way and need padding


def _ranges(rows):
  return jnp.asarray(np.array(rows, np.int32))


# name -> (kv_ranges (B, nq, 2), Sk)
MASKS = {
    "block_causal": (_ranges([[[0, 20], [0, 40], [0, 60]]]), 60),
    "window_2": (_ranges([[[0, 20], [0, 40], [20, 60]]]), 60),
    "kv_cache": (_ranges([[[0, 60], [20, 80]]]), 80),              # 2 cached chunks + 2 current
    "packed": (_ranges([[[0, 20], [0, 40], [40, 60]], [[0, 20], [20, 40], [20, 60]]]), 60),
    "caption": (_ranges([[[0, 7]], [[0, 0]], [[0, 13]]]), 16),     # a row that sees nothing
}


def _qkv(seed, B, Sq, Sk, Hq=4, Hkv=2, D=16, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(r.standard_normal(s).astype(np.float32)).astype(dtype)
  return mk(B, Sq, Hq, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, D)


def _case(name):
  ranges, Sk = MASKS[name]
  qb = QB if name != "caption" else 9
  return ChunkMask(ranges, qb), ranges.shape[0], ranges.shape[1] * qb, Sk


@pytest.mark.parametrize("name", sorted(MASKS))
def test_small_tiles_match_reference(name):
  mask, B, Sq, Sk = _case(name)
  q, k, v = _qkv(1, B, Sq, Sk)
  want = reference_attention(q, k, v, mask, scale=0.3)
  got = jax.jit(lambda q, k, v: flash_attention(q, k, v, mask, scale=0.3, block_q=8,
                                                block_k=12))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  if name == "caption":
    assert np.all(np.asarray(got)[1] == 0.0)


@pytest.mark.parametrize("name", ["window_2", "kv_cache", "packed", "caption"])
def test_small_tiles_gradients_match_reference(name):
  mask, B, Sq, Sk = _case(name)
  q, k, v = _qkv(2, B, Sq, Sk)
  w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape).astype(np.float32))

  def grads(fn):
    f = lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

  g_ref = grads(lambda q, k, v: reference_attention(q, k, v, mask, scale=0.3))
  g_fl = grads(lambda q, k, v: flash_attention(q, k, v, mask, scale=0.3, block_q=8, block_k=12))
  chex.assert_trees_all_close(g_fl, g_ref, atol=2e-5, rtol=2e-5)
  assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in g_ref)


def test_bf16_close_to_reference():
  mask, B, Sq, Sk = _case("kv_cache")
  q, k, v = _qkv(4, B, Sq, Sk, dtype=jnp.bfloat16)
  want = reference_attention(q, k, v, mask, scale=0.3).astype(jnp.float32)
  got = flash_attention(q, k, v, mask, scale=0.3, block_q=8, block_k=12)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want), atol=3e-2)


def _grad_temp_bytes(backend, S, chunk, H=2, D=32):
  """XLA's temporaries for d(sum(attention))/d(q, k, v) of one block-causal row."""
  n = S // chunk
  ranges = np.stack([np.zeros(n), (np.arange(n) + 1) * chunk], -1)[None].astype(np.int32)
  mask = ChunkMask(jnp.asarray(ranges), chunk)
  f = lambda q, k, v: jnp.sum(attention(q, k, v, mask, scale=0.1, backend=backend))
  sds = [jax.ShapeDtypeStruct((1, S, H, D), jnp.float32)] * 3
  compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*sds).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_memory_is_set_by_tiles_not_by_chunks():
  S = 4096
  score_tile = 2 * S * S * 4                       # one (heads x chunk x chunk) f32 tile
  one_chunk = _grad_temp_bytes("flash", S, chunk=S)
  four_chunks = _grad_temp_bytes("flash", S, chunk=S // 4)
  reference = _grad_temp_bytes("reference", S, chunk=S)
  # A few 512 x 512 tiles (the masked and the mask-free tile branches each hold one score
  # tile): about 16 MiB here, against 128 MiB for one chunk-sized score tile.
  assert one_chunk < score_tile / 6, (one_chunk, score_tile)
  assert one_chunk < 2 * four_chunks + 2 ** 20     # a whole-video chunk costs no more
  assert reference > 4 * one_chunk                 # the dense yardstick holds S x S scores


def test_auto_picks_flash_on_cpu_and_for_caches():
  mask, B, Sq, Sk = _case("kv_cache")
  q, k, v = _qkv(5, B, Sq, Sk)
  assert select_backend(q, k, mask) == "flash"
  got = attention(q, k, v, mask, scale=0.3)        # 'auto' is the default
  want = reference_attention(q, k, v, mask, scale=0.3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_blockwise_is_the_flash_backend():
  from magi_jax.attention import get_backend
  assert get_backend("blockwise") is get_backend("flash") is flash_attention
