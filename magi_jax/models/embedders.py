"""Timestep, step-size and caption embedders (official dit_module.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from magi_jax.models.layers import Linear
from magi_jax.models.precision import Precision

F32 = jnp.float32
FREQ_DIM = 256            # fixed sinusoid width, independent of the model size
TIMESTEP_SCALE = 1000.0   # official timestep_rescale_factor
MAX_PERIOD = 10000


def timestep_sinusoid(t):
  """t (M,) float32 in [0, 1] -> (M, 256): [cos | sin] of t·freq·1000, float32."""
  half = FREQ_DIM // 2
  freqs = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=F32) / half)
  args = (t.astype(F32)[:, None] * freqs[None]) * TIMESTEP_SCALE
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def distill_step_size(num_steps: int, distill_interval: int | None = None) -> float:
  """The shortcut step-size value a distilled model embeds (official dit_module.py)."""
  if num_steps == 12:
    if distill_interval not in (1, 2):
      raise ValueError("12-step shortcut sampling needs distill_interval 1 or 2, got "
                       f"{distill_interval!r}")
    return 4 / distill_interval * 2
  return num_steps / 4 * 2


class TimestepEmbedder(nnx.Module):
  def __init__(self, cond_dim: int, *, rngs: nnx.Rngs):
    self.fc1 = Linear(FREQ_DIM, cond_dim, use_bias=True, dtype=F32, rngs=rngs)
    self.fc2 = Linear(cond_dim, cond_dim, use_bias=True, dtype=F32, rngs=rngs)

  def __call__(self, t, policy: Precision):
    # The sinusoid is rounded to the parameter dtype (bf16 in the released model) before
    # the float32 MLP.
    e = policy.low(timestep_sinusoid(t))
    h = jax.nn.silu(self.fc1(e, out_dtype=F32, precision=policy.matmul))
    return self.fc2(h, out_dtype=F32, precision=policy.matmul)


class CaptionEmbedder(nnx.Module):
  """Cross-attention caption features and the adaLN text vector.

  The adaLN vector never sees the prompt: it is a projection of one learned row of
  `null_caption_embedding` (second to last when the caption is kept, last when dropped).
  """

  def __init__(self, caption_channels: int, caption_len: int, hidden: int, cond_dim: int, *,
               rngs: nnx.Rngs):
    self.y_proj_xattn = Linear(caption_channels, hidden, use_bias=True, dtype=F32, rngs=rngs)
    self.y_proj_adaln = Linear(caption_channels, cond_dim, use_bias=True, dtype=F32, rngs=rngs)
    self.null_caption_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (caption_len, caption_channels), F32))

  def xattn_features(self, y, policy: Precision):
    """y (R, L, C) -> SiLU(proj) (R, L, D) float32."""
    return jax.nn.silu(self.y_proj_xattn(y, out_dtype=F32, precision=policy.matmul))

  def adaln(self, caption_dropout, policy: Precision):
    """caption_dropout (N,) bool -> (N, Dc) float32."""
    rows = self.null_caption_embedding[...][-2:]                     # [kept, dropped]
    table = self.y_proj_adaln(rows, out_dtype=F32, precision=policy.matmul)
    return table[caption_dropout.astype(jnp.int32)]
