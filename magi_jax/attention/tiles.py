"""Flash-attention tile loops on one device's slabs: the body of the local 'flash' backend
(magi_jax.attention.flash) and of ring attention (magi_jax.attention.ring).

Queries carry per-token key ranges [lo, hi) in global key positions; a key slab carries its
global positions as one contiguous run per block. Forward updates an online-softmax carry
(m, l, acc) in float32; backward takes the row log-sum-exp and delta = sum(dO * O) and returns
dQ (accumulated) and the slab's dK, dV. Both loop over (query block, key block) pairs and skip,
with `lax.switch`, pairs in which no query sees any key, and drop the mask where every query
sees every key of the tile (MAGI's chunk-aligned masks make most visible tiles full).

Layouts: q (B, Sq, Hkv, G, D) with G query heads per kv head; k, v (B, Sk, Hkv, D);
lo, hi (B, Sq) int32; carry m, l (B, Hkv, G, Sq) and acc (B, Hkv, G, Sq, D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

F32 = jnp.float32


def _blocks(n: int, want: int) -> int:
  b = max(1, min(want, n))
  while n % b:
    b -= 1
  return b


def _visible(lo, hi, k0, bk):
  """Any query of the block sees a key in [k0, k0 + bk)?"""
  return jnp.any((lo < k0 + bk) & (hi > k0) & (lo < hi))


def _tile_case(lo, hi, k0, bk):
  """0: no query of the block sees a key in [k0, k0 + bk); 1: every query sees all of them
  (no mask to apply: MAGI's chunk-aligned masks make most visible tiles full); 2: partial."""
  full = jnp.all((lo <= k0) & (hi >= k0 + bk))
  return jnp.where(full, 1, jnp.where(_visible(lo, hi, k0, bk), 2, 0))


def _allowed(lo, hi, kpos):
  """(B, bq) ranges and (bk,) positions -> (B, 1, 1, bq, bk) mask."""
  return ((kpos[None, None, :] >= lo[..., None]) & (kpos[None, None, :] < hi[..., None])
          )[:, None, None]


def init_carry(q):
  B, S, H, G, D = q.shape
  return (jnp.full((B, H, G, S), -jnp.inf, F32), jnp.zeros((B, H, G, S), F32),
          jnp.zeros((B, H, G, S, D), F32))


def forward(q, k, v, lo, hi, k_start, carry, *, scale: float, block_q: int, block_k: int,
            skip: bool = True, unroll: bool = False, precision=None):
  """Online-softmax update of `carry` by keys k/v at global positions k_start + arange(Sk)."""
  B, Sq, H, G, D = q.shape
  Sk = k.shape[1]
  bq, bk = _blocks(Sq, block_q), _blocks(Sk, block_k)
  # Head-major tiles, arranged once here, so each tile's products are plain batched matmuls.
  qb = rearrange(q, "b (n s) h g d -> n b h g s d", s=bq)
  lob = rearrange(lo, "b (n s) -> n b s", s=bq)
  hib = rearrange(hi, "b (n s) -> n b s", s=bq)
  cb = [rearrange(c, "b h g (n s) ... -> n b h g s ...", s=bq) for c in carry]
  kb = rearrange(k, "b (n t) h d -> n b h t d", t=bk)
  vb = rearrange(v, "b (n t) h d -> n b h t d", t=bk)
  k0s = k_start + jnp.arange(Sk // bk) * bk

  def q_block(_, xs):
    qi, loi, hii, mi, li, ai = xs

    def k_block(c, ys):
      kj, vj, k0 = ys

      def compute(c, masked=True):
        m, l, acc = c
        s = jnp.einsum("bhgsd,bhtd->bhgst", qi, kj, precision=precision,
                       preferred_element_type=F32) * scale
        if masked:
          s = jnp.where(_allowed(loi, hii, k0 + jnp.arange(bk)), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        pv = jnp.einsum("bhgst,bhtd->bhgsd", p.astype(vj.dtype), vj, precision=precision,
                        preferred_element_type=F32)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

      if skip:
        return jax.lax.switch(_tile_case(loi, hii, k0, bk),
                              (lambda c: c, lambda c: compute(c, False), compute), c), None
      return compute(c), None

    out, _ = jax.lax.scan(k_block, (mi, li, ai), (kb, vb, k0s), unroll=unroll)
    return None, out

  _, (m, l, acc) = jax.lax.scan(q_block, None, (qb, lob, hib, *cb), unroll=unroll)
  join = lambda c: rearrange(c, "n b h g s ... -> b h g (n s) ...")
  return join(m), join(l), join(acc)


def finish(carry, dtype):
  """carry -> (out (B, S, H, G, D) in `dtype`, lse (B, H, G, S) float32; +inf where no key)."""
  m, l, acc = carry
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
  return rearrange(out, "b h g s d -> b s h g d").astype(dtype), lse


def backward(q, k, v, do, lse, delta, lo, hi, k_start, dq, *, scale: float, block_q: int,
             block_k: int, skip: bool = True, unroll: bool = False, precision=None):
  """-> (dq + this slab's contribution, dk, dv), all float32.

  do (B, Sq, H, G, D); lse, delta (B, H, G, Sq); dq (B, Sq, H, G, D) float32.
  """
  B, Sq, H, G, D = q.shape
  Sk = k.shape[1]
  bq, bk = _blocks(Sq, block_q), _blocks(Sk, block_k)
  split_q = lambda x: rearrange(x, "b (n s) h g d -> n b h g s d", s=bq)
  split_r = lambda x: rearrange(x, "b h g (n s) -> n b h g s", s=bq)
  qb, dob, dqb = split_q(q), split_q(do), split_q(dq)
  lseb, deltab = split_r(lse), split_r(delta)
  lob = rearrange(lo, "b (n s) -> n b s", s=bq)
  hib = rearrange(hi, "b (n s) -> n b s", s=bq)
  kb = rearrange(k, "b (n t) h d -> n b h t d", t=bk)
  vb = rearrange(v, "b (n t) h d -> n b h t d", t=bk)
  k0s = k_start + jnp.arange(Sk // bk) * bk

  def k_block(dqb, ys):
    kj, vj, k0 = ys

    def q_block(dkv, xs):
      qi, doi, lsei, deltai, loi, hii, dqi = xs

      def compute(args, masked=True):
        (dk, dv), dqi = args
        s = jnp.einsum("bhgsd,bhtd->bhgst", qi, kj, precision=precision,
                       preferred_element_type=F32) * scale
        p = jnp.exp(s - lsei[..., None])
        if masked:
          p = jnp.where(_allowed(loi, hii, k0 + jnp.arange(bk)), p, 0.0)
        dv = dv + jnp.einsum("bhgst,bhgsd->bhtd", p.astype(doi.dtype), doi,
                             precision=precision, preferred_element_type=F32)
        dp = jnp.einsum("bhgsd,bhtd->bhgst", doi, vj, precision=precision,
                        preferred_element_type=F32)
        # dS in the inputs' dtype (bf16 matmuls with float32 accumulation, as flash
        # attention's backward does); exact for float32 inputs.
        ds = (p * (dp - deltai[..., None])).astype(kj.dtype)
        dqi = dqi + jnp.einsum("bhgst,bhtd->bhgsd", ds, kj, precision=precision,
                               preferred_element_type=F32) * scale
        dk = dk + jnp.einsum("bhgst,bhgsd->bhtd", ds, qi, precision=precision,
                             preferred_element_type=F32) * scale
        return (dk, dv), dqi

      args = (dkv, dqi)
      if skip:
        dkv, dqi = jax.lax.switch(_tile_case(loi, hii, k0, bk),
                                  (lambda a: a, lambda a: compute(a, False), compute), args)
      else:
        dkv, dqi = compute(args)
      return dkv, dqi

    zeros = jnp.zeros(kj.shape, F32)
    (dk, dv), dqb = jax.lax.scan(q_block, (zeros, zeros),
                                 (qb, dob, lseb, deltab, lob, hib, dqb), unroll=unroll)
    return dqb, (dk, dv)

  dqb, (dkb, dvb) = jax.lax.scan(k_block, dqb, (kb, vb, k0s), unroll=unroll)
  return (rearrange(dqb, "n b h g s d -> b (n s) h g d"),
          rearrange(dkb, "n b h t d -> b (n t) h d"), rearrange(dvb, "n b h t d -> b (n t) h d"))
