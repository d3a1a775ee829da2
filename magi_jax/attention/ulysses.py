"""Ulysses (all-to-all, head-parallel) attention over the mesh's 'context' axis.

Activations arrive split by sequence. One all-to-all per tensor trades that for a split by
heads: each device then holds the whole sequence for 1/N of the heads and runs ordinary
blockwise attention with the full mask, and a last all-to-all gives the sequence split back.
Any mask works (block-causal, windows, packed rows, a KV cache with Sk != Sq), at the price of
needing the heads (per tensor shard) to divide by the context size. Communication per layer is
four all-to-alls of 1/N of an activation each, independent of N; ring attention moves the
keys/values N-1 times instead, but needs no head divisibility.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from magi_jax.attention.flash import flash_attention
from magi_jax.attention.masks import ChunkMask
from magi_jax.parallel.rules import axis_size, placement, split_axes

AXIS = "context"


def _local(q, k, v, ranges, *, q_block, scale, precision):
  seq_to_heads = functools.partial(jax.lax.all_to_all, axis_name=AXIS, split_axis=2,
                                   concat_axis=1, tiled=True)
  q, k, v = seq_to_heads(q), seq_to_heads(k), seq_to_heads(v)
  o = flash_attention(q, k, v, ChunkMask(ranges, q_block=q_block), scale=scale,
                          precision=precision)
  return jax.lax.all_to_all(o, AXIS, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(q, k, v, mask: ChunkMask, *, scale: float, precision=None, mesh=None):
  """The 'ulysses' backend: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, D).

  Falls back to the blockwise backend without a 'context' axis, or when the sequence lengths
  or the heads do not divide by it.
  """
  mesh, rules = placement(mesh)
  n = 1 if mesh is None or AXIS not in mesh.shape else mesh.shape[AXIS]
  if n == 1:
    return flash_attention(q, k, v, mask, scale=scale, precision=precision)
  B, Sq, Hq, _ = q.shape
  Sk, Hkv = k.shape[1], k.shape[2]
  heads = split_axes(rules, "act_heads", Hkv, mesh)
  t = axis_size(mesh, heads)
  if Sq % n or Sk % n or (Hq // t) % n:
    return flash_attention(q, k, v, mask, scale=scale, precision=precision)
  if (Hkv // t) % n:
    # Too few kv heads to split: give every query head its own copy (GQA -> MHA).
    k = jnp.repeat(k, Hq // Hkv, axis=2)
    v = jnp.repeat(v, Hq // Hkv, axis=2)
  batch = split_axes(rules, "batch", B, mesh)
  s_act = P(batch, AXIS, heads, None)
  body = functools.partial(_local, q_block=mask.q_block, scale=float(scale), precision=precision)
  # check_vma off: the blockwise kernel the body runs (attention/tiles.py, written for one
  # device) starts its running max / sum / output as mesh-invariant constants and carries them
  # through a lax.switch whose skipped-tile branch returns them unchanged, so under the
  # varying-manual-axes check the branches' types differ and tracing fails.
  return jax.shard_map(body, mesh=mesh, in_specs=(s_act, s_act, s_act, P(batch, None, None)),
                       out_specs=s_act, check_vma=False)(q, k, v, mask.kv_ranges)
