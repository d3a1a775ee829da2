"""The self-attention KV cache of clean chunks, bounded by the kv range.

`KVCache` is what one forward call reads: the keys (after q/k norm and RoPE) and values of
the chunks just before the call's first chunk, for every layer. `KVCacheStore` keeps at most
`capacity_chunks` chunks: a chunk can only be seen by chunks less than `max kv range` after
it, so older chunks are dropped and peak memory does not grow with the video length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from magi_jax.errors import MagiError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  k: jax.Array        # (layers, N, S_cache, kv_groups, head_dim)
  v: jax.Array

  @property
  def num_tokens(self) -> int:
    return self.k.shape[2]


class CacheError(MagiError, ValueError):
  """A call needs cached chunks that are not (or no longer) in the store."""


@dataclasses.dataclass
class KVCacheStore:
  """Host-side bookkeeping of cached chunks [first_chunk, first_chunk + num_chunks)."""

  capacity_chunks: int
  tokens_per_chunk: int
  first_chunk: int = 0
  data: KVCache | None = None

  def __post_init__(self):
    if self.capacity_chunks < 1:
      raise ValueError(f"capacity_chunks must be >= 1, got {self.capacity_chunks}")

  @property
  def num_chunks(self) -> int:
    return 0 if self.data is None else self.data.num_tokens // self.tokens_per_chunk

  @property
  def end_chunk(self) -> int:
    return self.first_chunk + self.num_chunks

  def read(self, slice_point: int, num_chunks: int) -> KVCache | None:
    """The cached chunks [slice_point - num_chunks, slice_point) (None if num_chunks == 0)."""
    if num_chunks == 0:
      return None
    lo = slice_point - num_chunks
    if lo < self.first_chunk or slice_point > self.end_chunk:
      raise CacheError(f"chunks [{lo}, {slice_point}) are needed but the cache holds "
                       f"[{self.first_chunk}, {self.end_chunk}) (capacity "
                       f"{self.capacity_chunks} chunks)")
    a = (lo - self.first_chunk) * self.tokens_per_chunk
    b = (slice_point - self.first_chunk) * self.tokens_per_chunk
    if a == 0 and b == self.data.num_tokens:
      return self.data                      # the whole store: no copy of the cache
    return KVCache(self.data.k[:, :, a:b], self.data.v[:, :, a:b])

  def write(self, slice_point: int, new: KVCache) -> None:
    """Stores the call's chunks [slice_point, slice_point + n), replacing what was there."""
    tokens_per_chunk = self.tokens_per_chunk
    if new.num_tokens % tokens_per_chunk:
      raise CacheError(f"{new.num_tokens} tokens is not a whole number of {tokens_per_chunk}-token "
                       "chunks")
    if self.data is None:
      first, k, v = slice_point, new.k, new.v
    else:
      if slice_point < self.first_chunk or slice_point > self.end_chunk:
        raise CacheError(f"writing at chunk {slice_point} would leave a gap in the cache "
                         f"[{self.first_chunk}, {self.end_chunk})")
      keep = (slice_point - self.first_chunk) * tokens_per_chunk
      k = jnp.concatenate([self.data.k[:, :, :keep], new.k.astype(self.data.k.dtype)], axis=2)
      v = jnp.concatenate([self.data.v[:, :, :keep], new.v.astype(self.data.v.dtype)], axis=2)
      first = self.first_chunk
    n = k.shape[2] // tokens_per_chunk
    drop = max(0, n - self.capacity_chunks)
    self.first_chunk = first + drop
    self.data = KVCache(k[:, :, drop * tokens_per_chunk:], v[:, :, drop * tokens_per_chunk:])

  def nbytes(self) -> int:
    return 0 if self.data is None else self.data.k.nbytes + self.data.v.nbytes
