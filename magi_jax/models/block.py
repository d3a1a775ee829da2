"""One MAGI-1 transformer layer (official dit_module.py): parallel self + cross attention,
softcapped gates applied before sandwich post-norms, and a GELU or SwiGLU MLP.

No shift/scale modulation exists: adaLN only produces two gates per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from magi_jax.attention import ChunkMask, attention
from magi_jax.configs import ModelConfig
from magi_jax.models.layers import LayerNorm, Linear
from magi_jax.models.precision import Precision
from magi_jax.models.rope import apply_rope
from magi_jax.parallel.rules import constrain

F32 = jnp.float32
GATE_SOFTCAP = 1.0


LOCAL_BACKENDS = ("reference", "dot_product", "flash", "blockwise", "cudnn")


def cross_backend(backend: str) -> str:
  """Cross-attention (each chunk against its ~800 caption tokens) is local to a device; the
  sequence-parallel backends are for self-attention, so any non-local choice ('ring',
  'ulysses', 'splash') runs 'auto' here. 'auto' picks splash for the caption mask (layout
  "key_prefix") on a TPU target whose mesh keeps sequences whole, else flash; mapping 'splash'
  to 'auto' rather than forcing it keeps CPU runs off the slow Pallas interpreter and
  context-parallel meshes (where splash refuses) working."""
  return backend if backend in LOCAL_BACKENDS else "auto"


def per_chunk(x, g, num_chunks: int):
  """x (N, S, D) float32 times per-chunk rows g (N, chunks_in_flight, D): token s uses row
  s // tokens_per_chunk."""
  xc = rearrange(x, "n (c s) d -> n c s d", c=num_chunks)
  return rearrange(xc * g[:, :, None, :], "n c s d -> n (c s) d")


class TransformerLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, policy: Precision, *, rngs: nnx.Rngs):
    D, Dc, hd = cfg.hidden_size, cfg.cond_hidden_dim, cfg.head_dim
    nq, nkv, F = cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
    pd, eps = policy.param_dtype, cfg.layernorm_epsilon
    self.cfg = cfg
    self.ada_modulate = Linear(Dc, 2 * D, use_bias=True, dtype=pd, rngs=rngs)
    self.ln_qkv = LayerNorm(D, eps=eps, one_plus=False, dtype=pd, rngs=rngs)
    self.q = Linear(D, nq * hd, use_bias=False, dtype=pd, rngs=rngs)
    self.k = Linear(D, nkv * hd, use_bias=False, dtype=pd, rngs=rngs)
    self.v = Linear(D, nkv * hd, use_bias=False, dtype=pd, rngs=rngs)
    self.qx = Linear(D, nq * hd, use_bias=False, dtype=pd, rngs=rngs)
    self.kx = Linear(D, nkv * hd, use_bias=False, dtype=pd, rngs=rngs)
    self.vx = Linear(D, nkv * hd, use_bias=False, dtype=pd, rngs=rngs)
    self.q_norm = LayerNorm(hd, eps=eps, one_plus=True, dtype=F32, rngs=rngs)
    self.k_norm = LayerNorm(hd, eps=eps, one_plus=True, dtype=F32, rngs=rngs)
    self.qx_norm = LayerNorm(hd, eps=eps, one_plus=True, dtype=pd, rngs=rngs)
    self.kx_norm = LayerNorm(hd, eps=eps, one_plus=True, dtype=pd, rngs=rngs)
    # Input columns in the natural [self | cross] order; the converter undoes the official
    # 8-group interleave once.
    self.proj = Linear(2 * nq * hd, D, use_bias=False, dtype=pd, rngs=rngs)
    self.attn_post_norm = LayerNorm(D, eps=eps, one_plus=True, dtype=F32, rngs=rngs)
    self.mlp_norm = LayerNorm(D, eps=eps, one_plus=False, dtype=pd, rngs=rngs)
    self.fc1 = Linear(D, F * (2 if cfg.gated_linear_unit else 1), use_bias=False, dtype=pd,
                      rngs=rngs)
    self.fc2 = Linear(F, D, use_bias=False, dtype=pd, rngs=rngs)
    self.mlp_post_norm = LayerNorm(D, eps=eps, one_plus=True, dtype=F32, rngs=rngs)

  def gates(self, cond, policy: Precision):
    """cond (N, chunks_in_flight, Dc) -> softcapped gates (N, chunks_in_flight, 2D) in the
    compute dtype."""
    a = policy.low(jax.nn.silu(cond.astype(F32)))
    logits = self.ada_modulate(a, out_dtype=policy.compute_dtype)
    return policy.low(GATE_SOFTCAP * jnp.tanh(logits.astype(F32) / GATE_SOFTCAP))

  def __call__(self, h, cond, rope, self_mask: ChunkMask, cache_kv, y_feats,
               xattn_mask: ChunkMask, policy: Precision, backend: str):
    cfg = self.cfg
    nq, nkv, hd = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    chunks_in_flight = cond.shape[1]
    low, cd = policy.low, policy.compute_dtype
    scale = hd ** -0.5
    N, S, D = h.shape

    a = self.ln_qkv(h, out_dtype=cd)

    # Self-attention: q/k norms and RoPE in float32, then rounded.
    sin, cos = rope
    heads = lambda x, n: rearrange(x, "b s (h d) -> b s h d", h=n)
    q = heads(self.q(a, out_dtype=cd), nq)
    k = heads(self.k(a, out_dtype=cd), nkv)
    v = heads(self.v(a, out_dtype=cd), nkv)
    q = low(apply_rope(self.q_norm(q, out_dtype=F32), sin, cos))
    k = low(apply_rope(self.k_norm(k, out_dtype=F32), sin, cos))
    new_kv = (k, v)
    if cache_kv is not None:
      # A cache of batch 1 serves every element (cfg 3's conditional and unconditional
      # passes read the same chunks): broadcast per layer, never a copy of the whole cache.
      grow = lambda c: jnp.broadcast_to(c.astype(cd), (N,) + c.shape[1:])
      k = jnp.concatenate([grow(cache_kv[0]), k], axis=1)
      v = jnp.concatenate([grow(cache_kv[1]), v], axis=1)
    names = ("batch", "length", "act_heads", "head_dim")
    q, k, v = (constrain(x, names) for x in (q, k, v))
    o_self = attention(q, k, v, self_mask, scale=scale, backend=backend)

    # Cross-attention: each chunk is its own row and sees only its caption tokens.
    qx = self.qx_norm(heads(self.qx(a, out_dtype=cd), nq), out_dtype=cd)
    qx = rearrange(qx, "n (c s) h d -> (n c) s h d", c=chunks_in_flight)
    kx = self.kx_norm(heads(self.kx(y_feats, out_dtype=cd), nkv), out_dtype=cd)
    vx = heads(self.vx(y_feats, out_dtype=cd), nkv)
    o_cross = attention(qx, kx, vx, xattn_mask, scale=scale, backend=cross_backend(backend))
    o_cross = rearrange(o_cross, "(n c) s h d -> n (c s) h d", n=N)

    z = jnp.concatenate([rearrange(o_self, "b s h d -> b s (h d)"),
                         rearrange(o_cross, "b s h d -> b s (h d)")], axis=-1)
    attn = self.proj(z.astype(F32), out_dtype=F32, precision=policy.matmul)

    g = self.gates(cond, policy).astype(F32)
    g_msa, g_mlp = g[..., :D], g[..., D:]
    h1 = low(h.astype(F32) + self.attn_post_norm(per_chunk(attn, g_msa, chunks_in_flight),
                                                 out_dtype=F32))

    m = self.mlp_norm(h1, out_dtype=cd)
    m = self.fc1(m, out_dtype=cd)
    if cfg.gated_linear_unit:
      gate, up = jnp.split(m, 2, axis=-1)
      m = low(low(jax.nn.silu(gate.astype(F32))).astype(F32) * up.astype(F32))
    else:
      m = low(jax.nn.gelu(m.astype(F32), approximate=False))
    m = self.fc2(m, out_dtype=cd)
    h2 = low(h1.astype(F32) + self.mlp_post_norm(per_chunk(m.astype(F32), g_mlp, chunks_in_flight),
                                                 out_dtype=F32))
    return h2, new_kv
