"""Packing whole-chunk examples into fixed-size bins: first-fit-decreasing and the bin arrays.

Why: training batches must have one static shape (one compiled step), while clips differ in
length. Several clips are concatenated along time into a bin of `bin_chunks` chunks; the model's
block-causal chunk mask keeps them apart through `segment_ids` (one id per chunk: 1, 2, ... per
example, 0 for padding), so no chunk ever attends to another example. Examples are whole chunks,
so a chunk never straddles two examples.

First-fit-decreasing (FFD) is the classic bin-packing heuristic (at most 11/9 OPT + 6/9 bins): take
items longest first (ties: lower index first) and put each into the first open bin with room.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from magi_jax.data.errors import DataError

TEXT_KINDS = ("text_tokens", "text_emb")
VIDEO_KINDS = ("frames", "latents")


def video_of(example: dict, where: str = "example") -> tuple[str, np.ndarray]:
  """("frames", uint8 (T, H, W, 3)) pixels, or ("latents", float (T, h, w, C)) prepared VAE
  latents (`magi_jax.data.prepared`): the example's video, time first, checked."""
  kinds = [k for k in VIDEO_KINDS if k in example]
  if len(kinds) != 1:
    raise DataError(f"{where}: needs exactly one of {list(VIDEO_KINDS)}, has {kinds}")
  kind = kinds[0]
  v = np.asarray(example[kind])
  if kind == "frames" and (v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3):
    raise DataError(f"{where}: frames must be uint8 (T, H, W, 3), got {v.dtype} {v.shape}")
  if kind == "latents" and (v.ndim != 4 or v.dtype.kind != "f"):
    raise DataError(f"{where}: latents must be floating (T, h, w, C), got {v.dtype} {v.shape}")
  return kind, v


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Bins of item indices; each bin's lengths sum to at most `capacity`.

  Args:
    lengths: positive integer item sizes.
    capacity: bin size.

  Returns:
    Bins in the order they were opened; within a bin, indices in the order they were placed
    (decreasing length, ties by index). Deterministic.

  Raises:
    DataError (a ValueError): an item longer than capacity, or a non-positive size.
  """
  if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
    raise DataError(f"capacity must be a positive integer, got {capacity!r}")
  lengths = [int(x) for x in lengths]
  for i, n in enumerate(lengths):
    if n < 1:
      raise DataError(f"item {i} has length {n}; lengths must be positive")
    if n > capacity:
      raise DataError(f"item {i} has length {n}, longer than the bin capacity {capacity}")
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  bins: list[list[int]] = []
  room: list[int] = []
  for i in order:
    for b, r in enumerate(room):
      if r >= lengths[i]:
        bins[b].append(i)
        room[b] -= lengths[i]
        break
    else:
      bins.append([i])
      room.append(capacity - lengths[i])
  return bins


def text_kind(example: dict) -> str | None:
  """'text_tokens', 'text_emb' or None: which per-chunk text an example carries."""
  kinds = [k for k in TEXT_KINDS if k in example]
  if len(kinds) > 1:
    raise DataError(f"an example carries both {kinds}; give one kind of text per example")
  if kinds and "text_mask" not in example:
    raise DataError(f"an example has {kinds[0]} but no text_mask")
  return kinds[0] if kinds else None


def pack(examples: Sequence[dict], bin_chunks: int, frames_per_chunk: int) -> dict:
  """Concatenates whole-chunk examples along time into one zero-padded bin.

  Args:
    examples: dicts with "frames" uint8 (c_i * F, H, W, 3) (or "latents" (c_i * F, h, w, C),
      F then being latent frames per chunk, packed the same way) and optionally per-chunk text:
      "text_tokens" (c_i, L) + "text_mask" (c_i, L), or "text_emb" (c_i, L, D) + "text_mask".
      All examples share H, W, the text kind and its trailing shape.
    bin_chunks: chunks per bin; sum(c_i) must not exceed it.
    frames_per_chunk: F.

  Returns:
    "frames": uint8 (bin_chunks * F, H, W, 3), zero after the last example (or "latents" of
      the examples' dtype);
    "segment_ids": int32 (bin_chunks,), example k (1-based) on its chunks, 0 on padding;
    "chunk_positions": int32 (bin_chunks,), chunk index within its example, 0 on padding;
    with tokens: "text_tokens" int32 (bin_chunks, L), "text_mask" int32 (bin_chunks, L);
    with embeddings: "text_emb" float32 (bin_chunks, L, D), "text_mask" int32 (bin_chunks, L);
    padding chunks have zero text.
  """
  F = int(frames_per_chunk)
  if not examples:
    raise DataError("pack needs at least one example")
  kind = text_kind(examples[0])
  vkind, first = video_of(examples[0], "example 0")
  trail_v = first.shape[1:]
  chunks = []
  for k, ex in enumerate(examples):
    vk, fr = video_of(ex, f"example {k}")
    if vk != vkind or fr.dtype != first.dtype or fr.shape[1:] != trail_v:
      raise DataError(f"example {k}: {vk} {fr.dtype} {fr.shape} do not match example 0's "
                      f"{vkind} {first.dtype} (T, {', '.join(map(str, trail_v))})")
    if fr.shape[0] == 0 or fr.shape[0] % F:
      raise DataError(f"example {k}: {fr.shape[0]} frames are not a positive whole number of "
                      f"{F}-frame chunks")
    if text_kind(ex) != kind:
      raise DataError(f"example {k} carries text {text_kind(ex)}, example 0 carries {kind}")
    chunks.append(fr.shape[0] // F)
  if sum(chunks) > bin_chunks:
    raise DataError(f"examples of {chunks} chunks ({sum(chunks)}) do not fit a bin of "
                    f"{bin_chunks} chunks")
  out = {vkind: np.zeros((bin_chunks * F,) + trail_v, first.dtype),
         "segment_ids": np.zeros((bin_chunks,), np.int32),
         "chunk_positions": np.zeros((bin_chunks,), np.int32)}
  if kind is not None:
    trail = np.asarray(examples[0][kind]).shape[1:]
    dtype = np.int32 if kind == "text_tokens" else np.float32
    out[kind] = np.zeros((bin_chunks,) + trail, dtype)
    out["text_mask"] = np.zeros((bin_chunks,) + trail[:1], np.int32)
  c0 = 0
  for k, (ex, c) in enumerate(zip(examples, chunks)):
    out[vkind][c0 * F:(c0 + c) * F] = ex[vkind]
    out["segment_ids"][c0:c0 + c] = k + 1
    out["chunk_positions"][c0:c0 + c] = np.arange(c)
    if kind is not None:
      text, mask = np.asarray(ex[kind]), np.asarray(ex["text_mask"])
      if text.shape != (c,) + trail or mask.shape != (c,) + trail[:1]:
        raise DataError(f"example {k}: {kind} {text.shape} / text_mask {mask.shape} do not "
                        f"match its {c} chunks x {trail}")
      out[kind][c0:c0 + c] = text
      out["text_mask"][c0:c0 + c] = mask
    c0 += c
  return out
