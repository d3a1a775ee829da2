"""Parameter-holding primitives: a bias-optional linear map and LayerNorm with a 1p gain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32


def _normal(rngs: nnx.Rngs, shape, std, dtype):
  return (jax.random.normal(rngs.params(), shape, F32) * std).astype(dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias). kernel is (in, out), i.e. the transpose of a PyTorch weight.

  The product accumulates in float32 and is rounded once to `out_dtype`, like a bf16 GEMM
  with an f32 accumulator. Operands are promoted to a common dtype first, so a float32
  activation times a bf16 weight is a float32 GEMM on bf16-valued operands (official dit_module.py).
  """

  def __init__(self, d_in: int, d_out: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), d_in ** -0.5, dtype))
    self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if use_bias else None
    self.qscale = None         # int8 weights (models/quant.py): the per-channel scale

  def __call__(self, x, *, out_dtype, precision=None):
    kernel = self.kernel[...]
    qscale = getattr(self, "qscale", None)    # (LoRALinear keeps its base's attributes)
    if qscale is not None:       # int8 values times their scale: the weight dtype again
      scale = qscale[...]
      kernel = kernel.astype(scale.dtype) * scale
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype), precision=precision,
                preferred_element_type=F32)
    if self.bias is not None:
      y = y + self.bias[...].astype(F32)
    return y.astype(out_dtype)


def layer_norm(x, weight, bias, *, eps: float, one_plus: bool, out_dtype):
  """LayerNorm over the last axis, statistics in float32, biased variance.

  With `one_plus` the gain is (1 + weight), formed in the weight's own dtype: for bf16 weights
  the gain itself is rounded to bf16, as in the official cross-attention q/k norms.
  """
  xf = x.astype(F32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  gain = (weight + jnp.ones((), weight.dtype)) if one_plus else weight
  return (y * gain.astype(F32) + bias.astype(F32)).astype(out_dtype)


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, one_plus: bool, dtype, rngs: nnx.Rngs):
    del rngs
    # 1p norms start at weight 0 (gain 1); standard ones at weight 1.
    self.weight = nnx.Param(jnp.zeros((dim,), dtype) if one_plus else jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))
    self.eps = eps
    self.one_plus = one_plus

  def __call__(self, x, *, out_dtype):
    return layer_norm(x, self.weight[...], self.bias[...], eps=self.eps, one_plus=self.one_plus,
                      out_dtype=out_dtype)
