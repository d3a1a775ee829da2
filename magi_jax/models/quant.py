"""int8 weights for the DiT's transformer layers: weight-only, per output channel, absmax.

`quantize_int8(model)` replaces the kernel of every linear map of the stacked layers (q, k,
v, the cross-attention maps, the output projection, the MLP, the adaLN modulation: over 99% of
the DiT's weights) by int8 values and a scale per output channel and layer, in the kernel's
own dtype: scale = max |w| / 127 over the input axis, w8 = round(w / scale). `Linear` forms
w8·scale (the kernel's dtype again, one layer at a time inside the scan) and goes on as
before, so activations, accumulation and the rest of the model are unchanged: it halves the
weights' memory against bf16 (the scales add one value per output channel) and is an
approximation of the model (relative error of each weight under 1/254 of
its channel's largest; measured on whole videos in tests/test_quant.py), not the official
numerics, which the default bf16 weights keep. It works on concrete or abstract models
(`nnx.eval_shape`), so the planner compiles the int8 programs without weights.

Why by hand: the quantization library of the JAX ecosystem (qwix 0.1.8, PTQ) intercepts the
dot products of a model it traces, and cannot follow this DiT's linear maps, which cast both
operands to their promoted dtype before the product (tried: "Unsupported type QArray" in
that cast). The mechanism is the one the official fp8 checkpoints use (a low-precision kernel
with a scale, dequantized at the product).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from magi_jax.errors import MagiError
from magi_jax.models.layers import Linear
from magi_jax.models.stack import STACK_NAME

F32 = jnp.float32


class QuantizationError(MagiError, ValueError):
  pass


def quantize_kernel(w) -> tuple[jax.Array, jax.Array]:
  """(int8 values, scale in the kernel's dtype with the input axis kept as 1) of a
  (..., in, out) kernel: the values are rounded against the scale as stored, so w8·scale is
  the closest the stored pair gets to w."""
  w = jnp.asarray(w)
  wf = w.astype(F32)
  scale = (jnp.max(jnp.abs(wf), axis=-2, keepdims=True) / 127.0).astype(w.dtype)
  scale = jnp.where(scale > 0, scale, jnp.ones((), w.dtype))
  q = jnp.clip(jnp.round(wf / scale.astype(F32)), -127, 127).astype(jnp.int8)
  return q, scale


def _layer_linears(model):
  stack = getattr(model, STACK_NAME, None)
  if stack is None:
    raise QuantizationError("int8 weights: the model has no stacked transformer layers")
  return [(path, m) for path, m in nnx.iter_graph(stack) if isinstance(m, Linear)]


def quantize_int8(model):
  """Quantizes the stacked layers' kernels in place (see the module docstring); returns the
  model. A model whose kernels are already int8, or that carries LoRA adapters (merge them
  first), is refused."""
  linears = _layer_linears(model)
  for path, lin in linears:
    if getattr(lin, "lora_a", None) is not None:
      raise QuantizationError(f"int8 weights: {'/'.join(map(str, path))} has LoRA adapters; "
                              "merge them first (merge_lora)")
    if getattr(lin, "qscale", None) is not None:
      raise QuantizationError("int8 weights: the model is already quantized")
  for _, lin in linears:
    q, scale = quantize_kernel(lin.kernel[...])
    lin.kernel = nnx.Param(q)
    lin.qscale = nnx.data(nnx.Param(scale))
  return model


def is_int8(model) -> bool:
  return any(getattr(lin, "qscale", None) is not None for _, lin in _layer_linears(model))
