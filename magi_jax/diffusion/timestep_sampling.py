"""The training timestep sampler (MAGI-1 report, arXiv 2505.13211, §2): logit-normal,
shifted toward noise.

t = 0 is noise, t = 1 clean. u = sigmoid(n), n ~ N(mean, std²), then the SD3-style shift
t = w·u / (1 - (1 - w)·u) with w = 1/3 moves mass to the noisy side: with (0, 0.5, 1/3)
about 69% of draws fall below t = 0.3, the report's "~70% of compute at t < 0.3".

Monotone levels inside one video (the report leaves the method open). Our choice: draw every
chunk independently and sort the draws of each video in descending order, so earlier chunks
are cleaner. Sorting permutes the draws without changing them, so the distribution of all
chunk levels is exactly the logit-normal above (the 70% figure holds per chunk), and every
ordering of noise levels a sampler visits (a window of staggered chunks) appears in training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magi_jax.diffusion.segments import same_segment

F32 = jnp.float32


def shift(u, w: float = 1.0 / 3.0):
  """The SD3 shift toward the noisy side; w = 1 is the identity."""
  u = jnp.asarray(u, F32)
  return w * u / (1.0 - (1.0 - w) * u)


def sample_t(key, shape, *, mean: float = 0.0, std: float = 0.5, shift_w: float = 1.0 / 3.0):
  """Independent logit-normal(mean, std) draws, shifted with w; values in (0, 1)."""
  n = mean + std * jax.random.normal(key, shape, F32)
  return shift(jax.nn.sigmoid(n), shift_w)


def staggered_t(grid, order, stagger: float, *, shift_w: float = 1.0 / 3.0):
  """Levels of a sampler window: noisy chunk `order` (0 = the first noisy chunk of its video)
  sits at grid position grid - order·stagger, clipped to [0, 1] (a chunk the window has not
  reached yet is pure noise), and the grid maps to t by the shift (w = 1/3: the sampler's sd3
  warp with shift 3). grid (N, K) in [0, 1): the first noisy chunk's position, per video."""
  g = jnp.asarray(grid, F32) - jnp.asarray(order, F32) * F32(stagger)
  return shift(jnp.clip(g, 0.0, 1.0), shift_w)


def sort_desc_within_segments(values, segment_ids):
  """Sorts `values` (N, K) in descending order inside each contiguous segment.

  Segments are runs of equal positive ids; padding (id 0) stays where it is.
  """
  values = jnp.asarray(values, F32)
  seg = jnp.asarray(segment_ids)
  big = seg.shape[1] + 1
  rank = jnp.where(seg > 0, seg, big).astype(F32)
  # Sort by (segment, -value); rank is an integer, -value in (-4, 0], so rank·8 separates.
  order = jnp.argsort(rank * 8.0 - values, axis=1, stable=True)
  return jnp.take_along_axis(values, order, axis=1)


def cummin_within_segments(values, segment_ids):
  """values[i] -> min over earlier-or-equal chunks j of the same segment (monotone fix-up)."""
  values = jnp.asarray(values, F32)
  K = values.shape[1]
  earlier = jnp.arange(K)[None, :] <= jnp.arange(K)[:, None]                 # [i, j]: j <= i
  m = (same_segment(segment_ids) | jnp.eye(K, dtype=bool)[None]) & earlier[None]
  return jnp.min(jnp.where(m, values[:, None, :], jnp.inf), axis=2).astype(F32)
