"""Behaviour of the autoregressive sampler (official inference/pipeline/video_generate.py): the f32
timestep schedule, the window plan against the official fixture's call metadata, jit reuse, the
bounded KV cache, streaming, causality, PRNG determinism, I2V / V2V prefixes, input errors and
per-chunk text.

Every expected value comes from the official code, from its fixture, or is derived by hand in
a comment; nothing is compared with numbers this code produced earlier. The tiny model runs
with the tiny runtime (window 2, 6 steps, chunk width 2, kv ranges [3, 2]) at 4x4 latents.
One Sampler is shared by the whole module, so its six step functions compile once.
"""

import copy
import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, make_model
from magi_jax.configs import tiny_config
from magi_jax.models import KVCacheStore
from magi_jax.official.parity import fixtures
from magi_jax.diffusion import (Sampler, SamplerError, SamplerOptions, distill_intervals,
                               guidance_bucket, nearly_clean, plan_steps, timesteps)
from magi_jax.diffusion import sampler as sampler_module
from magi_jax.diffusion.window import cache_chunks_needed, call_ranges, call_widths
from magi_jax.text import ChunkTextRows, TextFlags

F32 = np.float32
CFG = tiny_config()
RT = CFG.runtime
CHUNK_WIDTH, W, STEPS = RT.chunk_width, RT.window_size, RT.num_steps   # 2, 2, 6
DSPS = STEPS // W                                                      # 3
C_LAT, L, C_CAP = 16, 64, 32        # latent channels, caption length / channels (tiny model)
HW = (4, 4)                          # latent size: 2x2 patches per frame
TOKENS_PER_CHUNK = CHUNK_WIDTH * (HW[0] // 2) * (HW[1] // 2)           # 8 tokens per chunk
KEY = jax.random.key(7)

# The official 6-step schedule, as f32 literals.
T6 = np.array([0, 0.009433963, 0.040000007, 0.10000001, 0.21052627, 0.4310345, 1.0000001], F32)


def test_tiny_runtime_is_what_this_file_assumes():
  assert (CHUNK_WIDTH, W, STEPS, RT.noise2clean_kvrange, RT.clean_chunk_kvrange,
          RT.cfg_number) == (2, 2, 6, (3, 2), 1, 3)


# ---------------------------------------------------------------------------------------------
# helpers

def text_rows(n, *, prompts=1, prompt_of_chunk=None, clean=0, seed=0):
  """ChunkTextRows with random prompt rows (13 valid tokens) and a fixed random null caption."""
  r = np.random.default_rng(seed)
  embs = r.standard_normal((prompts, L, C_CAP)).astype(F32)
  masks = np.repeat((np.arange(L) < 13)[None], prompts, 0).astype(F32)
  null = np.random.default_rng(1234).standard_normal((L, C_CAP)).astype(F32)
  return ChunkTextRows(embs, masks, null, infer_chunk_num=n, clean_chunk_num=clean,
                       flags=TextFlags.none(), prompt_of_chunk=prompt_of_chunk)


def gaussian(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(F32)


def run(sampler, n, *, text=None, key=KEY, clean=0, on_call=None, **kw):
  """All emitted chunks, the call records, and how many calls had run at each yield."""
  records, seen, chunks = [], [], []
  text = text_rows(n, clean=clean) if text is None else text

  def record(r):
    records.append(r)
    if on_call is not None:
      on_call(r)

  for ch in sampler.sample(text, latent_hw=HW, num_chunks=n, key=key, on_call=record, **kw):
    seen.append(len(records))
    chunks.append(ch)
  return chunks, records, seen


def frames(a, c):
  return np.asarray(a)[:, :, c * CHUNK_WIDTH:(c + 1) * CHUNK_WIDTH]


def check_chunk(ch, n_frames):
  chex.assert_shape(ch.latent, (1, C_LAT, n_frames) + HW)
  chex.assert_type(ch.latent, jnp.float32)
  assert np.all(np.isfinite(np.asarray(ch.latent)))


@pytest.fixture(scope="module")
def sampler():
  return Sampler(make_model(), CFG, options=SamplerOptions(backend="reference"))


@pytest.fixture(scope="module")
def fixture_calls():
  d, meta = fixtures.tensors(FIXTURES, "dit_sample_cfg3.safetensors")
  calls = meta["calls"]
  if isinstance(calls, str):            # the metadata value is a JSON list
    calls = json.loads(calls)
  assert len(calls) == int(meta["num_calls"]) == 12
  return d, calls


# ---------------------------------------------------------------------------------------------
# (1) schedule

def test_schedule_6_steps_bit_exact():
  t = timesteps(6)
  assert t.dtype == np.float32
  np.testing.assert_array_equal(t, T6)


def test_schedule_64_steps_spec_entries():
  t = timesteps(64)
  assert t.shape == (65,) and t.dtype == np.float32
  np.testing.assert_allclose(t[16], 0.0217391, rtol=1e-5)
  assert t[32] == F32(0.10000001) and t[32] > F32(0.1)     # one ulp above f32(0.1)
  assert t[48] == F32(0.3)
  np.testing.assert_allclose(t[63], 0.912414, rtol=1e-5)
  assert t[64] == F32(1.0000001) and t[64] > F32(1.0)
  assert t[0] == 0 and np.all(np.diff(t) > 0)


def test_schedule_16_steps_spec_list():
  want = [0, .001305, .005263, .012, .021739, .034819, .051724, .073134, .1, .133663, .176056,
          .230038, .3, .393023, .521277, .707547, 1]
  np.testing.assert_allclose(timesteps(16), want, atol=1e-6)


def test_schedule_12_step_shortcut_grids():
  a = [0, 0.0052631581, 0.012, 0.021739131, 0.05172414, 0.073134333, 0.10000001, 0.17605636,
       0.23003805, 0.30000001, 0.52127665, 0.70754719, 1.0000001]
  b = [0, 0.001305483, 0.0052631581, 0.021739131, 0.034818944, 0.05172414, 0.10000001,
       0.13366337, 0.17605636, 0.30000001, 0.39302328, 0.52127665, 1.0000001]
  np.testing.assert_array_equal(timesteps(12, "8,16,16"), np.array(a, F32))
  np.testing.assert_array_equal(timesteps(12, "16,16,8"), np.array(b, F32))
  np.testing.assert_array_equal(timesteps(12), np.array(a, F32))      # default mode


def test_nearly_clean_threshold_at_f32_point_3():
  t48 = timesteps(64)[48]
  assert nearly_clean(t48, 0.3)                 # f32(0.3) = 0.3000000119 > 0.3 (double)
  # The same entry computed in float64 (u = 0.75: u^2 / (3 - 2u^2)) is exactly 0.3 and fails.
  u = 0.75
  t64 = (u * u) / (3 - 2 * u * u)
  assert t64 == 0.3 and not (t64 > 0.3)
  # One f32 ulp below the entry is not nearly clean; the 6-step entries: only t[5] = 0.431 is.
  assert not nearly_clean(np.nextafter(F32(0.3), F32(0)), 0.3)
  assert [nearly_clean(t, 0.3) for t in T6[:6]] == [False] * 5 + [True]


def test_guidance_bucket_edges():
  r = RT.cfg_t_range
  assert r == (0.0, 0.0217, 0.1, 0.3, 0.999)
  assert guidance_bucket(F32(0.3), r) == 3      # exactly at an edge: the upper bucket
  assert guidance_bucket(timesteps(64)[48], r) == 3
  assert guidance_bucket(F32(0.29), r) == 2
  assert guidance_bucket(F32(0.0), r) == 0
  assert guidance_bucket(timesteps(64)[32], r) == 2    # 0.10000001
  assert guidance_bucket(F32(0.0217), r) == 1
  assert guidance_bucket(F32(1.0000001), r) == 4
  # 64 steps, released config: the bucket equals the window slot σ // 16 (as the official).
  t = timesteps(64)
  assert [guidance_bucket(t[s], r) for s in range(64)] == [s // 16 for s in range(64)]


def test_distill_intervals():
  assert distill_intervals(12).tolist() == [2, 1, 1] * 4
  assert distill_intervals(12, "16,16,8").tolist() == [1, 1, 2] * 4
  assert distill_intervals(64).tolist() == [1] * 64
  assert distill_intervals(6).tolist() == [2, 1, 1] * 2


# ---------------------------------------------------------------------------------------------
# (2) window plan

def test_plan_matches_official_call_metadata(fixture_calls):
  """3 chunks, window 2, 6 steps: slice point, chunks per call, refresh, distill interval,
  nearly-clean flag, t-list and kv ranges equal the official dispatcher's, call by call."""
  d, calls = fixture_calls
  plans = plan_steps(3, 0, 2, 6)
  ts = timesteps(6)
  tokens_per_chunk = 2 * 4 * 4           # the fixture's 8x8 latents
  assert len(plans) == len(calls)
  for i, (p, c) in enumerate(zip(plans, calls)):
    got = (p.slice_point, len(p.chunks), p.refresh)
    want = (c["slice_point"], c["range_num"] - c["slice_point"], c["fwd_extra_1st_chunk"])
    assert got == want, (i, got, want)
    assert c["denoising_range_num"] == len(p.chunks)
    assert distill_intervals(6)[p.idx] == c["distill_interval"], i
    assert nearly_clean(ts[p.step_indices[0]], 0.3) == c["distill_nearly_clean_chunk"], i
    t = np.concatenate([[F32(0.9999)] * p.refresh, ts[list(p.step_indices)]]).astype(F32)
    np.testing.assert_array_equal(t, d[f"call{i:02d}.timestep"][0])
    ranges, _ = call_ranges(p, call_widths(p, 6, (3, 2), 1), tokens_per_chunk)
    np.testing.assert_array_equal(ranges, d[f"call{i:02d}.kv_range"])


# (chunks, clean chunks, window, steps) -> dsps·(n_chunks + W − 1 − n_clean) steps, by hand
PLAN_CASES = {(3, 0, 2, 6): 12, (5, 0, 4, 8): 16, (6, 2, 4, 64): 112, (7, 1, 3, 12): 32,
              (1, 0, 4, 4): 4, (4, 1, 2, 6): 12}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_plan_invariants(case):
  n, n_clean, window, steps = case
  plans = plan_steps(n, n_clean, window, steps)
  assert len(plans) == PLAN_CASES[case]
  sig = {c: [] for c in range(n)}
  calls_of = {c: [] for c in range(n)}
  emitted = []
  for k, p in enumerate(plans):
    assert p.step == k and p.idx == k % (steps // window)
    assert p.slice_point >= n_clean
    assert all(a > b for a, b in zip(p.step_indices, p.step_indices[1:]))   # strictly decreasing
    assert len(p.step_indices) == p.c1 - p.c0 <= window
    assert len(p.chunks) <= window + 1
    assert p.refresh == (p.c0 > n_clean and p.idx == 0)
    if p.refresh:
      assert emitted and emitted[-1] == p.c0 - 1          # the chunk that just finished
    for c, s in zip(range(p.c0, p.c1), p.step_indices):
      sig[c].append(s)
      calls_of[c].append(k)
    if p.emits is not None:
      assert p.emits == p.c0 and p.step_indices[0] == steps - 1
      emitted.append(p.emits)
  assert emitted == list(range(n_clean, n))
  for c in range(n_clean):
    assert sig[c] == []
  for c in range(n_clean, n):
    assert sig[c] == list(range(steps)), c               # σ = 0..steps-1, once each, in order
    assert calls_of[c] == list(range(calls_of[c][0], calls_of[c][0] + steps))   # consecutive


# ---------------------------------------------------------------------------------------------
# (3) compile count

# Distinct step functions for the tiny runtime (W = 2, dsps = 3, kv ranges [3, 2] by σ // 3,
# refresh range 1; cfg 3 so nearly_clean is always False). The compile key is (chunks in the
# call, refresh, cached chunks read); for stage i with N >= 3 chunks:
#   stage 0:              chunk 0 alone                                   -> (1, F, 0)
#   stage 1:              chunks 0,1 (σ 3+idx, idx), all ranges start at 0 -> (2, F, 0)
#   stage 2..N-1, idx 0:  refresh i-2 + chunks i-1, i; ranges start at i-2 -> (3, T, 0)
#                 idx 1-2: chunks i-1 (r 2), i (r 3): both start at i-2   -> (2, F, 1)
#   stage N, idx 0:       refresh N-2 + chunk N-1 (r 2), start N-2         -> (2, T, 0)
#            idx 1-2:     chunk N-1 (r 2): start N-2                       -> (1, F, 1)
# = 6, whatever N is. (V2V with one clean chunk reuses (1, F, 1) and (2, F, 1).)
MAX_COMPILES = 6


def test_compile_count_does_not_grow_with_length(sampler):
  chunks, records, _ = run(sampler, 6)
  assert len(records) == DSPS * (6 + W - 1)
  after6 = sampler.compilations()
  assert 1 <= after6 <= MAX_COMPILES
  chunks, records, _ = run(sampler, 10)
  assert len(records) == DSPS * (10 + W - 1)
  assert sampler.compilations() == after6


# ---------------------------------------------------------------------------------------------
# (4) bounded cache, constant memory

def test_cache_and_live_latents_are_bounded(sampler, monkeypatch):
  # Most cached chunks any call reads (tiny runtime): idx 1-2 calls of a stage read chunk i-2
  # only (the table above); refresh calls read nothing. So 1 chunk, for any length.
  for n in (4, 12):
    assert cache_chunks_needed(plan_steps(n, 0, W, STEPS), STEPS, RT.noise2clean_kvrange,
                               RT.clean_chunk_kvrange) == 1
  stores = []

  class RecordingStore(KVCacheStore):
    def write(self, slice_point, new):
      super().write(slice_point, new)
      stores.append((id(self), self.capacity_chunks, self.num_chunks, self.nbytes(), slice_point))

  monkeypatch.setattr(sampler_module, "KVCacheStore", RecordingStore)
  peak = {}
  for n in (4, 12):
    del stores[:]
    live, box = [], []                                      # box: this iteration's generator
    gen = sampler.sample(text_rows(n), latent_hw=HW, num_chunks=n, key=KEY,
                         on_call=lambda r, live=live, box=box: live.append(
                             (r.x.shape[2], len(box[0].gi_frame.f_locals["latents"]))))
    box.append(gen)
    out = list(gen)
    assert [c.index for c in out] == list(range(n))
    assert len({s[0] for s in stores}) == 1                 # one store per video
    assert all(cap == 1 and held <= 1 for _, cap, held, _, _ in stores)
    # Refreshes write chunks 0..n-2 in order, one per stage from stage 2 on.
    assert [s[4] for s in stores] == list(range(n - 1))
    peak[n] = max(s[3] for s in stores)
    # Live latents: the call's x is at most window + 1 chunks (refresh + window), and the
    # sampler holds at most window + 1 chunk latents at any call.
    assert max(w for w, _ in live) == (W + 1) * CHUNK_WIDTH
    assert max(k for _, k in live) <= W + 1
  assert peak[4] == peak[12] > 0


# ---------------------------------------------------------------------------------------------
# (5) streaming, call inputs, Euler update

@pytest.fixture(scope="module")
def t2v3(sampler):
  noise = gaussian((1, C_LAT, 3 * CHUNK_WIDTH) + HW, 11)
  chunks, records, seen = run(sampler, 3, key=None, noise=noise)
  return noise, chunks, records, seen


def test_streaming_yields_before_later_chunks_are_computed(sampler, t2v3):
  _, chunks, records, seen = t2v3
  assert len(records) == DSPS * (3 + W - 1) == 12
  # Chunk c enters at stage c (call 3c) and gets its 6 updates in the next 6 calls, so it is
  # yielded when exactly 3c + 6 calls have run: chunk 0 after 6 of the 12.
  assert seen == [DSPS * c + STEPS for c in range(3)]
  assert seen[0] < len(records)
  assert [(c.index, c.start) for c in chunks] == [(0, 0), (1, 2), (2, 4)]
  for c in chunks:
    check_chunk(c, CHUNK_WIDTH)
  # Lazy: nothing runs until the first chunk is asked for.
  calls = []
  gen = sampler.sample(text_rows(5), latent_hw=HW, num_chunks=5, key=KEY, on_call=calls.append)
  assert calls == []
  first = next(gen)
  assert first.index == 0 and len(calls) == 6
  gen.close()


def test_call_inputs_match_official_t_and_kv_ranges(t2v3, fixture_calls):
  """The sampler's own calls (4x4 latents) carry the official t-lists bit for bit and the
  official kv ranges scaled from 32-token to 8-token chunks."""
  d, _ = fixture_calls
  _, _, records, _ = t2v3
  for i, r in enumerate(records):
    np.testing.assert_array_equal(r.t, d[f"call{i:02d}.timestep"][0])
    np.testing.assert_array_equal(r.kv_range * 4, d[f"call{i:02d}.kv_range"])
    assert r.x.shape[2] == len(r.plan.chunks) * CHUNK_WIDTH
    assert r.velocity.shape[2] == r.plan.num_denoised * CHUNK_WIDTH


def test_euler_updates_chain_from_call_to_call(t2v3):
  """x ← x + v·(t[σ+1] − t[σ]): each chunk's next input (or its emitted latent)
  is the previous input plus the guided velocity times the schedule step; the first
  input is the given noise; the refresh chunk's input is the emitted clean latent."""
  noise, chunks, records, _ = t2v3
  state = {}
  for r in records:
    p = r.plan
    if p.refresh:
      np.testing.assert_array_equal(frames(r.x, 0), np.asarray(chunks[p.slice_point].latent))
    for j, (c, s) in enumerate(zip(range(p.c0, p.c1), p.step_indices)):
      x = frames(r.x, j + int(p.refresh))
      if s == 0:
        np.testing.assert_array_equal(x, frames(noise, c))
      else:
        np.testing.assert_allclose(x, state[c], rtol=1e-6, atol=1e-6)
      state[c] = x + frames(r.velocity, j) * (T6[s + 1] - T6[s])
  for c in chunks:
    np.testing.assert_allclose(np.asarray(c.latent), state[c.index], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (6) causality, (7) determinism

def test_last_chunk_noise_does_not_change_earlier_chunks(sampler, t2v3):
  noise, base, _, _ = t2v3
  other = noise.copy()
  other[:, :, 2 * CHUNK_WIDTH:] = gaussian(other[:, :, 2 * CHUNK_WIDTH:].shape, 12)
  out, _, _ = run(sampler, 3, key=None, noise=other)
  for c in (0, 1):                      # block-causal: chunks 0 and 1 never see chunk 2
    np.testing.assert_array_equal(np.asarray(out[c].latent), np.asarray(base[c].latent))
  assert not np.allclose(np.asarray(out[2].latent), np.asarray(base[2].latent), atol=1e-3)


def test_prng_key_determinism_and_length_independence(sampler):
  a, _, _ = run(sampler, 3, key=jax.random.key(1))
  b, _, _ = run(sampler, 3, key=jax.random.key(1))
  c, _, _ = run(sampler, 3, key=jax.random.key(2))
  for x, y, z in zip(a, b, c):
    np.testing.assert_array_equal(np.asarray(x.latent), np.asarray(y.latent))
    assert not np.allclose(np.asarray(x.latent), np.asarray(z.latent), atol=1e-3)
  # Noise is drawn per chunk, and chunks are causal: a 4-chunk video with the same key starts
  # with the 3-chunk one (only the call shapes differ, hence a float tolerance).
  longer, _, _ = run(sampler, 4, key=jax.random.key(1))
  for x, y in zip(a, longer):
    np.testing.assert_allclose(np.asarray(y.latent), np.asarray(x.latent), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (8) I2V, (9) V2V

def test_i2v_image_frame(sampler, t2v3):
  noise, _, _, _ = t2v3
  prefix = gaussian((1, C_LAT, 1) + HW, 21)
  out, records, _ = run(sampler, 3, key=None, noise=noise, prefix=prefix)
  at0 = [r for r in records if r.plan.slice_point == 0]
  # slice point 0: stages 0 and 1 (6 calls) and the refresh of chunk 0 at the start of stage 2.
  assert len(at0) == 7
  for r in at0:
    np.testing.assert_array_equal(r.x[:, :, 0], prefix[:, :, 0])
  for r in records:
    if r.plan.slice_point > 0:
      assert not np.array_equal(r.x[:, :, 0], prefix[:, :, 0])
  assert [(c.index, c.start) for c in out] == [(0, 0), (1, 2), (2, 4)]
  for c in out:
    check_chunk(c, CHUNK_WIDTH)
  assert sum(c.latent.shape[2] for c in out) == 3 * CHUNK_WIDTH
  # Chunk 0 is emitted whole; its frame 0 is the prefix plus the last Euler step (call 5:
  # chunk 0 at σ = 5, dt = t[6] - t[5]), not the prefix itself.
  last = records[5]
  assert last.plan.step_indices[0] == 5 and last.plan.c0 == 0
  np.testing.assert_allclose(np.asarray(out[0].latent)[:, :, 0],
                             prefix[:, :, 0] + last.velocity[:, :, 0] * (T6[6] - T6[5]),
                             rtol=1e-6, atol=1e-6)
  # The noise under the image frame is never used: it is overwritten before every call.
  other = noise.copy()
  other[:, :, 0] = gaussian(other[:, :, 0].shape, 22)
  out2, _, _ = run(sampler, 3, key=None, noise=other, prefix=prefix)
  for x, y in zip(out, out2):
    np.testing.assert_array_equal(np.asarray(x.latent), np.asarray(y.latent))


def test_v2v_prefix(sampler):
  # CHUNK_WIDTH = 2: "one whole clean chunk + a partial one" is P = 2 + 1 = 3 latent frames.
  n, P = 4, CHUNK_WIDTH + 1
  prefix = gaussian((1, C_LAT, P) + HW, 31)
  noise = gaussian((1, C_LAT, n * CHUNK_WIDTH) + HW, 32)
  out, records, _ = run(sampler, n, key=None, noise=noise, prefix=prefix, clean=1)
  assert all(r.plan.slice_point >= 1 for r in records)        # chunk 0 is never denoised
  assert all(0 not in r.plan.chunks for r in records)
  # dsps · (n + W − 1 − n_clean) = 3 · 4
  assert len(records) == 12
  at1 = [r for r in records if r.plan.slice_point == 1]
  # slice point 1: stage 1 (chunk 1), stage 2 (chunks 1, 2), and the refresh of chunk 1.
  assert len(at1) == 7
  for r in at1:
    np.testing.assert_array_equal(r.x[:, :, :P - CHUNK_WIDTH], prefix[:, :, CHUNK_WIDTH:P])
  assert [c.index for c in out] == [1, 2, 3]
  assert out[0].start == P
  check_chunk(out[0], 2 * CHUNK_WIDTH - P)
  for c in out[1:]:
    check_chunk(c, CHUNK_WIDTH)
  assert sum(c.latent.shape[2] for c in out) == n * CHUNK_WIDTH - P
  # Noise under the prefix (chunk 0 and the first frame of chunk 1) is never used.
  other = noise.copy()
  other[:, :, :P] = gaussian(other[:, :, :P].shape, 33)
  out2, _, _ = run(sampler, n, key=None, noise=other, prefix=prefix, clean=1)
  for x, y in zip(out, out2):
    np.testing.assert_array_equal(np.asarray(x.latent), np.asarray(y.latent))
  # The clean prefix chunk is read through the cache: changing it changes the video.
  changed = prefix.copy()
  changed[:, :, :CHUNK_WIDTH] += 1.0
  out3, _, _ = run(sampler, n, key=None, noise=noise, prefix=changed, clean=1)
  assert not np.allclose(np.asarray(out3[0].latent), np.asarray(out[0].latent), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# (10) errors

@pytest.mark.parametrize("case,match", [
    ("prefix_shape", "prefix latents must be"),
    ("noise_shape", "noise must be"),
    ("prefix_covers_all", "nothing to generate"),
    ("no_key_no_noise", "PRNG key or an explicit noise"),
    ("latent_not_patchable", "divisible by patch_size"),
    ("text_chunks", "text rows are for 5 chunks"),
])
def test_sample_errors(sampler, case, match):
  n = 3
  kw = dict(latent_hw=HW, num_chunks=n, key=KEY)
  text = text_rows(n)
  if case == "prefix_shape":
    kw["prefix"] = np.zeros((1, C_LAT, 1, 4, 6), F32)
  elif case == "noise_shape":
    kw.update(key=None, noise=np.zeros((1, C_LAT, n * CHUNK_WIDTH - 1) + HW, F32))
  elif case == "prefix_covers_all":
    kw["prefix"] = np.zeros((1, C_LAT, n * CHUNK_WIDTH) + HW, F32)
  elif case == "no_key_no_noise":
    kw["key"] = None
  elif case == "latent_not_patchable":
    kw["latent_hw"] = (5, 4)
  elif case == "text_chunks":
    text = text_rows(5)
  with pytest.raises(SamplerError, match=match):
    next(sampler.sample(text, **kw))


def test_cfg3_with_distilled_model_is_refused():
  cfg = copy.copy(tiny_config())
  # MagiConfig itself refuses this combination, so bypass its validation to reach the sampler's.
  object.__setattr__(cfg, "engine", dataclasses.replace(cfg.engine, distill=True))
  assert cfg.runtime.cfg_number == 3 and cfg.engine.distill
  with pytest.raises(SamplerError, match="cfg_number 3"):
    Sampler(make_model(distill=True), cfg)


# ---------------------------------------------------------------------------------------------
# (11) per-chunk text

class RecordingText:
  def __init__(self, inner):
    self.inner, self.infer_chunk_num, self.asked = inner, inner.infer_chunk_num, []

  def cond(self, chunk):
    self.asked.append(chunk)
    return self.inner.cond(chunk)

  def null(self):
    return self.inner.null()


def test_per_chunk_prompts(sampler):
  n = 4
  two = text_rows(n, prompts=2, prompt_of_chunk=[0, 0, 1, 1])
  one = text_rows(n, prompts=1)        # same seed: its prompt is the first of `two`
  np.testing.assert_array_equal(one.embs[0], two.embs[0])
  np.testing.assert_array_equal(two.cond(1)[0], two.embs[0])
  np.testing.assert_array_equal(two.cond(2)[0], two.embs[1])
  assert not np.array_equal(two.cond(1)[0], two.cond(2)[0])

  rec = RecordingText(two)
  given, plans = [], []
  step = sampler._step

  def recording_step(inputs, options):
    given.append((np.asarray(inputs.y_cond), np.asarray(inputs.m_cond)))
    return step(inputs, options)

  sampler._step = recording_step
  try:
    out2, _, _ = run(sampler, n, text=rec, on_call=lambda r: plans.append(r.plan))
  finally:
    sampler._step = step
  # Each call gets the cond rows of exactly its denoised chunks; the refresh chunk gets the
  # null row. Every chunk's row is built once, however many calls it takes part in.
  null_y, null_m = two.null()
  assert len(given) == len(plans)
  for plan, (y, m) in zip(plans, given):
    rows = (([(null_y, null_m)] if plan.refresh else [])
            + [two.cond(c) for c in range(plan.c0, plan.c1)])
    np.testing.assert_array_equal(y, np.stack([r for r, _ in rows]), err_msg=str(plan))
    np.testing.assert_array_equal(m, np.stack([k for _, k in rows]), err_msg=str(plan))
  assert rec.asked == list(range(n))
  out1, _, _ = run(sampler, n, text=one)
  # Chunks 0 and 1 use prompt 0 in both runs and never attend to later chunks (block
  # causality; clean chunks enter the cache with null-text features, as the official): identical.
  for c in (0, 1):
    np.testing.assert_array_equal(np.asarray(out2[c].latent), np.asarray(out1[c].latent))
  for c in (2, 3):
    assert not np.allclose(np.asarray(out2[c].latent), np.asarray(out1[c].latent), atol=1e-3)
