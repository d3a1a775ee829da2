"""The 'dot_product' backend: `jax.nn.dot_product_attention` (XLA) with the dense boolean mask.

Exact, O(Sq·Sk) memory; a second yardstick beside 'reference'. cuDNN's fused kernel takes no
dense mask: it is the 'cudnn' backend (cudnn.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magi_jax.attention.masks import ChunkMask, dense_mask


def dot_product_attention(q, k, v, mask: ChunkMask, *, scale: float, precision=None,
                          implementation: str | None = None):
  """Same contract as `reference_attention`; jax.nn handles GQA natively.

  The dense boolean mask is passed as is, so this is exact but still O(Sq * Sk); rows that
  see no key are zeroed explicitly (jax.nn would average them uniformly).
  """
  del precision  # jax.nn picks its own; on CPU float32 it is exact.
  allowed = dense_mask(mask, k.shape[1])                           # (B,Sq,Sk)
  out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale,
                                     implementation=implementation)
  any_key = jnp.any(allowed, axis=-1)[..., None, None]             # (B,Sq,1,1)
  return jnp.where(any_key, out, jnp.zeros_like(out))
