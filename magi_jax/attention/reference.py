"""Reference backend: dense masked attention in XLA. Exact, O(Sq * Sk) memory; the yardstick."""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange

from magi_jax.attention.masks import ChunkMask, dense_mask


def reference_attention(q, k, v, mask: ChunkMask, *, scale: float, precision=None):
  """q (B,Sq,Hq,D), k/v (B,Sk,Hkv,D) with Hq % Hkv == 0 (GQA/MQA) -> (B,Sq,Hq,D).

  Scores, softmax and accumulation are float32; probabilities are rounded to v's dtype before
  the value product, as flash-attention does. Query rows that see no key give zeros.
  """
  groups = q.shape[2] // k.shape[2]
  qg = rearrange(q, "b s (h g) d -> b h g s d", g=groups)
  s = jnp.einsum("bhgqd,bkhd->bhgqk", qg, k, precision=precision,
                 preferred_element_type=jnp.float32) * scale
  allowed = dense_mask(mask, k.shape[1])[:, None, None]            # (B,1,1,Sq,Sk)
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  o = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), v, precision=precision,
                 preferred_element_type=jnp.float32)
  return rearrange(o, "b h g s d -> b s (h g) d").astype(q.dtype)
