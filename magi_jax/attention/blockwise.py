"""Blockwise backend: online softmax over key blocks, skipping blocks a query block cannot see.

For block-causal video attention roughly half of the (query chunk, key chunk) pairs are
masked out; the dense backends compute them anyway. Here each query block runs a `lax.scan`
over key blocks whose body is a `lax.cond`: an invisible key block costs nothing on CPU and
GPU. scan + cond is reverse-differentiable, so training can use this backend too. Never
`vmap` this function over query blocks: under vmap the cond becomes a select and computes
every block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from magi_jax.attention.masks import ChunkMask


def _pick_key_block(num_keys: int, q_block: int) -> int:
  # Chunks are the natural unit: ranges are chunk multiples in the sampler, so key blocks of
  # one chunk never straddle a range boundary there. Other ranges are masked inside a block.
  return max(1, min(q_block, num_keys))


def blockwise_attention(q, k, v, mask: ChunkMask, *, scale: float, precision=None,
                        key_block: int | None = None):
  B, Sq, Hq, D = q.shape
  Sk, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  bk = key_block or _pick_key_block(Sk, mask.q_block)
  nk = -(-Sk // bk)
  pad = nk * bk - Sk
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  kb = rearrange(k, "b (n t) h d -> n b t h d", t=bk)
  vb = rearrange(v, "b (n t) h d -> n b t h d", t=bk)
  qb = rearrange(q, "b (n s) (h g) d -> n b h g s d", s=mask.q_block, g=G)
  ranges = jnp.swapaxes(mask.kv_ranges, 0, 1)                     # (nQ, B, 2)

  def one_query_block(args):
    qi, rng = args                                                 # (B,h,g,s,d), (B,2)
    lo, hi = rng[:, 0], rng[:, 1]

    def body(carry, blk):
      j, k_j, v_j = blk
      key_pos = j * bk + jnp.arange(bk)
      allowed = (key_pos[None] >= lo[:, None]) & (key_pos[None] < hi[:, None])   # (B,bk)
      visible = jnp.any(allowed)

      def compute(c):
        m, l, acc = c
        s = jnp.einsum("bhgsd,bthd->bhgst", qi, k_j, precision=precision,
                       preferred_element_type=jnp.float32) * scale
        s = jnp.where(allowed[:, None, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l_new = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bhgst,bthd->bhgsd", p.astype(v_j.dtype), v_j, precision=precision,
                        preferred_element_type=jnp.float32)
        return m_new, l_new, acc * corr[..., None] + pv

      return jax.lax.cond(visible, compute, lambda c: c, carry), None

    init = (jnp.full(qi.shape[:-1], -jnp.inf, jnp.float32),
            jnp.zeros(qi.shape[:-1], jnp.float32),
            jnp.zeros(qi.shape, jnp.float32))
    (_, l, acc), _ = jax.lax.scan(body, init, (jnp.arange(nk), kb, vb))
    return acc / jnp.where(l > 0, l, 1.0)[..., None]

  out = jax.lax.map(one_query_block, (qb, ranges))                 # (nQ,B,h,g,s,d)
  return rearrange(out, "n b h g s d -> b (n s) (h g) d").astype(q.dtype)
