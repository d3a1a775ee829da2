"""Splash-attention backend: MAGI-1's block-causal self-attention on the Pallas TPU kernel.

`splash_attention` has the backend signature of `magi_jax.attention` (q (B, S, Hq, D),
k/v (B, S, Hkv, D), a `ChunkMask`) and runs `jax.experimental.pallas.ops.tpu.splash_attention`.
The kernel wants its mask static (it is turned into a block-sparsity table at trace time),
while MAGI's `kv_ranges` are arrays, so the mask is split in two:

* static: the block-causal pattern at chunk granularity, `BlockCausalMask` - query chunk i
  sees key chunks 0..i with full attention inside a chunk (`q_block` tokens per chunk). Only
  (S, q_block) decide it, so it is built at trace time; the kernel computes it in place
  (no S x S array) and skips the key blocks above the chunk diagonal.
* dynamic: splash's `segment_ids`, derived from the traced `kv_ranges`. A chunk's segment id
  is its range start `lo`, and a key's segment id is the `lo` of the chunk that the key
  belongs to. A query then sees the keys of chunks j <= i with lo_j == lo_i.

Masks this covers exactly (Sk == Sq, and for every row b and chunk i, hi_i = (i + 1) q_block):

* block-causal self-attention with unlimited window: lo_i = 0 for every chunk;
* packed training rows (several videos in one row, `magi_jax.train.segments`): each chunk
  sees the keys from its segment's first token to its own end, lo_i = start of its segment;
  padding chunks that see only themselves are one-chunk segments (lo_i = i q_block).

Formally: lo_0 = 0 and each lo_i is either i q_block (chunk i starts a segment) or lo_{i-1}
(chunk i continues the previous chunk's segment).

Masks it does not cover:

* sliding-window kv ranges (kv-range width r >= 2 in MAGI's config, once chunk i > r - 1),
  whose start lies inside the segment without being the previous chunk's start: chunk i
  would need a start that moves with i, which is not a segment (use the blockwise or
  dot_product backends). Width r = 1 (each chunk sees only itself) is covered: one-chunk
  segments;
* Sk != Sq: a KV cache in front of the current chunks (inference) or cross-attention to
  caption tokens - the static mask is square.

When `kv_ranges` are concrete (not tracers), they are validated and an unsupported mask
raises ValueError naming the chunk and the problem. Under `jit` they are tracers and cannot
be checked: the caller promises the contract above. A mask outside it is silently replaced
by "chunks j <= i whose range starts at the same lo" (a 2-chunk sliding window, for instance,
becomes "each chunk sees only itself"): wrong results, no error. Sk != Sq is a shape and
always raises.

Numerics: q is multiplied by `scale` in q's dtype before the kernel (splash does not scale).
The kernel's matmuls accumulate in float32; unlike `reference_attention` it does not round
the probabilities to v's dtype before the value product, so bf16 results differ from the
reference at bf16 rounding level; float32 results agree to float32 rounding. `precision` is
accepted for the backend signature and ignored (the kernel picks its own matmul precision).
Every query sees at least its own chunk, so there are no empty softmax rows.

Layout: splash works on one batch element in heads-major (H, S, D); we transpose and `vmap`
over the batch. Grouped-query attention uses the MHA kernel's native grouping (query head h
reads kv head h // (Hq // Hkv), as in the reference). S is padded up to the kernel block
size; padded tokens get segment id -1, so they only see each other and are cut off after.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from magi_jax.attention.masks import ChunkMask

PAD_SEGMENT = -1
_LANES = 128


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


def _concrete(x):
  """x as a numpy array, or None when it is a tracer (under jit / grad / vmap)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_supported(mask: ChunkMask, num_queries: int, num_keys: int) -> None:
  """Raises ValueError unless splash can express `mask` exactly (see the module docstring).

  The shape condition (Sk == Sq) is always checked; the kv_ranges only when concrete.
  """
  if num_keys != num_queries:
    raise ValueError(
        f"splash attention needs self-attention over the same tokens (Sk == Sq); got "
        f"Sq={num_queries}, Sk={num_keys} (a KV cache or cross-attention). Its static mask "
        "is square; use another attention backend for this call.")
  if num_queries != mask.num_q_blocks * mask.q_block:
    raise ValueError(f"mask covers {mask.num_q_blocks} x {mask.q_block} queries, q has "
                     f"{num_queries}")
  r = _concrete(mask.kv_ranges)
  if r is None:
    return
  qb = mask.q_block
  nq = r.shape[1]
  for b in range(r.shape[0]):
    prev_lo = None
    for i in range(nq):
      lo, hi = int(r[b, i, 0]), int(r[b, i, 1])
      start, end = i * qb, (i + 1) * qb
      if hi != end:
        why = ("it sees keys past its own chunk (not causal, or a KV-cache layout)" if hi > end
               else "it does not see the whole of its own chunk")
        raise ValueError(
            f"splash attention supports block-causal masks only: chunk {i} of row {b} has kv "
            f"range [{lo}, {hi}) but must end at its own end {end}; {why}.")
      if lo == start or lo == prev_lo:
        prev_lo = lo
        continue
      if prev_lo is not None and prev_lo < lo < start:
        problem = (f"a sliding-window kv range: its start {lo} lies inside the segment that "
                   f"began at {prev_lo}")
      else:
        problem = f"its start {lo} is neither a segment start nor the previous chunk's start"
      allowed = f"lo == {start}" + ("" if prev_lo is None else f" or lo == {prev_lo}")
      raise ValueError(
          f"splash attention supports block-causal and packed-segment masks only: chunk {i} "
          f"of row {b} has kv range [{lo}, {hi}), {problem}. A chunk must start a segment or "
          f"continue the previous chunk's ({allowed}).")


def supports(mask: ChunkMask, num_queries: int, num_keys: int) -> bool:
  """Whether this backend computes `mask` exactly: square self-attention whose ranges are
  promised (`mask.layout == "causal_segments"`) or, when concrete, checked to be block-causal segments."""
  if num_keys != num_queries or num_queries != mask.num_q_blocks * mask.q_block:
    return False
  if mask.layout == "causal_segments":
    return True
  if _concrete(mask.kv_ranges) is None:
    return False
  try:
    check_supported(mask, num_queries, num_keys)
  except ValueError:
    return False
  return True


def segment_ids(kv_ranges, q_block: int, padded_len: int):
  """(B, padded_len) int32 segment ids: token t gets the range start of its chunk t // q_block.

  Tokens past num_q_blocks * q_block (padding) get PAD_SEGMENT. Used for q and kv alike
  (Sk == Sq): a key's segment is the range start of the chunk the key belongs to.
  """
  lo = jnp.asarray(kv_ranges)[..., 0].astype(jnp.int32)                 # (B, nq)
  ids = jnp.repeat(lo, q_block, axis=1)                                  # (B, S)
  pad = padded_len - ids.shape[1]
  if pad < 0:
    raise ValueError(f"padded_len {padded_len} is shorter than the sequence {ids.shape[1]}")
  return jnp.pad(ids, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)


def effective_mask(mask: ChunkMask, padded_len: int | None = None) -> jax.Array:
  """(B, P, P) bool: what the kernel computes, static block-causal mask AND equal segment ids.

  P = padded_len (default the unpadded S). For a supported mask, [:, :S, :S] equals
  `dense_mask(mask, S)`.
  """
  S = mask.num_q_blocks * mask.q_block
  P = S if padded_len is None else padded_len
  static = jnp.asarray(BlockCausalMask((P, P), mask.q_block)[:, :])
  seg = segment_ids(mask.kv_ranges, mask.q_block, P)
  return static[None] & (seg[:, :, None] == seg[:, None, :])


def _default_block(S: int) -> int:
  """Largest of 512/256/128 that pads S no further than 128 does."""
  need = -(-S // _LANES) * _LANES
  for b in (512, 256, _LANES):
    if -(-S // b) * b == need:
      return b
  return _LANES


def default_block_sizes(S: int) -> splash.BlockSizes:
  b = _default_block(S)
  return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def _pad_multiple(bs: splash.BlockSizes) -> int:
  sizes = [bs.block_q, bs.block_kv, bs.block_kv_compute, bs.block_q_dkv, bs.block_kv_dkv,
           bs.block_kv_dkv_compute, bs.block_q_dq, bs.block_kv_dq]
  return math.lcm(*[int(s) for s in sizes if s is not None])


def splash_attention(q, k, v, mask: ChunkMask, *, scale: float, precision=None,
                     interpret: bool | None = None,
                     block_sizes: splash.BlockSizes | None = None):
  """Block-causal / packed-segment self-attention with the Pallas splash kernel.

  q (B, S, Hq, D), k/v (B, S, Hkv, D), Hq % Hkv == 0 -> (B, S, Hq, D). See the module
  docstring for the masks covered. `interpret` defaults to True off TPU (the kernel then runs
  in the Pallas interpreter: correct but slow). `block_sizes` (splash `BlockSizes`) defaults to
  square blocks of 512, 256 or 128 with backward blocks set, so `jax.grad` works; S is padded
  to a multiple of every block size.
  """
  del precision
  B, S, Hq, D = q.shape
  if k.ndim != 4 or v.shape[:3] != k.shape[:3] or k.shape[0] != B:
    raise ValueError(f"splash attention wants q (B,S,Hq,D), k/v (B,S,Hkv,D); got q{q.shape} "
                     f"k{k.shape} v{v.shape}")
  Hkv = k.shape[2]
  if Hq % Hkv:
    raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
  check_supported(mask, S, k.shape[1])
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  if block_sizes is None:
    block_sizes = default_block_sizes(S)
  m = _pad_multiple(block_sizes)
  P = -(-S // m) * m

  seg = segment_ids(mask.kv_ranges, mask.q_block, P)                     # (B, P)
  qs = (q * jnp.asarray(scale, q.dtype)).astype(q.dtype)
  pad = ((0, 0), (0, P - S), (0, 0), (0, 0))
  # heads-major per batch element: (B, H, P, D)
  qh, kh, vh = (jnp.transpose(jnp.pad(x, pad), (0, 2, 1, 3)) for x in (qs, k, v))

  static = splash_mask.MultiHeadMask([BlockCausalMask((P, P), mask.q_block)] * Hq)
  kernel = splash.make_splash_mha(static, block_sizes=block_sizes, head_shards=1,
                                  q_seq_shards=1, interpret=bool(interpret))

  def one(qb, kb, vb, sb):
    return kernel(qb, kb, vb, splash.SegmentIds(q=sb, kv=sb))

  out = jax.vmap(one)(qh, kh, vh, seg)                                   # (B, Hq, P, D)
  return jnp.transpose(out, (0, 2, 1, 3))[:, :S].astype(q.dtype)


__all__ = ["BlockCausalMask", "check_supported", "default_block_sizes", "effective_mask",
           "segment_ids", "splash_attention"]
