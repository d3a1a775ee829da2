"""The training input pipeline: shard, shuffle per epoch, crop / resize, tokenize, pack, batch.

Why this shape: a multi-host trainer needs every process to read its own examples, the same
stream after a restart, and batches of one static shape. Everything here is a function of
(seed, step), so the pipeline is a grain `MapDataset` with index-based state and the iterator
checkpoints as one integer (`it.get_state()` / `it.set_state(state)`):

  source (random access: a tfds `as_data_source(split)` or any __len__/__getitem__ object)
    -> this process's shard: source indices process_index, process_index + process_count, ...
    -> BinPlan: epoch e permutes the shard with np.random.default_rng([seed, e]), decides each
       example's length this epoch (min(chunks, max_chunks), or with `min_chunks` a uniform
       draw from default_rng([seed, e, 1]) between min_chunks and that), cuts the order into
       windows of `pack_window` examples and first-fit-decreasing packs each window into bins
       of `bin_chunks` chunks. Example chunk counts are known up front (`num_chunks`, or one
       scan of the source), so bin k is pure index arithmetic: no buffer, no hidden state.
    -> .map(load_bin): read the bin's examples; per example, rng = default_rng([seed, epoch,
       source index]) picks the position of its planned window of chunks (a random sub-clip
       when it is shorter than the example) and a random crop; then resize, tokenize each chunk
       caption, `packing.pack`.
    -> .batch(batch_size, drop_remainder=True) -> .to_iter_dataset(ReadOptions(threads, prefetch))

Epochs repeat forever, each reshuffled; a batch may hold bins of two consecutive epochs.

Source examples are dicts with "frames" uint8 (c * F, H, W, 3) (or the prepared VAE latents
"latents" (c * F, h, w, C) of `magi_jax.data.prepared`, F then counting latent frames; no crop
or resize) and optionally "chunk_captions"
(c strings or utf-8 bytes), "caption" (used for every chunk when there are no chunk captions),
"text_emb" (c, L, D) + "text_mask" (c, L) (used when no `tokenize` is given).

Batch dict (B = batch_size, K = bin_chunks, F = frames_per_chunk; H, W after crop / resize):
  frames uint8 (B, K * F, H, W, 3) (or latents (B, K * F, h, w, C));
  segment_ids int32 (B, K) (1, 2, ... per example, 0 padding);
  chunk_positions int32 (B, K) (chunk index within its example); source_index int32 (B, K)
  (the source index of each chunk's example, -1 padding);
  with `tokenize`: text_tokens int32 (B, K, L), text_mask int32 (B, K, L);
  else with source embeddings: text_emb float32 (B, K, L, D), text_mask int32 (B, K, L).
"""

from __future__ import annotations

import bisect
import collections
import functools
import sys
import threading
from collections.abc import Callable, Sequence

import grain
import numpy as np

from magi_jax.data import packing
from magi_jax.data.errors import DataError


def _check_pos_int(name, v, allow_none=False):
  if v is None and allow_none:
    return
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
    raise DataError(f"{name} must be a positive integer, got {v!r}")


def _check_size(name, v):
  if v is None:
    return None
  if (not isinstance(v, (tuple, list)) or len(v) != 2 or
      any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1 for x in v)):
    raise DataError(f"{name} must be (height, width) positive integers, got {v!r}")
  return (int(v[0]), int(v[1]))


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float32 (n_out, n_in) linear-interpolation weights, anti-aliased when shrinking.

  Output pixel i samples input position (i + 1/2) n_in / n_out - 1/2 with a triangle filter of
  half-width max(n_in / n_out, 1) input pixels; taps past the edge are clamped. Rows sum to 1.
  """
  scale = n_in / n_out
  support = max(scale, 1.0)
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    centre = (i + 0.5) * scale - 0.5
    for j in range(int(np.floor(centre - support)), int(np.ceil(centre + support)) + 1):
      w = max(0.0, 1.0 - abs(j - centre) / support)
      if w > 0:
        m[i, min(max(j, 0), n_in - 1)] += w
  m /= m.sum(axis=1, keepdims=True)
  return m.astype(np.float32)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (T, h, w, 3) -> uint8 (T, height, width, 3), separable `resize_matrix` filter."""
  t, h, w, _ = frames.shape
  if (h, w) == (height, width):
    return frames
  x = np.einsum("oh,thwc->towc", resize_matrix(h, height), frames.astype(np.float32))
  x = np.einsum("pw,towc->topc", resize_matrix(w, width), x)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def chunk_texts(example: dict, num_chunks: int, where: str) -> list[str] | None:
  """The example's per-chunk captions as str (chunk_captions, else caption repeated), or None."""
  if "chunk_captions" in example:
    texts = [_text(t) for t in example["chunk_captions"]]
    if len(texts) != num_chunks:
      raise DataError(f"{where}: {len(texts)} chunk_captions for {num_chunks} chunks")
    return texts
  if "caption" in example:
    return [_text(example["caption"])] * num_chunks
  return None


def prepare_example(example: dict, *, frames_per_chunk: int, chunks: int,
                    rng: np.random.Generator, crop=None, resize=None, tokenize=None,
                    where: str = "example") -> dict:
  """One source example -> the dict `packing.pack` takes (window, crop, resize, text).

  Keeps a window of `chunks` chunks (all of them when the example has no more). Random draws,
  in order: the window offset (only when the example has more chunks), then the crop offsets
  y, x (only with `crop`).
  """
  F = frames_per_chunk
  vkind, frames = packing.video_of(example, where)
  if vkind == "latents" and (crop is not None or resize is not None):
    raise DataError(f"{where}: crop / resize apply to pixel frames; prepared latents are "
                    "stored at the size they were encoded at")
  if frames.shape[0] == 0 or frames.shape[0] % F:
    raise DataError(f"{where}: {frames.shape[0]} frames are not a whole number of {F}-frame "
                    "chunks")
  c = frames.shape[0] // F
  texts = chunk_texts(example, c, where) if tokenize is not None else None
  if tokenize is not None and texts is None:
    raise DataError(f"{where}: has no caption or chunk_captions to tokenize")
  emb = None
  if tokenize is None and "text_emb" in example:
    if "text_mask" not in example:
      raise DataError(f"{where}: has text_emb but no text_mask")
    emb = np.asarray(example["text_emb"]), np.asarray(example["text_mask"])
    if emb[0].shape[0] != c or emb[1].shape[0] != c:
      raise DataError(f"{where}: text_emb / text_mask have {emb[0].shape[0]} / "
                      f"{emb[1].shape[0]} rows for {c} chunks")
  if c > chunks:
    off = int(rng.integers(0, c - chunks + 1))
    frames = frames[off * F:(off + chunks) * F]
    texts = texts[off:off + chunks] if texts is not None else None
    emb = (emb[0][off:off + chunks], emb[1][off:off + chunks]) if emb else None
  if crop is not None:
    ch, cw = crop
    h, w = frames.shape[1:3]
    if ch > h or cw > w:
      raise DataError(f"{where}: crop {ch}x{cw} is larger than the {h}x{w} frames")
    oy, ox = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    frames = frames[:, oy:oy + ch, ox:ox + cw]
  if resize is not None:
    frames = resize_frames(frames, *resize)
  out = {vkind: np.ascontiguousarray(frames)}
  if texts is not None:
    toks = [tokenize(t) for t in texts]
    out["text_tokens"] = np.stack([np.asarray(i, np.int32) for i, _ in toks])
    out["text_mask"] = np.stack([np.asarray(m, np.int32) for _, m in toks])
  elif emb is not None:
    out["text_emb"] = emb[0].astype(np.float32)
    out["text_mask"] = emb[1].astype(np.int32)
  return out


class BinPlan:
  """Random access to the packing plan: bin k -> (epoch, shard positions, chunks to keep).

  Deterministic in (chunk counts, bin_chunks, pack_window, seed, min / max chunks). Epochs are
  computed on demand and the bins of the two most recently used epochs are cached; per-epoch bin
  counts are kept, so the first access to a far bin (a restore) walks the epochs before it once
  (constant time when every example always has the same length: every epoch then has the same
  number of bins). Thread safe.
  """

  def __init__(self, chunk_counts: Sequence[int], bin_chunks: int, pack_window: int, seed: int,
               max_chunks: int | None = None, min_chunks: int | None = None):
    counts = np.array([int(c) for c in chunk_counts], np.int64)
    if counts.size == 0:
      raise DataError("cannot plan bins for an empty shard")
    self.bin_chunks, self.window, self.seed = bin_chunks, pack_window, seed
    self.hi = np.minimum(counts, bin_chunks if max_chunks is None else max_chunks)
    self.lo = self.hi if min_chunks is None else np.minimum(self.hi, min_chunks)
    self._uniform = bool(np.all(self.lo == self.hi)) and len(set(self.hi.tolist())) == 1
    self._starts = [0]             # _starts[e] = index of epoch e's first bin (known epochs)
    self._cache: collections.OrderedDict[int, list] = collections.OrderedDict()
    self._lock = threading.RLock()

  def __len__(self) -> int:
    return sys.maxsize

  def lengths(self, epoch: int) -> np.ndarray:
    """Chunks each shard example contributes in `epoch`."""
    if np.all(self.lo == self.hi):
      return self.hi
    return np.random.default_rng([self.seed, epoch, 1]).integers(self.lo, self.hi + 1)

  def epoch_bins(self, epoch: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Epoch `epoch`'s bins: (shard positions in shuffled order, their chunk counts)."""
    with self._lock:
      if epoch not in self._cache:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.hi))
        lengths = self.lengths(epoch)
        bins = []
        for w0 in range(0, len(order), self.window):
          win = order[w0:w0 + self.window]
          for b in packing.first_fit_decreasing(lengths[win].tolist(), self.bin_chunks):
            pos = tuple(int(win[i]) for i in sorted(b))
            bins.append((pos, tuple(int(lengths[p]) for p in pos)))
        self._cache[epoch] = bins
      self._cache.move_to_end(epoch)
      while len(self._cache) > 2:        # keep the two most recently used epochs
        self._cache.popitem(last=False)
      return self._cache[epoch]

  def epoch_start(self, epoch: int) -> int:
    """Index of the first bin of `epoch`."""
    with self._lock:
      if self._uniform:
        if len(self._starts) == 1:
          self._starts.append(len(self.epoch_bins(0)))
        return epoch * self._starts[1]
      while len(self._starts) <= epoch:
        e = len(self._starts) - 1
        self._starts.append(self._starts[-1] + len(self.epoch_bins(e)))
      return self._starts[epoch]

  def __getitem__(self, k: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    if k < 0:
      raise IndexError(k)
    with self._lock:
      if self._uniform:
        e = k // self.epoch_start(1)
      else:
        while self._starts[-1] <= k:
          self.epoch_start(len(self._starts))
        e = bisect.bisect_right(self._starts, k) - 1
      return (e,) + self.epoch_bins(e)[k - self.epoch_start(e)]


class _LoadBin:
  """(epoch, positions, chunks) -> packed bin dict (see the module docstring)."""

  def __init__(self, examples, shard_index, shard_count, counts, kw):
    self.examples, self.shard_index, self.shard_count = examples, shard_index, shard_count
    self.counts, self.kw = counts, kw

  def __call__(self, item) -> dict:
    epoch, positions, lengths = item
    kw = self.kw
    F = kw["frames_per_chunk"]
    prepared, sources = [], []
    for p, chunks in zip(positions, lengths):
      src = self.shard_index + p * self.shard_count
      ex = self.examples[p]
      where = f"source example {src}"
      n = packing.video_of(ex, where)[1].shape[0]
      if n != self.counts[p] * F:
        raise DataError(f"{where}: has {n} frames but num_chunks says {self.counts[p]} chunks "
                        f"of {F}")
      rng = np.random.default_rng([kw["seed"], epoch, src])
      prepared.append(prepare_example(ex, frames_per_chunk=F, chunks=chunks,
                                      rng=rng, crop=kw["crop"], resize=kw["resize"],
                                      tokenize=kw["tokenize"], where=where))
      sources.append(src)
    out = packing.pack(prepared, kw["bin_chunks"], F)
    seg = out["segment_ids"]
    out["source_index"] = np.array([-1] + sources, np.int32)[seg]
    return out


def _cached(tokenize: Callable) -> Callable:
  """Memoises tokenize(text) (captions repeat a lot); the arrays are made read-only."""
  @functools.lru_cache(maxsize=8192)
  def tok(text):
    ids, mask = tokenize(text)
    ids, mask = np.array(ids, np.int32), np.array(mask, np.int32)
    if ids.ndim != 1 or ids.shape != mask.shape:
      raise DataError(f"tokenize({text!r}) must return ids (L,) and mask (L,), got "
                      f"{ids.shape} and {mask.shape}")
    ids.flags.writeable = mask.flags.writeable = False
    return ids, mask
  return tok


def make_dataset(source, *, batch_size: int | None, bin_chunks: int, frames_per_chunk: int,
                 seed: int, pack_window: int = 16, num_chunks=None, max_chunks: int | None = None,
                 min_chunks: int | None = None,
                 crop=None, resize=None, tokenize: Callable | None = None,
                 shard_index: int | None = None, shard_count: int | None = None
                 ) -> grain.MapDataset:
  """The infinite grain MapDataset of batches (of bins when batch_size is None).

  Args:
    source: random-access examples (see the module docstring).
    batch_size: bins per batch (the remainder is never dropped: the stream is infinite).
    bin_chunks: chunks per bin (K).
    frames_per_chunk: F.
    seed: shuffling / packing / augmentation seed, 0 <= seed < 2**32.
    pack_window: examples per first-fit-decreasing window (bigger: fuller bins).
    num_chunks: chunks per source example: an int (all equal) or one per source index; None
      reads every example of this shard once to count.
    max_chunks: longer examples are cut to a random window of this many chunks (default
      bin_chunks; at most bin_chunks).
    min_chunks: if given, every epoch each example contributes a random window of between
      min_chunks and min(its chunks, max_chunks) chunks (uniform), for packing variety.
    crop: optional (h, w) random crop, taken before `resize`.
    resize: optional (height, width) output size.
    tokenize: optional text -> (ids (L,), mask (L,)), applied to every chunk caption.
    shard_index, shard_count: this reader's shard (default jax.process_index() / count()).
  """
  _check_pos_int("batch_size", batch_size, allow_none=True)
  for name, v in (("bin_chunks", bin_chunks), ("frames_per_chunk", frames_per_chunk),
                  ("pack_window", pack_window)):
    _check_pos_int(name, v)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise DataError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  max_chunks = bin_chunks if max_chunks is None else max_chunks
  _check_pos_int("max_chunks", max_chunks)
  if max_chunks > bin_chunks:
    raise DataError(f"max_chunks {max_chunks} is larger than bin_chunks {bin_chunks}")
  _check_pos_int("min_chunks", min_chunks, allow_none=True)
  if min_chunks is not None and min_chunks > max_chunks:
    raise DataError(f"min_chunks {min_chunks} is larger than max_chunks {max_chunks}")
  crop, resize = _check_size("crop", crop), _check_size("resize", resize)
  if shard_index is None or shard_count is None:
    import jax   # lazy: only for the default sharding
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  _check_pos_int("shard_count", shard_count)
  if isinstance(shard_index, bool) or not 0 <= shard_index < shard_count:
    raise DataError(f"shard_index {shard_index!r} must be in [0, {shard_count})")
  n_source = len(source)
  examples = grain.MapDataset.source(source)[shard_index::shard_count]
  n = len(examples)
  if n == 0:
    raise DataError(f"shard {shard_index} of {shard_count} is empty: the source has "
                    f"{n_source} examples")
  if num_chunks is None:
    counts = []
    for p in range(n):
      where = f"source example {shard_index + p * shard_count}"
      t = packing.video_of(examples[p], where)[1].shape[0]
      if t == 0 or t % frames_per_chunk:
        raise DataError(f"source example {shard_index + p * shard_count}: {t} frames are not "
                        f"a whole number of {frames_per_chunk}-frame chunks")
      counts.append(t // frames_per_chunk)
  elif isinstance(num_chunks, (int, np.integer)):
    _check_pos_int("num_chunks", num_chunks)
    counts = [int(num_chunks)] * n
  else:
    if len(num_chunks) != n_source:
      raise DataError(f"num_chunks has {len(num_chunks)} entries for {n_source} examples")
    counts = [int(c) for c in list(num_chunks)[shard_index::shard_count]]
  plan = BinPlan(counts, bin_chunks, pack_window, int(seed), max_chunks, min_chunks)
  kw = dict(frames_per_chunk=frames_per_chunk, crop=crop, resize=resize,
            tokenize=_cached(tokenize) if tokenize is not None else None, seed=int(seed),
            bin_chunks=bin_chunks)
  ds = grain.MapDataset.source(plan).map(_LoadBin(examples, shard_index, shard_count, counts, kw))
  if batch_size is not None:
    ds = ds.batch(batch_size, drop_remainder=True)
  return ds


def make_pipeline(source, *, batch_size: int, bin_chunks: int, frames_per_chunk: int, seed: int,
                  num_threads: int = 2, prefetch: int = 4, **kwargs) -> grain.DatasetIterator:
  """A checkpointable iterator of batches (dicts of numpy arrays, see the module docstring).

  `it.get_state()` is a small dict; `it.set_state(state)` on a fresh iterator with the same
  arguments resumes bit-exactly. kwargs: see `make_dataset`. num_threads / prefetch: grain
  ReadOptions (threads reading batches ahead, batches buffered); num_threads=0 reads inline.
  """
  ds = make_dataset(source, batch_size=batch_size, bin_chunks=bin_chunks,
                    frames_per_chunk=frames_per_chunk, seed=seed, **kwargs)
  opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(opts))
