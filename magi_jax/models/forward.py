"""A jitted DiT forward: validate on the host, then call one compiled function.

`jit_forward(model)` splits the NNX model once; the returned callable checks its inputs with
concrete values (clear errors before any compilation) and then runs a `jax.jit` function that
is compiled once per distinct input shape. `slice_point` and `step_size` are traced, so calls
that differ only in them reuse the compiled function.

The parameters are captured when `jit_forward` is called: updating the model afterwards
(`nnx.update`, an optimizer step) is not seen by an existing forward; make a new one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from magi_jax.models.dit import VideoDiT


def jit_forward(model: VideoDiT, *, backend: str = "auto", return_kv: bool = False,
                return_activations: bool = False):
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("chunk_width",))
  def compiled(state, x, t, y, mask, kv_range, drop, slice_point, step_size, cache, chunk_width):
    m = nnx.merge(graphdef, state)
    return m(x, t, y, mask, kv_range, drop, slice_point=slice_point, chunk_width=chunk_width,
             step_size=step_size, cache=cache, backend=backend, return_kv=return_kv,
             return_activations=return_activations)

  def prepare(x, t, y, xattn_mask, kv_range, caption_dropout_mask=None, *, slice_point=0,
              chunk_width=None, step_size=None, cache=None):
    """Validates the inputs; returns the argument tuple of `compiled`."""
    model.check_inputs(x, t, y, xattn_mask, kv_range, caption_dropout_mask,
                       slice_point=slice_point, chunk_width=chunk_width,
                       step_size=step_size, cache=cache)
    if caption_dropout_mask is None:
      caption_dropout_mask = jnp.zeros((1,), bool)
    step = None if step_size is None else jnp.asarray(step_size, jnp.float32)
    return (state, jnp.asarray(x), jnp.asarray(t, jnp.float32), jnp.asarray(y),
            jnp.asarray(xattn_mask), jnp.asarray(kv_range, jnp.int32),
            jnp.asarray(caption_dropout_mask, bool), jnp.asarray(slice_point, jnp.int32),
            step, cache, chunk_width)

  def call(*args, **kwargs):
    return compiled(*prepare(*args, **kwargs))

  call.compiled = compiled
  call.prepare = prepare
  return call
