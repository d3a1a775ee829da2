"""Splash-attention backend: MAGI-1's attention masks on the Pallas TPU kernel.

`splash_attention` has the backend signature of `magi_jax.attention` (q (B, Sq, Hq, D), k/v
(B, Sk, Hkv, D), a `ChunkMask`) and runs `jax.experimental.pallas.ops.tpu.splash_attention`.
The kernel wants its mask static (turned into a block-sparsity table at trace time), while
MAGI's `kv_ranges` are arrays, often traced. `plan` decides, from shapes, the mask's static
`layout` promise and (when concrete) the ranges themselves, which of three exact encodings
runs; a mask none of them expresses raises ValueError, it is never replaced by another mask.

* "segments" (Sk == Sq; `layout="causal_segments"`, or concrete ranges checked to be such):
  static `BlockCausalMask` (query chunk i sees key chunks 0..i, full inside a chunk; computed
  in the kernel, no S x S array, blocks above the chunk diagonal skipped) AND splash
  `segment_ids` from the ranges: token t gets the range start `lo` of its chunk, so a query
  sees the keys of chunks j <= i with lo_j == lo_i. Exact when, for every row b and chunk i,
  hi_i = (i + 1) q_block and lo_i is either i q_block (chunk i starts a segment) or lo_{i-1}
  (it continues the previous chunk's): block-causal attention with unlimited window, packed
  training rows (`magi_jax.diffusion.segments`; padding chunks are one-chunk segments), and a
  window of one chunk. Traced ranges are taken on the layout's promise.
* "key_prefix" (one query block per row; `layout="key_prefix"`, or concrete ranges with one
  block per row): static `FullMask` AND segment ids q = 0, key = 0 inside the row's range
  [lo, hi), 1 outside: exactly `dense_mask` for any one range per row, Sk != Sq allowed
  (caption cross-attention, `caption_ranges`). Rows that see no key give zeros, as in
  `reference_attention`.
* "static" (concrete ranges identical for every batch row, 0 <= lo < hi <= Sk for every
  chunk): `ChunkRangeMask`, the per-chunk [lo, hi) as a mask the kernel computes in
  place, any Sk (a KV cache in front of the queries, sliding windows, non-causal ranges).
  Splash builds its block table in numpy at trace time, one mask evaluation per block:
  about 12 s for a 480p sampler-like step (Sq 18,720, Sk 37,440, 128-token blocks), cached
  per mask afterwards.

Concrete ranges with layout "general" try "segments", then "static", then "key_prefix".
Traced ranges with layout "general" raise ValueError: nothing can be checked, and guessing
would compute a different mask for, e.g., a sliding window. `supports` says whether a call
would run (the 'auto' backend asks it).

Meshes: inside `use_mesh` (`placement()` gives a mesh) the kernel runs under `jax.shard_map`
(a Mosaic kernel cannot be partitioned automatically): batch rows split over the rules'
"batch" axes and query heads over the "act_heads" axes, each where they divide
(`split_axes`), other mesh axes replicated, whole sequences on every device. A mesh that
splits the sequence (the rules' "length" axes, 'context' by default, > 1 device) raises
ValueError: use the 'ring' backend there ('auto' does). Grouped-query attention under a head
split: the contiguous block of Hq / t query heads on a shard reads exactly the contiguous
block of Hkv / t kv heads when t divides Hkv, so both are split by the same t; otherwise every
kv head is repeated r = lcm(Hkv, t) / Hkv times (the fewest copies whose count t divides),
which keeps query head h reading (a copy of) kv head h // (Hq / Hkv). The repeat happens
before the shard_map, on kv activations that the rules already leave unsplit over the head
axes in that case, so it moves no data between devices.

Numerics: q is multiplied by `scale` in q's dtype before the kernel (splash does not scale).
The kernel's matmuls accumulate in float32; unlike `reference_attention` it does not round the
probabilities to v's dtype before the value product, so bf16 results differ from the reference
at bf16 rounding level; float32 results agree to float32 rounding. `precision` is accepted for
the backend signature and ignored (the kernel picks its own matmul precision).

Layout: splash works on one batch element in heads-major (H, S, D); we transpose and `vmap`
over the (local) batch. GQA uses the kernel's native grouping (query head h reads kv head
h // (Hq // Hkv), as the reference does). Sq and Sk are padded up to the kernel block sizes;
padded queries are cut off after, and no real query sees a padded key.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from magi_jax.attention.masks import ChunkMask, concrete_ranges
from magi_jax.parallel.rules import axis_size, placement, split_axes, target_platform

PAD_SEGMENT = -1
_LANES = 128
KINDS = ("segments", "key_prefix", "static")


class BlockCausalMask(splash_mask._ComputableMask):  # pylint: disable=protected-access
  """Static splash mask: query token q sees key token k iff k // chunk <= q // chunk.

  Lazy (computed per block, and inside the kernel from the token indices) so long sequences
  never materialise an S x S array.
  """

  def __init__(self, shape: tuple[int, int], chunk: int):
    if chunk <= 0:
      raise ValueError(f"chunk must be positive, got {chunk}")
    self.chunk = int(chunk)
    c = self.chunk

    def block_causal(q_ids, kv_ids):
      return (q_ids // c) >= (kv_ids // c)

    super().__init__(shape=tuple(shape), mask_function=block_causal)

  def __eq__(self, other: object):
    if not isinstance(other, BlockCausalMask):
      return NotImplemented
    return self.shape == other.shape and self.chunk == other.chunk

  def __hash__(self):
    return hash((BlockCausalMask, self.shape, self.chunk))


class ChunkRangeMask(splash_mask._ComputableMask):  # pylint: disable=protected-access
  """Static splash mask from per-chunk key ranges: query token q of chunk
  c = min(q // chunk, n - 1) sees key token k iff lo_c <= k < hi_c.

  `ranges` is n (lo, hi) integer pairs. Query tokens past n chunks (block padding) take the
  last chunk's range, so no query row is empty when every range is non-empty. Computed per
  block and inside the kernel (a chain of n selects, no table lookup), so no Sq x Sk array.
  """

  def __init__(self, shape: tuple[int, int], chunk: int, ranges):
    if chunk <= 0:
      raise ValueError(f"chunk must be positive, got {chunk}")
    self.chunk = int(chunk)
    self.ranges = tuple((int(lo), int(hi)) for lo, hi in ranges)
    if not self.ranges:
      raise ValueError("ChunkRangeMask needs at least one chunk range")
    c, rs = self.chunk, self.ranges

    def chunk_ranges(q_ids, kv_ids):
      xp = np if isinstance(q_ids, np.ndarray) else jnp
      blk = xp.minimum(q_ids // c, len(rs) - 1)
      lo, hi = xp.zeros_like(blk), xp.zeros_like(blk)
      for i, (a, b) in enumerate(rs):
        lo = xp.where(blk == i, a, lo)
        hi = xp.where(blk == i, b, hi)
      return (kv_ids >= lo) & (kv_ids < hi)

    super().__init__(shape=tuple(shape), mask_function=chunk_ranges)

  def __eq__(self, other: object):
    if not isinstance(other, ChunkRangeMask):
      return NotImplemented
    return (self.shape, self.chunk, self.ranges) == (other.shape, other.chunk, other.ranges)

  def __hash__(self):
    return hash((ChunkRangeMask, self.shape, self.chunk, self.ranges))


class Plan(NamedTuple):
  """How a mask is encoded for the kernel: `kind` in KINDS; `ranges` the per-chunk (lo, hi)
  pairs of the "static" kind (None otherwise)."""
  kind: str
  ranges: tuple | None = None


def segments_problem(r: np.ndarray, q_block: int) -> str | None:
  """Why concrete ranges r (B, n, 2) are not causal segments (module docstring), or None."""
  for b in range(r.shape[0]):
    prev_lo = None
    for i in range(r.shape[1]):
      lo, hi = int(r[b, i, 0]), int(r[b, i, 1])
      start, end = i * q_block, (i + 1) * q_block
      if hi != end:
        why = ("it sees keys past its own chunk (not causal, or a KV-cache layout)" if hi > end
               else "it does not see the whole of its own chunk")
        return (f"chunk {i} of row {b} has kv range [{lo}, {hi}) but must end at its own end "
                f"{end}; {why}")
      if lo == start or lo == prev_lo:
        prev_lo = lo
        continue
      if prev_lo is not None and prev_lo < lo < start:
        problem = (f"a sliding-window kv range: its start {lo} lies inside the segment that "
                   f"began at {prev_lo}")
      else:
        problem = f"its start {lo} is neither a segment start nor the previous chunk's start"
      allowed = f"lo == {start}" + ("" if prev_lo is None else f" or lo == {prev_lo}")
      return (f"chunk {i} of row {b} has kv range [{lo}, {hi}), {problem}; a chunk must start "
              f"a segment or continue the previous chunk's ({allowed})")
  return None


def static_problem(r: np.ndarray, num_keys: int) -> str | None:
  """Why concrete ranges r (B, n, 2) cannot be one static mask (rows equal, every range
  non-empty inside [0, num_keys)), or None."""
  for b in range(1, r.shape[0]):
    if not np.array_equal(r[b], r[0]):
      i = int(np.flatnonzero(np.any(r[b] != r[0], axis=-1))[0])
      return (f"batch rows differ (chunk {i}: row 0 has [{int(r[0, i, 0])}, "
              f"{int(r[0, i, 1])}), row {b} has [{int(r[b, i, 0])}, {int(r[b, i, 1])})), and a "
              "static mask is one for every row")
  for i in range(r.shape[1]):
    lo, hi = int(r[0, i, 0]), int(r[0, i, 1])
    if not 0 <= lo < hi <= num_keys:
      return (f"chunk {i} has kv range [{lo}, {hi}), not a non-empty range inside the "
              f"{num_keys} keys")
  return None


def plan(mask: ChunkMask, num_queries: int, num_keys: int) -> Plan:
  """The exact kernel encoding of `mask` for Sq = num_queries, Sk = num_keys (module
  docstring); raises ValueError naming the problem when there is none."""
  nq, qb = mask.num_q_blocks, mask.q_block
  if num_queries != nq * qb:
    raise ValueError(f"mask covers {nq} x {qb} queries, q has {num_queries}")
  r = concrete_ranges(mask)
  if mask.layout == "causal_segments":
    if num_keys != num_queries:
      raise ValueError(f"a 'causal_segments' mask is self-attention over the same tokens "
                       f"(Sk == Sq); got Sq={num_queries}, Sk={num_keys}")
    problem = None if r is None else segments_problem(r, qb)
    if problem:
      raise ValueError(f"the ChunkMask promises layout 'causal_segments', but {problem}.")
    return Plan("segments")
  if mask.layout == "key_prefix":
    if nq != 1:
      raise ValueError(f"a 'key_prefix' mask has one query block per row; this one has {nq}")
    return Plan("key_prefix")
  if r is None:
    raise ValueError(
        "splash attention cannot express a ChunkMask with layout 'general' whose kv_ranges "
        "are traced (under jit / grad): its static mask must be known at trace time, and "
        "guessing would silently compute another mask (a sliding window, say). Build the "
        "mask with layout='causal_segments' or 'key_prefix' when the ranges are of that form, "
        "pass concrete (numpy) kv_ranges, or use the 'flash' backend.")
  seg = segments_problem(r, qb) if num_keys == num_queries else "Sk != Sq"
  if seg is None:
    return Plan("segments")
  stat = static_problem(r, num_keys)
  if stat is None:
    return Plan("static", tuple((int(lo), int(hi)) for lo, hi in r[0]))
  if nq == 1:
    return Plan("key_prefix")
  raise ValueError(
      f"splash attention cannot express these kv ranges exactly: not causal segments ({seg}), "
      f"and not one static mask ({stat}). Use the 'flash' backend.")


def check_supported(mask: ChunkMask, num_queries: int, num_keys: int) -> None:
  """Raises ValueError unless splash computes `mask` exactly (see `plan`)."""
  plan(mask, num_queries, num_keys)


def _sequence_split(mesh, rules) -> int:
  """Devices the rules' "length" axes split a sequence over on `mesh` (1: whole sequences)."""
  return max(axis_size(mesh, rules.spec(("length",))[0]), 1)


def supports(mask: ChunkMask, num_queries: int, num_keys: int) -> bool:
  """Whether `splash_attention` would run this call (under the active mesh) and compute
  `mask` exactly: `plan` finds an encoding (traced ranges need layout "causal_segments" or
  "key_prefix"), and the active mesh, if any, does not split the sequence."""
  mesh, rules = placement()
  if mesh is not None and _sequence_split(mesh, rules) > 1:
    return False
  try:
    plan(mask, num_queries, num_keys)
  except ValueError:
    return False
  return True


def segment_ids(kv_ranges, q_block: int, padded_len: int):
  """(B, padded_len) int32 segment ids of the "segments" kind: token t gets the range start
  of its chunk t // q_block; tokens past num_q_blocks * q_block (padding) get PAD_SEGMENT.
  Used for q and kv alike (Sk == Sq): a key's segment is that of the chunk it belongs to."""
  lo = jnp.asarray(kv_ranges)[..., 0].astype(jnp.int32)                 # (B, nq)
  ids = jnp.repeat(lo, q_block, axis=1)                                  # (B, S)
  pad = padded_len - ids.shape[1]
  if pad < 0:
    raise ValueError(f"padded_len {padded_len} is shorter than the sequence {ids.shape[1]}")
  return jnp.pad(ids, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)


def prefix_segment_ids(kv_ranges, num_keys: int, padded_q: int, padded_k: int):
  """(q ids (B, padded_q), kv ids (B, padded_k)) of the "key_prefix" kind: queries 0, keys 0
  inside the row's one range [lo, min(hi, num_keys)), 1 elsewhere (padded keys included)."""
  r = jnp.asarray(kv_ranges).astype(jnp.int32)[:, 0]                     # (B, 2)
  keys = jnp.arange(padded_k, dtype=jnp.int32)[None]
  hi = jnp.minimum(r[:, 1:], num_keys)
  seen = (keys >= r[:, :1]) & (keys < hi)
  q_ids = jnp.zeros((r.shape[0], padded_q), jnp.int32)
  return q_ids, jnp.where(seen, 0, 1).astype(jnp.int32)


def effective_mask(mask: ChunkMask, padded_len: int | None = None) -> jax.Array:
  """(B, P, P) bool: what the "segments" kernel computes, static block-causal mask AND equal
  segment ids. P = padded_len (default the unpadded S). For a mask of that kind, [:, :S, :S]
  equals `dense_mask(mask, S)`."""
  S = mask.num_q_blocks * mask.q_block
  P_ = S if padded_len is None else padded_len
  static = jnp.asarray(BlockCausalMask((P_, P_), mask.q_block)[:, :])
  seg = segment_ids(mask.kv_ranges, mask.q_block, P_)
  return static[None] & (seg[:, :, None] == seg[:, None, :])


def _default_block(S: int) -> int:
  """Largest of 512/256/128 that pads S no further than 128 does."""
  need = -(-S // _LANES) * _LANES
  for b in (512, 256, _LANES):
    if -(-S // b) * b == need:
      return b
  return _LANES


def default_block_sizes(num_queries: int, num_keys: int | None = None) -> splash.BlockSizes:
  """Forward and backward blocks (so `jax.grad` works): query-side blocks from Sq, key-side
  blocks from Sk (default Sk = Sq), each the largest of 512/256/128 that pads no further than
  a multiple of 128 does."""
  bq = _default_block(num_queries)
  bk = _default_block(num_queries if num_keys is None else num_keys)
  return splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                           block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                           block_kv_dq=bk)


def _padded(n: int, sizes) -> int:
  """n rounded up to a multiple of every block size in `sizes` (None entries ignored)."""
  m = math.lcm(*[int(s) for s in sizes if s is not None])
  return -(-n // m) * m


def padded_lengths(bs: splash.BlockSizes, num_queries: int, num_keys: int) -> tuple[int, int]:
  """(Pq, Pk): Sq and Sk padded to multiples of the query-side and key-side block sizes."""
  return (_padded(num_queries, (bs.block_q, bs.block_q_dkv, bs.block_q_dq)),
          _padded(num_keys, (bs.block_kv, bs.block_kv_compute, bs.block_kv_dkv,
                             bs.block_kv_dkv_compute, bs.block_kv_dq)))


def _static_mask(p: Plan, shape: tuple[int, int], q_block: int):
  if p.kind == "segments":
    return BlockCausalMask(shape, q_block)
  if p.kind == "key_prefix":
    return splash_mask.FullMask(shape)
  return ChunkRangeMask(shape, q_block, p.ranges)


def _local_attention(q, k, v, kv_ranges, *, p: Plan, q_block: int, scale: float,
                     block_sizes: splash.BlockSizes, interpret: bool):
  """Whole sequences of a batch / head share: q (b, Sq, h, D), k/v (b, Sk, hkv, D), kv_ranges
  (b, nq, 2) int32 -> (b, Sq, h, D); runs the kernel once per batch row."""
  _, Sq, h, _ = q.shape
  Sk = k.shape[1]
  Pq, Pk = padded_lengths(block_sizes, Sq, Sk)
  qs = (q * jnp.asarray(scale, q.dtype)).astype(q.dtype)
  heads_major = lambda x, n: jnp.transpose(jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))),
                                           (0, 2, 1, 3))
  qh, kh, vh = heads_major(qs, Pq - Sq), heads_major(k, Pk - Sk), heads_major(v, Pk - Sk)
  static = splash_mask.MultiHeadMask([_static_mask(p, (Pq, Pk), q_block)] * h)
  kernel = splash.make_splash_mha(static, block_sizes=block_sizes, head_shards=1,
                                  q_seq_shards=1, interpret=bool(interpret))
  if p.kind == "static":
    out = jax.vmap(kernel)(qh, kh, vh)
  else:
    if p.kind == "segments":
      q_ids, kv_ids = segment_ids(kv_ranges, q_block, Pq), segment_ids(kv_ranges, q_block, Pk)
    else:
      q_ids, kv_ids = prefix_segment_ids(kv_ranges, Sk, Pq, Pk)
    one = lambda a, b, c, qi, ki: kernel(a, b, c, splash.SegmentIds(q=qi, kv=ki))
    out = jax.vmap(one)(qh, kh, vh, q_ids, kv_ids)                       # (b, h, Pq, D)
  out = jnp.transpose(out, (0, 2, 1, 3))[:, :Sq]
  if p.kind == "key_prefix":
    lo, hi = kv_ranges[:, 0, 0], jnp.minimum(kv_ranges[:, 0, 1], Sk)
    out = jnp.where((hi > jnp.maximum(lo, 0))[:, None, None, None], out, 0)
  return out.astype(q.dtype)


def kv_heads_for_split(k, v, num_q_heads: int, head_split: int):
  """k/v with enough kv heads that `head_split` divides them, grouping kept (module
  docstring): unchanged when it already divides, else each head repeated lcm / Hkv times."""
  hkv = k.shape[2]
  if hkv % head_split == 0:
    return k, v
  r = math.lcm(hkv, head_split) // hkv
  if num_q_heads % (hkv * r):
    raise ValueError(f"{head_split} head shards do not divide {num_q_heads} query heads")
  return jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)


def splash_attention(q, k, v, mask: ChunkMask, *, scale: float, precision=None,
                     interpret: bool | None = None,
                     block_sizes: splash.BlockSizes | None = None):
  """Attention with the Pallas splash kernel for the masks `plan` encodes exactly.

  q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), Hq % Hkv == 0 -> (B, Sq, Hq, D). Raises ValueError
  for a mask it cannot express and for a mesh that splits the sequence (module docstring).
  Under an active mesh the kernel runs in a shard_map over batch and heads. `interpret`
  defaults to "the traced program is not for TPU" (`target_platform()`): the Pallas
  interpreter, correct but slow. `block_sizes` (splash `BlockSizes`, backward blocks
  included for `jax.grad`) defaults to `default_block_sizes(Sq, Sk)`; Sq and Sk are padded
  to multiples of the query-side and key-side blocks.
  """
  del precision
  B, Sq, Hq, _ = q.shape
  if k.ndim != 4 or v.shape[:3] != k.shape[:3] or k.shape[0] != B:
    raise ValueError(f"splash attention wants q (B,S,Hq,D), k/v (B,S,Hkv,D); got q{q.shape} "
                     f"k{k.shape} v{v.shape}")
  Sk, Hkv = k.shape[1], k.shape[2]
  if Hq % Hkv:
    raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
  p = plan(mask, Sq, Sk)
  if interpret is None:
    interpret = target_platform() != "tpu"
  if block_sizes is None:
    block_sizes = default_block_sizes(Sq, Sk)
  body = functools.partial(_local_attention, p=p, q_block=mask.q_block, scale=float(scale),
                           block_sizes=block_sizes, interpret=bool(interpret))
  ranges = jnp.asarray(mask.kv_ranges).astype(jnp.int32)
  mesh, rules = placement()
  if mesh is None:
    return body(q, k, v, ranges)
  n_seq = _sequence_split(mesh, rules)
  if n_seq > 1:
    raise ValueError(
        f"splash attention needs whole sequences on every device, but the mesh splits the "
        f"sequence over {rules.spec(('length',))[0]} ({n_seq} devices); use the 'ring' "
        "backend (or 'auto', which picks it on such meshes).")
  batch = split_axes(rules, "batch", B, mesh)
  heads = split_axes(rules, "act_heads", Hq, mesh)
  k, v = kv_heads_for_split(k, v, Hq, axis_size(mesh, heads))
  act = P(batch, None, heads, None)
  # check_vma off: the Pallas splash kernel declares its outputs as ShapeDtypeStructs without a
  # manual_axis_type, which the varying-manual-axes check refuses. The body uses no collective:
  # every shard computes its own batch rows and heads.
  return jax.shard_map(body, mesh=mesh, in_specs=(act, act, act, P(batch, None, None)),
                       out_specs=act, check_vma=False)(q, k, v, ranges)


__all__ = ["BlockCausalMask", "ChunkRangeMask", "KINDS", "Plan", "check_supported",
           "default_block_sizes", "effective_mask", "kv_heads_for_split", "padded_lengths",
           "plan", "prefix_segment_ids", "segment_ids", "segments_problem", "splash_attention",
           "static_problem", "supports"]
