"""Ring attention over the mesh's 'context' axis for MAGI's block-causal masks.

Every device holds a slice of the queries and of the keys/values; the key/value slices travel
once around the ring (`ppermute`) while each device folds them into an online softmax (float32)
for its queries. Backward is a second trip around the ring that carries dK/dV home with the
keys/values (custom VJP), so no device ever holds more than its own slice plus one in transit.

Balance and skipping (zig-zag placement). The sequence is cut into 2N groups of whole chunks
and device d holds groups d and 2N-1-d. MAGI's self-attention masks never let a chunk see a
later chunk, so at ring step s > 0 exactly half of the (query group, key group) pairs can be
visible on every device: all queries against the front key group when the keys came from an
earlier device, the back query group against both key groups otherwise. The step computes just
those two pairs (the choice is a `lax.cond` between two equal-cost branches), so the skipped
half is absent from the compiled program and every device does the same work. Step 0 computes
3 of its 4 pairs. Inside a pair, (query block, key block) tiles that no query can see (sliding
windows, other videos of a packed row) are skipped at run time.

Contract: the masks are causal at chunk granularity (no query sees a key beyond the end of its
own chunk) — true of every self-attention mask the DiT builds. Concrete masks are checked.
The activations stay split contiguously over 'context' (as the rest of the model has them);
inside the shard_map two point-to-point exchanges of half a slice deal them into zig-zag order
and two more deal the output back, so no device ever holds more than its slice.

Under `lax.scan` over layers, pass the mask's ranges in as a scanned input (`xs`), not as a
closed-over value: closed over, JAX differentiates the forward's loops instead of using the
custom VJP and keeps every tile's probabilities (measured: 92 MiB of temporaries instead of 30
for two scanned layers of 1K tokens per device; the DiT's layer scan, magi_jax/models/stack.py,
does it right).

When the chunk count is not a multiple of 2N the layout falls back to contiguous slices with
run-time skipping only (correct, not balanced); a key/value cache (Sk != Sq) or a mesh without a
'context' axis falls back to the flash backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax.sharding import PartitionSpec as P

from magi_jax.attention.flash import flash_attention, token_ranges
from magi_jax.attention.masks import ChunkMask, concrete_ranges
from magi_jax.attention import tiles as flash
from magi_jax.parallel.rules import placement, split_axes

AXIS = "context"
F32 = jnp.float32


def zigzag_order(num_groups: int) -> np.ndarray:
  """Group order that puts groups d and 2N-1-d next to each other (device d's slice)."""
  ring_size = num_groups // 2
  front = np.arange(ring_size)
  return np.stack([front, 2 * ring_size - 1 - front], axis=1).reshape(-1)


def device_work(num_chunks: int, num_devices: int, layout: str) -> np.ndarray:
  """Visible (query chunk, key chunk) pairs per device for a causal chunk layout."""
  groups = 2 * num_devices if layout == "zigzag" else num_devices
  per = num_chunks // groups
  order = zigzag_order(groups) if layout == "zigzag" else np.arange(groups)
  owner = np.repeat(np.arange(num_devices), groups // num_devices)
  work = np.zeros(num_devices, np.int64)
  for pos, g in enumerate(order):
    chunks = np.arange(g * per, (g + 1) * per)
    work[owner[pos]] += sum(c + 1 for c in chunks)
  return work


def _check_causal(mask: ChunkMask):
  r = concrete_ranges(mask)
  if r is None:
    return
  ends = (np.arange(r.shape[1]) + 1) * mask.q_block
  if np.any(r[..., 1] > ends[None]):
    raise ValueError("ring attention needs causal chunk masks (no chunk sees keys past its own "
                     f"end); kv_ranges {r.tolist()} with {mask.q_block} tokens per chunk do not")


def _geometry(S_local, layout):
  groups = 2 if layout == "zigzag" else 1
  return groups, S_local // groups


def _group_starts(dev, ring_size, group_tokens, layout):
  """Global start positions of device `dev`'s groups."""
  if layout == "zigzag":
    return [dev * group_tokens, (2 * ring_size - 1 - dev) * group_tokens]
  return [dev * group_tokens]


def _slabs(x, groups, group_tokens):
  return [x[:, i * group_tokens:(i + 1) * group_tokens] for i in range(groups)]


def _visible_pairs(layout, skip, step, groups):
  """Static (branch_a, branch_b) pair lists; branch_a is used when the source is earlier."""
  everything = [(a, b) for a in range(groups) for b in range(groups)]
  if not skip or layout != "zigzag":
    return everything, everything
  if step == 0:
    return [(0, 0), (1, 0), (1, 1)], [(0, 0), (1, 0), (1, 1)]
  return [(0, 0), (1, 0)], [(1, 0), (1, 1)]


def _fold(q_slabs, lo_slabs, hi_slabs, k, v, carries, pairs, starts, group_tokens, kw):
  k_slabs, v_slabs = _slabs(k, len(starts), group_tokens), _slabs(v, len(starts), group_tokens)
  carries = list(carries)
  for a, b in pairs:
    carries[a] = flash.forward(q_slabs[a], k_slabs[b], v_slabs[b], lo_slabs[a], hi_slabs[a],
                               starts[b], carries[a], **kw)
  return tuple(carries)


def _step_fn(static_step, layout, skip, groups, group_tokens, ring_size, ring_position, kw):
  """(q, lo, hi) slabs + visiting k/v from `src` -> carries; a cond when the branches differ."""
  def run(q_s, lo_s, hi_s, k, v, carries, src):
    starts = _group_starts(src, ring_size, group_tokens, layout)
    pa, pb = _visible_pairs(layout, skip, static_step, groups)
    fa = lambda c: _fold(q_s, lo_s, hi_s, k, v, c, pa, starts, group_tokens, kw)
    if pa == pb:
      return fa(carries)
    fb = lambda c: _fold(q_s, lo_s, hi_s, k, v, c, pb, starts, group_tokens, kw)
    return jax.lax.cond(src < ring_position, fa, fb, carries)
  return run


def _owner(g: int, ring_size: int) -> int:
  """The device that holds natural group g (of 2·ring_size) under zig-zag placement."""
  return g if g < ring_size else 2 * ring_size - 1 - g


def to_zigzag(x, ring_size: int):
  """Inside shard_map: this device's contiguous slice (natural groups 2d, 2d+1 on axis 1) ->
  its zig-zag slice (groups d, 2·ring_size-1-d). Two point-to-point exchanges of half a slice
  each, so nothing is gathered: group 2d goes to its owner, and so does group 2d+1."""
  half = x.shape[1] // 2
  first, second = x[:, :half], x[:, half:]
  devices = range(ring_size)
  from_even = jax.lax.ppermute(first, AXIS, [(d, _owner(2 * d, ring_size)) for d in devices])
  from_odd = jax.lax.ppermute(second, AXIS, [(d, _owner(2 * d + 1, ring_size)) for d in devices])
  # Device e's front group e is even exactly when e is; the other one is its back group.
  even = jax.lax.axis_index(AXIS) % 2 == 0
  return jnp.concatenate([jnp.where(even, from_even, from_odd),
                          jnp.where(even, from_odd, from_even)], axis=1)


def from_zigzag(x, ring_size: int):
  """The inverse of `to_zigzag`."""
  half = x.shape[1] // 2
  front, back = x[:, :half], x[:, half:]
  even = jax.lax.axis_index(AXIS) % 2 == 0
  to_even, to_odd = jnp.where(even, front, back), jnp.where(even, back, front)
  devices = range(ring_size)
  first = jax.lax.ppermute(to_even, AXIS, [(_owner(2 * d, ring_size), d) for d in devices])
  second = jax.lax.ppermute(to_odd, AXIS, [(_owner(2 * d + 1, ring_size), d) for d in devices])
  return jnp.concatenate([first, second], axis=1)


def _rotate(x, ring_size):
  return jax.lax.ppermute(x, AXIS, [(i, (i + 1) % ring_size) for i in range(ring_size)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def _ring_core(q, k, v, lo, hi, layout, skip, scale, block_q, block_k, unroll, precision):
  return _ring_fwd(q, k, v, lo, hi, layout, skip, scale, block_q, block_k, unroll,
                   precision)[0]


def _ring_fwd(q, k, v, lo, hi, layout, skip, scale, block_q, block_k, unroll, precision):
  ring_size = jax.lax.axis_size(AXIS)
  ring_position = jax.lax.axis_index(AXIS)
  groups, group_tokens = _geometry(q.shape[1], layout)
  kw = dict(scale=scale, block_q=block_q, block_k=block_k, skip=skip, unroll=unroll,
            precision=precision)
  q_s, lo_s, hi_s = (_slabs(x, groups, group_tokens) for x in (q, lo, hi))
  carries = tuple(flash.init_carry(x) for x in q_s)
  first = _step_fn(0, layout, skip, groups, group_tokens, ring_size, ring_position, kw)
  carries = first(q_s, lo_s, hi_s, k, v, carries, ring_position)
  if ring_size > 1:
    later = _step_fn(1, layout, skip, groups, group_tokens, ring_size, ring_position, kw)

    def body(c, s):
      carries, k, v = c
      k, v = _rotate(k, ring_size), _rotate(v, ring_size)
      src = (ring_position - s) % ring_size
      return (later(q_s, lo_s, hi_s, k, v, carries, src), k, v), None

    (carries, _, _), _ = jax.lax.scan(body, (carries, k, v), jnp.arange(1, ring_size),
                                      unroll=unroll)
  outs, lses = zip(*(flash.finish(c, q.dtype) for c in carries))
  out = jnp.concatenate(outs, axis=1)
  lse = jnp.concatenate(lses, axis=-1)
  return out, (q, k, v, lo, hi, out, lse)


def _bwd_fold(q_s, do_s, lse_s, delta_s, lo_s, hi_s, k, v, dq_s, dk, dv, pairs, starts,
              group_tokens, kw):
  groups = len(starts)
  k_s, v_s = _slabs(k, groups, group_tokens), _slabs(v, groups, group_tokens)
  dk_s, dv_s = _slabs(dk, groups, group_tokens), _slabs(dv, groups, group_tokens)
  dq_s = list(dq_s)
  for a, b in pairs:
    dq_s[a], dkb, dvb = flash.backward(q_s[a], k_s[b], v_s[b], do_s[a], lse_s[a], delta_s[a],
                                       lo_s[a], hi_s[a], starts[b], dq_s[a], **kw)
    dk_s[b] = dk_s[b] + dkb
    dv_s[b] = dv_s[b] + dvb
  return tuple(dq_s), jnp.concatenate(dk_s, axis=1), jnp.concatenate(dv_s, axis=1)


def _ring_bwd(layout, skip, scale, block_q, block_k, unroll, precision, res, do):
  q, k, v, lo, hi, out, lse = res
  ring_size = jax.lax.axis_size(AXIS)
  ring_position = jax.lax.axis_index(AXIS)
  groups, group_tokens = _geometry(q.shape[1], layout)
  kw = dict(scale=scale, block_q=block_q, block_k=block_k, skip=skip, unroll=unroll,
            precision=precision)
  delta = jnp.einsum("bshgd,bshgd->bhgs", do.astype(F32), out.astype(F32))
  q_s, do_s = _slabs(q, groups, group_tokens), _slabs(do, groups, group_tokens)
  lo_s, hi_s = _slabs(lo, groups, group_tokens), _slabs(hi, groups, group_tokens)
  split_r = lambda x: [x[..., i * group_tokens:(i + 1) * group_tokens] for i in range(groups)]
  lse_s, delta_s = split_r(lse), split_r(delta)
  dq_s = tuple(jnp.zeros(x.shape, F32) for x in q_s)
  dk = jnp.zeros(k.shape, F32)
  dv = jnp.zeros(v.shape, F32)

  def step(static_step, dq_s, k, v, dk, dv, src):
    starts = _group_starts(src, ring_size, group_tokens, layout)
    pa, pb = _visible_pairs(layout, skip, static_step, groups)
    fold = lambda pairs: (lambda a: _bwd_fold(q_s, do_s, lse_s, delta_s, lo_s, hi_s, k, v,
                                              *a, pairs, starts, group_tokens, kw))
    if pa == pb:
      return fold(pa)((dq_s, dk, dv))
    return jax.lax.cond(src < ring_position, fold(pa), fold(pb), (dq_s, dk, dv))

  dq_s, dk, dv = step(0, dq_s, k, v, dk, dv, ring_position)
  if ring_size > 1:
    def body(c, s):
      dq_s, k, v, dk, dv = c
      k, v, dk, dv = (_rotate(x, ring_size) for x in (k, v, dk, dv))
      dq_s, dk, dv = step(1, dq_s, k, v, dk, dv, (ring_position - s) % ring_size)
      return (dq_s, k, v, dk, dv), None

    (dq_s, _, _, dk, dv), _ = jax.lax.scan(body, (dq_s, k, v, dk, dv), jnp.arange(1, ring_size),
                                           unroll=unroll)
    dk, dv = _rotate(dk, ring_size), _rotate(dv, ring_size)   # the last hop brings them home
  dq = jnp.concatenate(dq_s, axis=1)
  zeros_int = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros_int(lo),
          zeros_int(hi))


_ring_core.defvjp(lambda *a: _ring_fwd(*a), _ring_bwd)


def ring_attention(q, k, v, mask: ChunkMask, *, scale: float, precision=None, mesh=None,
                   layout: str = "auto", skip: bool = True, block_q: int = 512,
                   block_k: int = 512, unroll: bool = False):
  """The 'ring' backend: q (B, S, Hq, D), k/v (B, S, Hkv, D) -> (B, S, Hq, D).

  layout: 'zigzag' (balanced; needs the chunk count to be a multiple of 2N), 'contiguous',
  or 'auto' (zig-zag when it fits). skip=False computes every pair (the FLOP baseline).
  unroll=True unrolls the loops so XLA's cost analysis counts every iteration.
  """
  mesh, rules = placement(mesh)
  B, S, Hq, D = q.shape
  ring_size = 1 if mesh is None or AXIS not in mesh.shape else mesh.shape[AXIS]
  if ring_size == 1 or k.shape[1] != S or mask.num_q_blocks % ring_size:
    return flash_attention(q, k, v, mask, scale=scale, precision=precision)
  _check_causal(mask)
  chunks = mask.num_q_blocks
  if layout == "auto":
    layout = "zigzag" if chunks % (2 * ring_size) == 0 else "contiguous"
  if layout == "zigzag" and chunks % (2 * ring_size):
    raise ValueError(f"zig-zag placement needs the chunk count ({chunks}) to be a multiple of "
                     f"2 x context ({2 * ring_size})")
  if layout not in ("zigzag", "contiguous"):
    raise ValueError(f"ring layout must be zigzag | contiguous | auto, got {layout!r}")
  Hkv = k.shape[2]
  G = Hq // Hkv
  lo, hi = token_ranges(mask)
  qg = rearrange(q, "b s (h g) d -> b s h g d", g=G)
  batch = split_axes(rules, "batch", B, mesh)
  heads = split_axes(rules, "act_heads", Hkv, mesh)
  sq, skv, sr = P(batch, AXIS, heads, None, None), P(batch, AXIS, heads, None), P(batch, AXIS)
  def body(q_, k_, v_, lo_, hi_):
    if layout == "zigzag":       # the sequence arrives split contiguously; re-deal it locally
      q_, k_, v_, lo_, hi_ = (to_zigzag(x, ring_size) for x in (q_, k_, v_, lo_, hi_))
    o = _ring_core(q_, k_, v_, lo_, hi_, layout, skip, float(scale), block_q, block_k, unroll,
                   precision)
    return from_zigzag(o, ring_size) if layout == "zigzag" else o

  # check_vma=False: the tile loop shared with the local flash backend (attention/tiles.py)
  # starts its online-softmax carry from constants, which the check types as replicated, and
  # its skip `lax.switch` returns that carry in one branch and a per-device (varying) one in the
  # others; with the check on, tracing fails ("switch branches must have equal output types").
  out = jax.shard_map(body, mesh=mesh, in_specs=(sq, skv, skv, sr, sr), out_specs=sq,
                      check_vma=False)(qg, k, v, lo, hi)
  return rearrange(out, "b s h g d -> b s (h g) d")
