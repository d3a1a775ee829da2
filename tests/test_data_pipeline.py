"""Packing and the grain pipeline: FFD, bins, determinism, checkpoints, shards, crops."""

from __future__ import annotations

import chex
import numpy as np
import pytest

from magi_jax.data import DataError, first_fit_decreasing, pack
from magi_jax.proj.bouncing.world import WorldConfig, caption_words, vocabulary
from magi_jax.proj.bouncing.tfds_builder import make_builder
from magi_jax.proj.bouncing.training import bouncing_batches
from magi_jax.data.pipeline import (make_dataset, make_pipeline,
                                    resize_matrix)

F = 2          # frames per chunk of the synthetic source
L = 6          # token length


def _source(n=24, seed=0, hw=(8, 8)):
  """Example i has 1..4 chunks; channel 0 = i + 1, channel 1 = chunk index, 2 = 7."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    c = int(rng.integers(1, 5))
    fr = np.zeros((c * F,) + hw + (3,), np.uint8)
    fr[..., 0] = i + 1
    fr[..., 1] = np.repeat(np.arange(c), F)[:, None, None]
    fr[..., 2] = 7
    out.append({"frames": fr, "caption": f"clip {i}".encode(),
                "chunk_captions": [f"clip {i} part {k}" for k in range(c)]})
  return out


def _tokenize(text):
  ids = np.zeros(L, np.int32)
  mask = np.zeros(L, np.int32)
  vals = [len(w) + 10 * (k + 1) for k, w in enumerate(text.split())][:L - 1] + [sum(map(ord,
                                                                                   text)) % 97]
  ids[:len(vals)] = vals
  mask[:len(vals)] = 1
  return ids, mask


def _bins(batch):
  """Unbatches a batch dict into per-bin dicts."""
  n = batch["segment_ids"].shape[0]
  return [{k: v[b] for k, v in batch.items()} for b in range(n)]


def _pipe(src, **kw):
  args = dict(batch_size=2, bin_chunks=6, frames_per_chunk=F, seed=0, tokenize=_tokenize,
              shard_index=0, shard_count=1, num_threads=0)
  args.update(kw)
  return make_pipeline(src, **args)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- first-fit-decreasing ---------------------------------------------------------------------

def test_ffd_known_example():
  # Sorted: 1(5) 5(5) 3(4) 0(3) 2(2) 4(1); 2 fills bin [3], 4 fills bin [1].
  assert first_fit_decreasing([3, 5, 2, 4, 1, 5], 6) == [[1, 4], [5], [3, 2], [0]]
  assert first_fit_decreasing([2, 2, 2], 6) == [[0, 1, 2]]
  assert first_fit_decreasing([], 4) == []


def test_ffd_properties_random():
  rng = np.random.default_rng(0)
  for trial in range(30):
    cap = int(rng.integers(1, 12))
    lengths = rng.integers(1, cap + 1, size=int(rng.integers(1, 40))).tolist()
    bins = first_fit_decreasing(lengths, cap)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))                       # every index once
    used = [sum(lengths[i] for i in b) for b in bins]
    assert max(used) <= cap                                        # no bin over capacity
    assert len(bins) >= -(-sum(lengths) // cap)
    for b in bins:                                                 # placed longest first
      assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # First fit: an item in bin j did not fit in any earlier bin (whose room only shrank).
    for j, b in enumerate(bins):
      for i in b:
        assert all(cap - used[k] < lengths[i] for k in range(j)), trial
    assert first_fit_decreasing(lengths, cap) == bins              # deterministic


def test_ffd_errors_name_the_item():
  with pytest.raises(ValueError, match="item 2 has length 9"):
    first_fit_decreasing([1, 2, 9], 8)
  with pytest.raises(ValueError, match="item 0"):
    first_fit_decreasing([0], 8)
  with pytest.raises(ValueError, match="capacity"):
    first_fit_decreasing([1], 0)


# ---- pack ---------------------------------------------------------------------------------------

def test_pack_tokens_and_padding():
  exs = []
  for i, c in enumerate([2, 1]):
    exs.append({"frames": np.full((c * F, 4, 4, 3), i + 1, np.uint8),
                "text_tokens": np.full((c, L), 10 + i, np.int32),
                "text_mask": np.ones((c, L), np.int32)})
  out = pack(exs, 5, F)
  chex.assert_shape(out["frames"], (5 * F, 4, 4, 3))
  chex.assert_type([out["segment_ids"], out["text_tokens"], out["text_mask"]], np.int32)
  np.testing.assert_array_equal(out["segment_ids"], [1, 1, 2, 0, 0])
  np.testing.assert_array_equal(out["chunk_positions"], [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(out["frames"][:2 * F], 1)
  np.testing.assert_array_equal(out["frames"][2 * F:3 * F], 2)
  np.testing.assert_array_equal(out["frames"][3 * F:], 0)
  np.testing.assert_array_equal(out["text_tokens"][:, 0], [10, 10, 11, 0, 0])
  np.testing.assert_array_equal(out["text_mask"][3:], 0)


def test_pack_embeddings_and_errors():
  ex = {"frames": np.ones((F, 4, 4, 3), np.uint8),
        "text_emb": np.full((1, 3, 2), 0.5, np.float16), "text_mask": np.ones((1, 3), np.int32)}
  out = pack([ex], 2, F)
  chex.assert_type(out["text_emb"], np.float32)
  chex.assert_shape(out["text_emb"], (2, 3, 2))
  np.testing.assert_array_equal(out["text_emb"][1], 0)
  with pytest.raises(DataError, match="do not fit"):
    pack([ex, ex, ex], 2, F)
  with pytest.raises(DataError, match="whole number"):
    pack([{"frames": np.ones((F + 1, 4, 4, 3), np.uint8)}], 4, F)
  with pytest.raises(DataError, match="carries text"):
    pack([ex, {"frames": np.ones((F, 4, 4, 3), np.uint8)}], 4, F)


# ---- pipeline -----------------------------------------------------------------------------------

def test_batch_format_and_packing_never_mixes_chunks():
  src = _source()
  it = _pipe(src, max_chunks=3)
  for _ in range(6):
    batch = next(it)
    chex.assert_shape(batch["frames"], (2, 6 * F, 8, 8, 3))
    chex.assert_type(batch["frames"], np.uint8)
    chex.assert_shape([batch["segment_ids"], batch["chunk_positions"], batch["source_index"]],
                      (2, 6))
    chex.assert_shape([batch["text_tokens"], batch["text_mask"]], (2, 6, L))
    chex.assert_type([batch["segment_ids"], batch["text_tokens"], batch["text_mask"]], np.int32)
    for b in _bins(batch):
      seg = b["segment_ids"]
      used = int((seg > 0).sum())
      assert np.all(seg[:used] > 0) and np.all(seg[used:] == 0)       # padding at the end
      assert np.all(np.diff(seg[:used]) >= 0)                          # contiguous segments
      assert set(seg[:used]) == set(range(1, seg.max() + 1))
      np.testing.assert_array_equal(b["frames"][used * F:], 0)
      np.testing.assert_array_equal(b["text_tokens"][used:], 0)
      np.testing.assert_array_equal(b["source_index"][used:], -1)
      for s in range(1, seg.max() + 1):
        chunks = np.flatnonzero(seg == s)
        idx = b["source_index"][chunks]
        assert len(set(idx)) == 1                                      # one example per segment
        i = int(idx[0])
        fr = b["frames"][chunks[0] * F:(chunks[-1] + 1) * F]
        np.testing.assert_array_equal(fr[..., 0], i + 1)               # only its own frames
        orig = fr[::F, 0, 0, 1].astype(int)                            # original chunk numbers
        assert len(chunks) <= 3 and np.all(np.diff(orig) == 1)        # a contiguous window
        np.testing.assert_array_equal(b["chunk_positions"][chunks], np.arange(len(chunks)))
        for k, c in zip(chunks, orig):
          ids, _ = _tokenize(f"clip {i} part {c}")
          np.testing.assert_array_equal(b["text_tokens"][k], ids)


@pytest.mark.parametrize("min_chunks", [None, 1])
def test_checkpoint_restore_is_bitwise(min_chunks):
  src = _source()
  it = _pipe(src, num_threads=2, crop=(6, 5), min_chunks=min_chunks)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  fresh = _pipe(src, num_threads=2, crop=(6, 5), min_chunks=min_chunks)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(2)]
  assert all(_equal(a, b) for a, b in zip(expected, got))


def test_determinism_and_seed_dependence():
  src = _source()
  a = [next(it) for it in [_pipe(src)] for _ in range(4)]
  b = [next(it) for it in [_pipe(src)] for _ in range(4)]
  c = [next(it) for it in [_pipe(src, seed=1)] for _ in range(4)]
  assert all(_equal(x, y) for x, y in zip(a, b))
  default = _pipe(src, shard_index=None, shard_count=None)    # jax: process 0 of 1
  assert _equal(next(default), a[0])
  order = lambda bs: np.concatenate([x["source_index"].ravel() for x in bs])
  assert not np.array_equal(order(a), order(c))


def test_random_sub_clip_lengths_and_random_access_order():
  src = [{"frames": np.repeat(np.arange(4, dtype=np.uint8), F)[:, None, None, None]
          * np.ones((1, 4, 4, 3), np.uint8) + 10 * i} for i in range(10)]
  kw = dict(batch_size=None, bin_chunks=6, frames_per_chunk=F, seed=0, pack_window=4,
            min_chunks=1, max_chunks=3, shard_index=0, shard_count=1)
  forward = make_dataset(src, **kw)
  bins = [forward[k] for k in range(40)]               # several epochs
  backward = make_dataset(src, **kw)
  assert all(_equal(b, backward[k]) for k, b in reversed(list(enumerate(bins))))
  lengths = set()
  for b in bins:
    for s in range(1, b["segment_ids"].max() + 1):
      chunks = np.flatnonzero(b["segment_ids"] == s)
      i = int(b["source_index"][chunks[0]])
      vals = b["frames"][chunks * F, 0, 0, 0].astype(int) - 10 * i
      assert np.all(np.diff(vals) == 1) and 0 <= vals[0] and vals[-1] <= 3   # a sub-clip
      lengths.add(len(chunks))
  assert lengths == {1, 2, 3}


def _epochs(ds, n_examples, epochs=2):
  """Source indices of the first `epochs` epochs, as lists, from an unbatched bin dataset."""
  out, k = [], 0
  for _ in range(epochs):
    seen = []
    while len(seen) < n_examples:
      b = ds[k]
      k += 1
      seen += sorted({int(i) for i in b["source_index"] if i >= 0},
                     key=list(b["source_index"]).index)
    assert len(seen) == n_examples
    out.append(seen)
  return out


def test_every_example_once_per_epoch_and_reshuffled():
  src = _source(20)
  ds = make_dataset(src, batch_size=None, bin_chunks=6, frames_per_chunk=F, seed=3,
                    pack_window=5, shard_index=0, shard_count=1)
  e0, e1 = _epochs(ds, 20)
  assert sorted(e0) == sorted(e1) == list(range(20))
  assert e0 != e1


def test_process_shards_are_disjoint_and_cover():
  src = _source(21)
  seen = []
  for shard in range(2):
    ds = make_dataset(src, batch_size=None, bin_chunks=6, frames_per_chunk=F, seed=0,
                      shard_index=shard, shard_count=2, num_chunks=[len(e["frames"]) // F
                                                                    for e in src])
    (epoch,) = _epochs(ds, len(range(shard, 21, 2)), epochs=1)
    seen.append(set(epoch))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(21))
  assert seen[0] == set(range(0, 21, 2))


def test_random_crop_takes_a_window_and_resize_averages():
  H, W = 8, 10
  src = []
  for _ in range(6):
    fr = np.zeros((2 * F, H, W, 3), np.uint8)
    fr[..., 0] = (np.arange(H) * 8)[None, :, None]
    fr[..., 1] = (np.arange(W) * 8)[None, None, :]
    fr[..., 2] = 100
    src.append({"frames": fr})
  offsets = set()
  it = _pipe(src, tokenize=None, bin_chunks=2, crop=(4, 6))
  for _ in range(6):
    batch = next(it)
    chex.assert_shape(batch["frames"], (2, 2 * F, 4, 6, 3))
    for b in _bins(batch):
      fr = b["frames"].astype(int)
      oy, ox = fr[0, 0, 0, 0] // 8, fr[0, 0, 0, 1] // 8
      np.testing.assert_array_equal(fr[..., 0], ((oy + np.arange(4)) * 8)[None, :, None]
                                    + 0 * fr[..., 0])
      np.testing.assert_array_equal(fr[..., 1], ((ox + np.arange(6)) * 8)[None, None, :]
                                    + 0 * fr[..., 1])
      offsets.add((int(oy), int(ox)))
  assert len(offsets) > 1                                   # the crop is random
  batch = next(_pipe(src, tokenize=None, bin_chunks=2, resize=(4, 5)))
  chex.assert_shape(batch["frames"], (2, 2 * F, 4, 5, 3))
  fr = batch["frames"].astype(int)
  np.testing.assert_array_equal(fr[..., 2], 100)            # constants stay constant
  np.testing.assert_array_equal(fr[0, 0, 1:3, 0, 0], [20, 36])   # ramp 8y sampled at 2i + 0.5
  batch = next(_pipe(src, tokenize=None, bin_chunks=2, crop=(6, 6), resize=(3, 3)))
  chex.assert_shape(batch["frames"], (2, 2 * F, 3, 3, 3))
  np.testing.assert_allclose(resize_matrix(7, 3).sum(1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(resize_matrix(5, 5), np.eye(5, dtype=np.float32))


def test_source_embeddings_are_packed():
  src = [{"frames": np.full((2 * F, 4, 4, 3), i + 1, np.uint8),
          "text_emb": np.full((2, 3, 2), i, np.float16), "text_mask": np.ones((2, 3), np.int32)}
         for i in range(4)]
  batch = next(_pipe(src, tokenize=None, bin_chunks=4))
  chex.assert_type(batch["text_emb"], np.float32)
  chex.assert_shape(batch["text_emb"], (2, 4, 3, 2))
  si = batch["source_index"]
  np.testing.assert_array_equal(batch["text_emb"][..., 0, 0], np.where(si >= 0, si, 0))


def test_pipeline_argument_errors():
  src = _source(4)
  with pytest.raises(DataError, match="max_chunks 7"):
    _pipe(src, max_chunks=7)
  with pytest.raises(DataError, match="shard_index 2"):
    _pipe(src, shard_index=2, shard_count=2)
  with pytest.raises(DataError, match="empty"):
    _pipe(src, shard_index=4, shard_count=5)
  with pytest.raises(DataError, match="num_chunks has 3"):
    _pipe(src, num_chunks=[1, 1, 1])
  it = _pipe(src, num_chunks=9)          # wrong metadata is caught when the example is read
  with pytest.raises(DataError, match="num_chunks says 9"):
    next(it)


def test_bouncing_batches_from_tfds(tmp_path):
  world = WorldConfig(num_frames=8, frames_per_chunk=4)
  vocab = vocabulary(world)

  def tokenize(text):
    ids = np.zeros(16, np.int32)
    words = [vocab.index(w) + 1 for w in caption_words(text)]
    ids[:len(words)] = words
    return ids, (ids > 0).astype(np.int32)

  it = bouncing_batches(tmp_path, world, "train", batch_size=2, bin_chunks=4, seed=0,
                        train_episodes=6, test_episodes=1, tokenize=tokenize,
                        shard_index=0, shard_count=1, num_threads=0)
  batch = next(it)
  chex.assert_shape(batch["frames"], (2, 16, 24, 24, 3))
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 2, 2]] * 2)   # 2 episodes a bin
  records = make_builder(tmp_path, world, 6, 1).as_data_source("train")   # reused, not rebuilt
  for b in _bins(batch):
    for seg in (1, 2):
      chunks = np.flatnonzero(b["segment_ids"] == seg)
      rec = records[int(b["source_index"][chunks[0]])]
      np.testing.assert_array_equal(b["frames"][chunks[0] * 4:(chunks[-1] + 1) * 4],
                                    rec["frames"])
      for k, c in zip(chunks, rec["chunk_captions"]):
        words = [vocab[i - 1] for i in b["text_tokens"][k] if i > 0]
        assert words == caption_words(c.decode())
        assert rec["colours"][0].decode() in words          # the colour word survives
