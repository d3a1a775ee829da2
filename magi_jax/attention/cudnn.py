"""The 'cudnn' backend: cuDNN's fused flash attention (`jax.nn.dot_product_attention`) on GPUs.

cuDNN takes no arbitrary mask, only per-row key lengths (`key_value_seq_lengths`), so each
query chunk is given its own contiguous key range, in one of three exact encodings:

* static ranges (numpy `kv_ranges`, the same for every batch row: a sampler step's window
  plan): chunk i attends to the static slice k[:, lo:hi]; consecutive chunks with the same
  range share one call;
* layout "causal_segments" (traced ranges, Sk == Sq: packed training rows): chunk i's range
  ends at its own end e_i (static) and starts at its segment's start (traced). Its keys
  k[:, :e_i] are reversed, so the visible ones come first, and cuDNN sees
  `key_value_seq_lengths = e_i - start`. Softmax attention is a sum over keys, so the order of
  the keys does not change the result;
* layout "key_prefix" (one query block per row seeing keys [0, n_row): caption
  cross-attention): `key_value_seq_lengths = n_row`; rows with no key give zeros.

Anything else (traced ranges with layout "general") raises: `supports` says beforehand, and
'auto' then runs 'flash'. cuDNN needs bf16 / fp16 inputs; on a CPU host the same code runs
with XLA's implementation (`implementation=None`), which is how the tests check its masks, but
that materialises each chunk's scores, so 'auto' picks this backend only for GPU targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from magi_jax.attention.masks import ChunkMask, concrete_ranges

DTYPES = (jnp.bfloat16, jnp.float16)


def plan(mask: ChunkMask, num_queries: int, num_keys: int) -> str:
  """'static', 'segments' or 'prefix': the exact encoding of `mask`; ValueError if none."""
  if num_queries != mask.num_q_blocks * mask.q_block:
    raise ValueError(f"mask covers {mask.num_q_blocks} x {mask.q_block} queries, q has "
                     f"{num_queries}")
  r = concrete_ranges(mask)
  if r is not None and (r == r[:1]).all():
    if ((r[0, :, 0] < 0) | (r[0, :, 1] > num_keys) | (r[0, :, 0] > r[0, :, 1])).any():
      raise ValueError(f"kv ranges {r[0].tolist()} leave the {num_keys} keys")
    return "static"
  if mask.layout == "causal_segments":
    if num_keys != num_queries:
      raise ValueError(f"a 'causal_segments' mask is self-attention (Sk == Sq); got "
                       f"Sq={num_queries}, Sk={num_keys}")
    if r is not None:
      ends = (np.arange(mask.num_q_blocks) + 1) * mask.q_block
      if not (r[..., 1] == ends).all():
        raise ValueError("the ChunkMask promises layout 'causal_segments', but a chunk's range "
                         "does not end at its own end")
    return "segments"
  if mask.layout == "key_prefix":
    if mask.num_q_blocks != 1:
      raise ValueError(f"a 'key_prefix' mask has one query block per row; this one has "
                       f"{mask.num_q_blocks}")
    if r is not None and (r[:, 0, 0] != 0).any():
      raise ValueError("a 'key_prefix' mask's ranges start at key 0")
    return "prefix"
  raise ValueError(
      "cudnn attention cannot express a ChunkMask with layout 'general' whose kv_ranges are "
      "traced (or differ between batch rows): cuDNN takes key lengths, not ranges. Build the "
      "mask with layout 'causal_segments' / 'key_prefix', pass static (numpy) ranges, or use "
      "the 'flash' backend.")


def supports(q, k, mask: ChunkMask) -> bool:
  """Whether `cudnn_attention` computes `mask` exactly for these inputs on a GPU."""
  if q.dtype not in DTYPES or q.shape[-1] % 8 or q.shape[-1] > 256:
    return False
  try:
    plan(mask, q.shape[1], k.shape[1])
  except ValueError:
    return False
  return True


def _default_implementation():
  from magi_jax.parallel.rules import target_platform
  return "cudnn" if target_platform() == "gpu" else None


def cudnn_attention(q, k, v, mask: ChunkMask, *, scale: float, precision=None,
                    implementation: str | None = "auto"):
  """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, D); masks as the module says.

  implementation: 'auto' (cuDNN on a GPU target, XLA elsewhere), 'cudnn', 'xla' or None.
  """
  del precision                            # cuDNN computes in the inputs' dtype, fp32 accumulate
  if implementation == "auto":
    implementation = _default_implementation()
  kind = plan(mask, q.shape[1], k.shape[1])
  qb = mask.q_block
  dpa = lambda qq, kk, vv, lengths=None: jax.nn.dot_product_attention(
      qq, kk, vv, scale=scale, key_value_seq_lengths=lengths, implementation=implementation)
  if kind == "prefix":
    n = jnp.asarray(mask.kv_ranges)[:, 0, 1].astype(jnp.int32)
    n = jnp.minimum(n, k.shape[1])
    out = dpa(q, k, v, jnp.maximum(n, 1))  # a row with no key: zeros below, never NaN
    return jnp.where((n > 0)[:, None, None, None], out, jnp.zeros_like(out))
  if kind == "static":
    r = np.asarray(mask.kv_ranges)[0]
    outs, i = [], 0
    while i < len(r):
      j = i
      while j + 1 < len(r) and (r[j + 1] == r[i]).all():
        j += 1
      lo, hi = int(r[i, 0]), int(r[i, 1])
      qs = q[:, i * qb:(j + 1) * qb]
      if hi > lo:
        outs.append(dpa(qs, k[:, lo:hi], v[:, lo:hi]))
      else:
        outs.append(jnp.zeros_like(qs))
      i = j + 1
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
  # "segments": chunk i sees [start_i, e_i) with e_i = (i + 1) * qb.
  starts = jnp.asarray(mask.kv_ranges)[..., 0].astype(jnp.int32)          # (B, n)
  outs = []
  for i in range(mask.num_q_blocks):
    end = (i + 1) * qb
    lengths = end - starts[:, i]
    outs.append(dpa(q[:, i * qb:end], k[:, :end][:, ::-1], v[:, :end][:, ::-1], lengths))
  return jnp.concatenate(outs, axis=1)
