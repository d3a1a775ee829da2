"""Linear resampling of a position table along each axis (PyTorch `interpolate(mode=
'trilinear', align_corners=False)` semantics, no antialiasing), as a pure function.

`jax.image.resize` antialiases when downsampling, which the official VAE does not.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _axis_weights(n_in: int, n_out: int):
  s = n_in / n_out
  d = np.arange(n_out, dtype=np.float64)
  src = np.maximum((d + 0.5) * s - 0.5, 0.0).astype(np.float32)
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = (src - i0).astype(np.float32)
  return i0, i1, lam


def resize_axis(x, axis: int, n_out: int):
  n_in = x.shape[axis]
  if n_in == n_out:
    return x
  i0, i1, lam = _axis_weights(n_in, n_out)
  shape = [1] * x.ndim
  shape[axis] = n_out
  lam = jnp.asarray(lam).reshape(shape)
  a = jnp.take(x, jnp.asarray(i0), axis=axis)
  b = jnp.take(x, jnp.asarray(i1), axis=axis)
  return a * (1 - lam) + b * lam


def resize_grid(x, size: tuple[int, ...], axes: tuple[int, ...]):
  """Separable linear resize of `x` to `size` along `axes`."""
  for axis, n in zip(axes, size):
    x = resize_axis(x, axis, n)
  return x
