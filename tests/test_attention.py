"""The attention entry point: mask semantics, the reference backend against an independent
numpy implementation, GQA/MQA, and agreement (values and gradients) between the backends."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax.attention import ChunkMask, attention, backends, caption_ranges, dense_mask

BACKENDS = ("reference", "dot_product", "blockwise")

# One compiled program per call shape is much cheaper than running op by op.
attn = jax.jit(attention, static_argnames=("scale", "backend"))


# ---------------------------------------------------------------------------------------------
# Independent numpy references (plain loops, float64).

def np_mask(kv_ranges, q_block, num_keys):
  """(B, Sq, Sk) bool: query s of row b sees key k iff lo <= k < hi of its block."""
  kv_ranges = np.asarray(kv_ranges)
  B, nq, _ = kv_ranges.shape
  out = np.zeros((B, nq * q_block, num_keys), bool)
  for b in range(B):
    for i in range(nq):
      lo, hi = int(kv_ranges[b, i, 0]), int(kv_ranges[b, i, 1])
      for s in range(i * q_block, (i + 1) * q_block):
        for k in range(num_keys):
          out[b, s, k] = lo <= k < hi
  return out


def np_attention(q, k, v, allowed, scale):
  """Masked softmax attention in float64; query head h uses kv head h // (Hq // Hkv).

  Rows that see no key give zeros.
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, Sq, Hq, D = q.shape
  Sk, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  out = np.zeros((B, Sq, Hq, D))
  for b in range(B):
    for h in range(Hq):
      kh = h // G
      for s in range(Sq):
        keys = [j for j in range(Sk) if allowed[b, s, j]]
        if not keys:
          continue
        logits = np.array([np.dot(q[b, s, h], k[b, j, kh]) * scale for j in keys])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out[b, s, h] = sum(wi * v[b, j, kh] for wi, j in zip(w, keys))
  return out


def rand_qkv(seed, B, Sq, Sk, Hq, Hkv, D):
  r = np.random.default_rng(seed)
  q = r.standard_normal((B, Sq, Hq, D)).astype(np.float32)
  k = r.standard_normal((B, Sk, Hkv, D)).astype(np.float32)
  v = r.standard_normal((B, Sk, Hkv, D)).astype(np.float32)
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def block_causal(nq, bs, cache_blocks=0, window=None):
  """Block c of the current call (absolute block cache_blocks + c) sees blocks
  [max(0, c_abs + 1 - window), c_abs + 1), in key-token units."""
  rows = []
  for c in range(nq):
    ca = cache_blocks + c
    lo = 0 if window is None else max(0, ca + 1 - window)
    rows.append((lo * bs, (ca + 1) * bs))
  return np.array(rows, np.int32)


# ---------------------------------------------------------------------------------------------
# (a) dense_mask

def test_backends_are_registered():
  assert set(BACKENDS) <= set(backends())


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_mask_matches_loop_mask(seed):
  r = np.random.default_rng(seed)
  B, nq, qb, Sk = 3, 4, 5, 23
  lo = r.integers(0, Sk + 1, size=(B, nq))
  hi = r.integers(0, Sk + 1, size=(B, nq))
  ranges = np.stack([lo, hi], -1).astype(np.int32)
  ranges[0, 0] = (7, 7)         # empty range (lo == hi)
  ranges[1, 2] = (15, 3)        # empty range (lo > hi)
  ranges[2, 1] = (0, Sk)        # everything
  ranges[2, 3] = (0, 0)
  mask = ChunkMask(jnp.asarray(ranges), q_block=qb)
  got = dense_mask(mask, Sk)
  chex.assert_shape(got, (B, nq * qb, Sk))
  chex.assert_type(got, bool)
  want = np_mask(ranges, qb, Sk)
  np.testing.assert_array_equal(np.asarray(got), want)
  # The hand-set rows really are empty / full.
  assert not want[0, :qb].any() and not want[1, 2 * qb:3 * qb].any()
  assert want[2, qb:2 * qb].all()


def test_caption_ranges_are_prefixes():
  got = np.asarray(caption_ranges(jnp.array([3, 0, 64])))
  np.testing.assert_array_equal(got, [[[0, 3]], [[0, 0]], [[0, 64]]])


# ---------------------------------------------------------------------------------------------
# (b) reference backend against numpy

@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 16),     # GQA
                                      (4, 1, 16),     # MQA
                                      (2, 2, 24)])    # head_dim 24, MHA
def test_reference_matches_numpy(Hq, Hkv, D):
  B, qb, nq, Sk = 2, 4, 3, 16
  q, k, v = rand_qkv(Hq * 10 + Hkv + D, B, nq * qb, Sk, Hq, Hkv, D)
  ranges = np.array([[[0, 4], [0, 12], [5, 16]],            # causal-ish + unaligned window
                     [[2, 9], [0, 0], [0, 16]]], np.int32)   # one empty block
  scale = D ** -0.5
  out = attn(q, k, v, ChunkMask(jnp.asarray(ranges), qb), scale=scale, backend="reference")
  chex.assert_shape(out, (B, nq * qb, Hq, D))
  chex.assert_type(out, jnp.float32)
  want = np_attention(q, k, v, np_mask(ranges, qb, Sk), scale)
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
  assert np.all(np.asarray(out)[1, qb:2 * qb] == 0)


def test_reference_gqa_head_mapping_is_grouped_not_strided():
  """Query head h must read kv head h // (Hq // Hkv): make kv head 1 huge and check which
  query heads see it."""
  B, Sq, Sk, D = 1, 4, 4, 8
  q, k, v = rand_qkv(3, B, Sq, Sk, 4, 2, D)
  v = v.at[:, :, 1].set(1000.0)
  out = np.asarray(attn(q, k, v, ChunkMask(jnp.array([[[0, Sk]]]), Sq), scale=D ** -0.5))
  assert np.all(np.abs(out[0, :, :2]) < 100)          # heads 0, 1 -> kv head 0
  np.testing.assert_allclose(out[0, :, 2:], 1000.0, rtol=1e-6)   # heads 2, 3 -> kv head 1


# ---------------------------------------------------------------------------------------------
# (c) GQA == MHA with repeated kv heads

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_equals_mha_with_repeated_kv(backend, Hkv):
  Hq, D, qb, nq = 4, 16, 4, 3
  q, k, v = rand_qkv(7 + Hkv, 2, nq * qb, nq * qb, Hq, Hkv, D)
  mask = ChunkMask(jnp.asarray(np.stack([block_causal(nq, qb)] * 2)), qb)
  gqa = attn(q, k, v, mask, scale=0.3, backend=backend)
  G = Hq // Hkv
  mha = attn(q, jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2), mask, scale=0.3,
                  backend=backend)
  chex.assert_trees_all_close(gqa, mha, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# (d) backends agree

def _cases():
  qb = 8
  cases = {}
  # Block-causal self-attention over 4 chunks.
  cases["block_causal"] = (np.stack([block_causal(4, qb)] * 2), 4 * qb, qb, 2)
  # kv-range window 2 after a 2-chunk cache: keys = [cache(2); current(3)].
  cases["window_with_cache"] = (np.stack([block_causal(3, qb, cache_blocks=2, window=2)] * 2),
                                5 * qb, qb, 2)
  # Caption style: each row is one chunk; row 1 has no valid caption token.
  cases["caption"] = (np.asarray(caption_ranges(jnp.array([5, 0, 13, 1]))), 16, qb, 4)
  # Packed two-segment sequence: segment A = blocks 0-1, segment B = blocks 2-3.
  packed = np.array([[0, 8], [0, 16], [16, 24], [16, 32]], np.int32)
  cases["packed"] = (np.stack([packed, block_causal(4, qb)]), 4 * qb, qb, 2)
  # Ranges that do not fall on block boundaries, and a key count that is not a block multiple.
  cases["unaligned"] = (np.array([[[3, 21], [0, 30], [29, 30]]], np.int32), 30, qb, 1)
  # All of it at once: skipped key blocks, an empty block, unaligned ranges, padded keys.
  cases["mixed"] = (np.array([[[0, 8], [0, 16], [3, 21]],
                              [[0, 0], [8, 16], [5, 30]]], np.int32), 30, qb, 2)
  return cases


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_backends_agree(name):
  ranges, Sk, qb, B = CASES[name]
  nq = ranges.shape[1]
  q, k, v = rand_qkv(len(name), B, nq * qb, Sk, 4, 2, 24)
  mask = ChunkMask(jnp.asarray(ranges, jnp.int32), qb)
  scale = 24 ** -0.5
  outs = {b: attn(q, k, v, mask, scale=scale, backend=b) for b in BACKENDS}
  want = np_attention(q, k, v, np_mask(ranges, qb, Sk), scale)
  for b, o in outs.items():
    chex.assert_shape(o, q.shape)
    chex.assert_type(o, jnp.float32)
    assert np.all(np.isfinite(np.asarray(o))), b
    chex.assert_trees_all_close(o, outs["reference"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(o), want, atol=2e-5, rtol=2e-5, err_msg=b)
  if name == "caption":
    for b, o in outs.items():
      assert np.all(np.asarray(o)[1] == 0.0), f"{b}: a row with no valid key must give exact 0"


# ---------------------------------------------------------------------------------------------
# (e) gradients

@pytest.mark.parametrize("name", ["mixed", "caption"])
def test_blockwise_gradients_match_reference(name):
  ranges, Sk, qb, B = CASES[name]
  nq = ranges.shape[1]
  q, k, v = rand_qkv(100 + len(name), B, nq * qb, Sk, 4, 2, 16)
  w = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape).astype(np.float32))
  mask = ChunkMask(jnp.asarray(ranges, jnp.int32), qb)

  def loss(backend):
    def f(q, k, v):
      o = attention(q, k, v, mask, scale=0.25, backend=backend)
      return jnp.sum(o) + jnp.sum(o * w)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

  g_ref = loss("reference")(q, k, v)
  g_blk = loss("blockwise")(q, k, v)
  for g in g_blk:
    assert np.all(np.isfinite(np.asarray(g)))
  chex.assert_trees_all_close(g_blk, g_ref, atol=1e-5, rtol=1e-5)
  # The gradients are not trivially zero.
  assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in g_ref)


# ---------------------------------------------------------------------------------------------
# (f) errors

def test_unknown_backend_raises():
  q, k, v = rand_qkv(0, 1, 4, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="unknown attention backend"):
    attention(q, k, v, ChunkMask(jnp.array([[[0, 4]]]), 4), scale=1.0, backend="nope")


def test_mismatched_head_counts_raise():
  q, k, v = rand_qkv(0, 1, 4, 4, 3, 2, 8)
  with pytest.raises(ValueError, match="not a multiple"):
    attention(q, k, v, ChunkMask(jnp.array([[[0, 4]]]), 4), scale=1.0)


def test_mismatched_k_v_shapes_raise():
  q, k, v = rand_qkv(0, 1, 4, 4, 2, 2, 8)
  with pytest.raises(ValueError):
    attention(q, k, v[:, :3], ChunkMask(jnp.array([[[0, 4]]]), 4), scale=1.0)


def test_mask_not_covering_queries_raises():
  q, k, v = rand_qkv(0, 1, 6, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="queries"):
    attention(q, k, v, ChunkMask(jnp.array([[[0, 4]]]), 4), scale=1.0)
