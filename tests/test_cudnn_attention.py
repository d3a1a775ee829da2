"""The 'cudnn' backend's mask encodings (static slices, reversed segment keys, caption key
lengths), checked against the reference on CPU with XLA's implementation of the same
`jax.nn.dot_product_attention` call; what it refuses; and 'auto' choosing it for GPU targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax.attention import ChunkMask, select_backend
from magi_jax.attention import cudnn
from magi_jax.attention.reference import reference_attention

QB = 12


def _qkv(seed, B, Sq, Sk, dtype=jnp.float32, Hq=4, Hkv=2, D=16):
  r = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(r.standard_normal(s).astype(np.float32)).astype(dtype)
  return mk(B, Sq, Hq, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, D)


def _check(mask, B, Sq, Sk, *, jit_ranges=False, atol=2e-5):
  q, k, v = _qkv(0, B, Sq, Sk)
  want = reference_attention(q, k, v, mask, scale=0.25)
  if jit_ranges:          # ranges traced, as in a training step
    fn = jax.jit(lambda q, k, v, r: cudnn.cudnn_attention(
        q, k, v, ChunkMask(r, mask.q_block, mask.layout), scale=0.25))
    got = fn(q, k, v, mask.kv_ranges)
  else:
    got = jax.jit(lambda q, k, v: cudnn.cudnn_attention(q, k, v, mask, scale=0.25))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol, rtol=atol)
  return got


@pytest.mark.parametrize("ranges,Sk", [
    ([[0, 12], [0, 24], [0, 36]], 36),            # block-causal, no cache
    ([[0, 12], [0, 24], [12, 36]], 36),           # window 2
    ([[0, 36], [12, 48]], 48),                    # two cached chunks + two current
    ([[0, 24], [0, 24], [12, 36]], 36),           # equal neighbours share one call
])
def test_static_ranges_match_reference(ranges, Sk):
  r = np.array([ranges], np.int32)
  assert cudnn.plan(ChunkMask(r, QB), r.shape[1] * QB, Sk) == "static"
  _check(ChunkMask(r, QB), 1, r.shape[1] * QB, Sk)


def test_traced_causal_segments_match_reference_values_and_grads():
  # Row 0: one video of 3 chunks; row 1: a 1-chunk video then a 2-chunk one.
  r = jnp.asarray(np.array([[[0, 12], [0, 24], [0, 36]], [[0, 12], [12, 24], [12, 36]]],
                           np.int32))
  mask = ChunkMask(r, QB, "causal_segments")
  _check(mask, 2, 36, 36, jit_ranges=True)
  q, k, v = _qkv(1, 2, 36, 36)
  w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape).astype(np.float32))

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, mask, scale=0.25) * w)
  want = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss(cudnn.cudnn_attention), argnums=(0, 1, 2)))(q, k, v)
  for g, e in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=5e-5, rtol=5e-5)


def test_caption_key_lengths_and_a_row_with_no_key():
  r = jnp.asarray(np.array([[[0, 7]], [[0, 0]], [[0, 13]]], np.int32))
  got = _check(ChunkMask(r, 9, "key_prefix"), 3, 9, 16, jit_ranges=True)
  assert np.all(np.asarray(got)[1] == 0.0)


def test_bf16_static_ranges_close_to_the_fp32_reference():
  r = np.array([[[0, 12], [0, 24]]], np.int32)
  mask = ChunkMask(r, QB)
  q, k, v = _qkv(3, 1, 24, 24, dtype=jnp.bfloat16)
  got = cudnn.cudnn_attention(q, k, v, mask, scale=0.25)
  want = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, scale=0.25)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=3e-2)


def test_general_traced_ranges_raise_instead_of_guessing():
  r = jnp.asarray(np.array([[[0, 12], [0, 24]]], np.int32))
  q, k, v = _qkv(0, 1, 24, 24)
  with pytest.raises(ValueError, match="layout 'general'"):
    jax.jit(lambda r: cudnn.cudnn_attention(q, k, v, ChunkMask(r, QB), scale=0.25))(r)
  # Concrete ranges that differ between rows are checked against the promised layout.
  bad = np.array([[[0, 12], [0, 12]], [[0, 12], [0, 24]]], np.int32)   # a chunk ends early
  with pytest.raises(ValueError, match="own end"):
    cudnn.plan(ChunkMask(bad, QB, "causal_segments"), 24, 24)
  with pytest.raises(ValueError, match="leave the 24 keys"):
    cudnn.plan(ChunkMask(np.array([[[0, 30]]], np.int32), 24), 24, 24)


def test_auto_picks_cudnn_only_for_gpu_targets_bf16_and_expressible_masks(monkeypatch):
  from magi_jax.parallel import rules
  static = ChunkMask(np.array([[[0, 12], [0, 24]]], np.int32), QB)
  general = ChunkMask(jnp.asarray(np.array([[[0, 12], [0, 24]]], np.int32)), QB)
  q16, k16, _ = _qkv(0, 1, 24, 24, dtype=jnp.bfloat16)
  q32, k32, _ = _qkv(0, 1, 24, 24)
  assert select_backend(q16, k16, static) == "flash"          # this CPU host
  monkeypatch.setattr(rules, "target_platform", lambda: "gpu")
  assert select_backend(q16, k16, static) == "cudnn"
  assert select_backend(q32, k32, static) == "flash"          # cuDNN has no fp32 flash path

  def traced(r):
    return jnp.zeros(()) if select_backend(
        q16, k16, ChunkMask(r, QB)) == "flash" else jnp.ones(())
  assert float(jax.jit(traced)(general.kv_ranges)) == 0.0     # traced general: flash


def test_the_trainers_packed_rows_with_padding_chunks_match_reference():
  """Ranges the trainer builds (`packed_kv_ranges`), padding chunks included, under jit: the
  promise 'causal_segments' holds and cudnn is exact."""
  from magi_jax.diffusion.segments import packed_kv_ranges
  seg = np.asarray([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]], np.int32)
  N, K = seg.shape
  tokens_per_chunk = 4
  mask = ChunkMask(jnp.asarray(packed_kv_ranges(seg, tokens_per_chunk), jnp.int32),
                   tokens_per_chunk, "causal_segments")
  _check(mask, N, K * tokens_per_chunk, K * tokens_per_chunk, jit_ranges=True)


def test_the_sampler_runs_on_cudnn_and_matches_the_reference_backend():
  """A tiny cfg-3 walk of 2 chunks (KV cache, refresh, per-chunk unconditional pass) with the cudnn
  backend (XLA's implementation on this host): every step's ranges are static, so every
  self-attention call takes the static-slice encoding, captions the key lengths."""
  from conftest import make_model
  from magi_jax.configs import tiny_config
  from magi_jax.diffusion import Sampler, SamplerOptions
  from test_sampler import HW, KEY, text_rows
  cfg = tiny_config()
  model = make_model()
  out = {}
  for b in ("reference", "cudnn"):
    s = Sampler(model, cfg, options=SamplerOptions(backend=b))
    out[b] = [np.asarray(c.latent) for c in s.sample(text_rows(2), latent_hw=HW, num_chunks=2,
                                                      key=KEY)]
  for got, want in zip(out["cudnn"], out["reference"]):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
