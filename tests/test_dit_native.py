"""The core DiT's JAX-native call and the one kv-range builder.

The core takes a `ChunkMask` of ranges inside each element's own [cache; current] keys, the
call's first chunk for RoPE and an explicit null-caption row; the official call format is the
adapter in magi_jax/official/forward.py (its parity with the official code is checked by
test_parity_command.py). Here: the builder's window rule (width None, 0 and a segment floor),
that streaming a chunk against a bounded cache in the native format equals the full call, the
null-row choice, and the native input errors.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_model
from magi_jax.attention import ChunkMask, chunk_kv_ranges
from magi_jax.configs import ConfigError, tiny_config
from magi_jax.diffusion.window import call_ranges, call_widths, plan_steps
from magi_jax.models import InputError, KVCache

CHUNK_WIDTH, L, C_CAP = 2, 64, 32
TOKENS_PER_CHUNK = CHUNK_WIDTH * 4 * 4    # tokens per chunk at 8x8 latents


@pytest.fixture(scope="module")
def model():
  return make_model()


def inputs(seed, chunks=3):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.standard_normal((1, 16, chunks * CHUNK_WIDTH, 8, 8)), jnp.float32)
  t = jnp.asarray(r.uniform(0.1, 0.9, (1, chunks)), jnp.float32)
  y = jnp.asarray(r.standard_normal((chunks, L, C_CAP)), jnp.float32)
  m = jnp.asarray(np.arange(L)[None] < r.integers(1, L, chunks)[:, None], jnp.int32)
  return x, t, y, m


# ---------------------------------------------------------------------------- the builder

def test_the_window_rule():
  # Chunk c with width r sees [max(0, c + 1 - r), c + 1); None is every earlier chunk.
  np.testing.assert_array_equal(chunk_kv_ranges([0, 1, 2, 3], widths=[2, 2, None, 1]),
                                [[0, 1], [0, 2], [0, 3], [3, 4]])
  # Relative to the first chunk the keys hold, in tokens.
  np.testing.assert_array_equal(chunk_kv_ranges([5, 6], widths=[3, 3], cache_start=3,
                                                tokens_per_chunk=10),
                                [[0, 30], [10, 40]])
  # Packed videos: never before the chunk's own video.
  np.testing.assert_array_equal(
      chunk_kv_ranges(np.arange(5), widths=[9] * 5, segment_starts=[0, 0, 2, 2, 4]),
      [[0, 1], [0, 2], [2, 3], [2, 4], [4, 5]])
  # Traced segment layouts (the trainer's) give the same numbers.
  got = jax.jit(lambda s: chunk_kv_ranges(jnp.arange(5), segment_starts=s))(
      jnp.array([0, 0, 2, 2, 4]))
  np.testing.assert_array_equal(got, [[0, 1], [0, 2], [2, 3], [2, 4], [4, 5]])


@pytest.mark.parametrize("width", [0, -1, -3, True])
def test_a_width_below_one_is_refused_not_read_as_every_chunk(width):
  with pytest.raises(ValueError, match=r"widths must be >= 1 .* or None"):
    chunk_kv_ranges([2], widths=[width])


def test_the_config_minus_one_means_every_earlier_chunk_and_zero_is_refused():
  rt = tiny_config().runtime
  plan = next(p for p in plan_steps(4, 0, rt.window_size, rt.num_steps) if p.refresh)
  widths = call_widths(plan, rt.num_steps, rt.noise2clean_kvrange, -1)
  assert widths[0] is None
  absolute, need = call_ranges(plan, widths, 1)
  assert absolute[0, 0] == 0 and need == plan.slice_point
  with pytest.raises(ConfigError, match="clean_chunk_kvrange must be -1"):
    tiny_config().replace(runtime={"clean_chunk_kvrange": 0})


# ---------------------------------------------------------------------------- the core call

def test_streaming_against_a_bounded_cache_equals_the_full_call(model):
  """Chunk 2 with width 2 after a cache of chunk 1 only (native ranges, first_chunk 2) equals
  chunk 2 of the full three-chunk call."""
  x, t, y, m = inputs(0)
  full_ranges = chunk_kv_ranges(range(3), widths=[2, 2, 2], tokens_per_chunk=TOKENS_PER_CHUNK)
  full = model(x, t, y, m, ChunkMask(full_ranges[None], q_block=TOKENS_PER_CHUNK), return_kv=True)
  cache = KVCache(full.kv.k[:, :, TOKENS_PER_CHUNK:2 * TOKENS_PER_CHUNK],
                  full.kv.v[:, :, TOKENS_PER_CHUNK:2 * TOKENS_PER_CHUNK])
  one = chunk_kv_ranges([2], widths=[2], cache_start=1, tokens_per_chunk=TOKENS_PER_CHUNK)
  np.testing.assert_array_equal(one, [[0, 2 * TOKENS_PER_CHUNK]])
  out = model(x[:, :, 2 * CHUNK_WIDTH:], t[:, 2:], y[2:], m[2:],
              ChunkMask(one[None], q_block=TOKENS_PER_CHUNK), first_chunk=2, cache=cache)
  chex.assert_trees_all_close(out.velocity, full.velocity[:, :, 2 * CHUNK_WIDTH:], atol=1e-5,
                              rtol=1e-5)
  # RoPE time really follows first_chunk: the same call placed at chunk 0 differs.
  moved = model(x[:, :, 2 * CHUNK_WIDTH:], t[:, 2:], y[2:], m[2:],
                ChunkMask(one[None], q_block=TOKENS_PER_CHUNK), first_chunk=0, cache=cache)
  assert not np.allclose(moved.velocity, out.velocity, atol=1e-4)


def test_caption_dropped_selects_the_second_null_row(model):
  """adaLN reads null_caption_embedding row -2 for caption_dropped=False and row -1 for True:
  changing row -1 changes only the dropped call."""
  import copy
  x, t, y, m = inputs(1, chunks=1)
  mask = ChunkMask(np.array([[[0, TOKENS_PER_CHUNK]]], np.int32), q_block=TOKENS_PER_CHUNK)
  other = copy.deepcopy(model)
  null = other.y_embedder.null_caption_embedding
  null[...] = null[...].at[-1].add(0.5)
  for dropped, changes in ((False, False), (True, True)):
    a = model(x, t, y, m, mask, caption_dropped=jnp.array([dropped])).velocity
    b = other(x, t, y, m, mask, caption_dropped=jnp.array([dropped])).velocity
    assert (not np.allclose(a, b, atol=1e-6)) == changes, dropped


def test_native_input_errors(model):
  x, t, y, m = inputs(2)
  good = ChunkMask(chunk_kv_ranges(range(3), tokens_per_chunk=TOKENS_PER_CHUNK)[None],
                   q_block=TOKENS_PER_CHUNK)
  with pytest.raises(InputError, match="self_mask must be a ChunkMask"):
    model(x, t, y, m, np.zeros((1, 3, 2), np.int32))
  with pytest.raises(InputError, match=r"\(N, chunks, 2\) = \(1, 3, 2\).*q_block 16"):
    model(x, t, y, m, ChunkMask(good.kv_ranges, q_block=16))
  with pytest.raises(InputError, match="outside"):
    model(x, t, y, m, ChunkMask(good.kv_ranges + TOKENS_PER_CHUNK, q_block=TOKENS_PER_CHUNK))
  with pytest.raises(InputError, match="captions must be"):
    model(x, t, y[:, None], m, good)
  with pytest.raises(InputError, match="caption_mask"):
    model(x, t, y, m[:, :10], good)
  with pytest.raises(InputError, match="caption_dropped"):
    model(x, t, y, m, good, caption_dropped=jnp.array([True, False, True, False]))
