"""Shortcut distillation targets (MAGI-1 report, arXiv 2505.13211, §3), pure functions.

One velocity model v(x, t, s) also conditioned on a step size s. Sizes live where the sampler
steps: in u, the unwarped time of `schedule.timesteps` (a sampler with n steps moves every chunk
by u += 1/n, then t = warp(u)), so a step of size s from level t goes to
`next_level(t, s) = warp(unwarp(t) + s)`, and the distilled model embeds s as
`embedded_step_size(s) = 1 / (2 s)`, the value the sampler gives it at 1/s steps
(`models.embedders.distill_step_size`).

Choices the report leaves open, made here:
* One s per training sample, shared by all its chunks (the sampler gives one step size to
  every chunk of a call); each chunk moves from its own level, and clean chunks never move
  (the sampler never updates the prefix).
* `STEP_CYCLE[train_step % len]` is the step size of that training step (the report's
  [1/64] x 8, then 1/32, 1/16, 1/8).
* At the smallest size the target is the frozen teacher's guided velocity
  (`guided_velocity`, the sampler's three-pass formula), so guidance is distilled in.
* At a larger size 2s the target is the Δt-weighted average of two consecutive size-s steps
  of the student itself (`self_consistency_target`, under stop-gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from magi_jax.diffusion.schedule import SHIFT
from magi_jax.errors import MagiError

F32 = jnp.float32
STEP_CYCLE = (1 / 64,) * 8 + (1 / 32, 1 / 16, 1 / 8)


class ShortcutError(MagiError, ValueError):
  pass


def check_cycle(cycle) -> tuple[float, ...]:
  """A step-size cycle: powers of two in (0, 1/2]; the smallest is the flow-matching size."""
  cycle = tuple(float(s) for s in cycle)
  if not cycle:
    raise ShortcutError("the step-size cycle is empty")
  for s in cycle:
    k = np.log2(1 / s) if s > 0 else np.nan
    if not (0 < s <= 0.5) or k != round(k):
      raise ShortcutError(f"step size {s} in the cycle is not 1/2^k with k >= 1 (the sampler "
                          "runs 1/s steps)")
  return cycle


def step_size_at(train_step, cycle=STEP_CYCLE):
  """The step size of training step `train_step` (traced or int): cycle[step % len]."""
  table = jnp.asarray(check_cycle(cycle), F32)
  return table[jnp.asarray(train_step) % len(cycle)]


def embedded_step_size(s):
  """The value the distilled DiT embeds for step size s: 1 / (2 s) (= num_steps / 2)."""
  return 0.5 / jnp.asarray(s, F32)


def warp(u, shift: float = SHIFT):
  """The sampler's "sd3" warp t = (u²/shift) / (1 + (1/shift - 1) u²), traceable."""
  x = jnp.square(jnp.asarray(u, F32))
  c1, c2 = 1.0 / shift, 1.0 / shift - 1.0
  return (c1 * x) / (1.0 + c2 * x)


def unwarp(t, shift: float = SHIFT):
  """The inverse of `warp` on [0, 1]."""
  t = jnp.clip(jnp.asarray(t, F32), 0.0, 1.0)
  c1, c2 = 1.0 / shift, 1.0 / shift - 1.0
  return jnp.sqrt(t / (c1 - c2 * t))


def next_level(t, s, clean=None):
  """The level after one step of size s from t (any shape), capped at 1; `clean` (same shape,
  bool) chunks stay where they are."""
  t = jnp.asarray(t, F32)
  t_next = jnp.minimum(warp(jnp.minimum(unwarp(t) + jnp.asarray(s, F32), 1.0)), 1.0)
  t_next = jnp.maximum(t_next, t)             # f32 rounding near t = 1: never backwards
  return t_next if clean is None else jnp.where(clean, t, t_next)


def _per_frame(a, frames_per_chunk: int):
  """(N, K) per chunk -> (N, 1, K·F, 1, 1) to scale latents (N, C, K·F, H, W)."""
  return jnp.repeat(a, frames_per_chunk, axis=1)[:, None, :, None, None]


def self_consistency_target(velocity, x, t, s, clean=None, hold_frames=None):
  """The target for one step of size 2s: two steps of size s, Δt-weighted, stop-gradient.

  velocity(x, t, s) -> v: the student (or its EMA), x (N, C, K·F, H, W), t (N, K) per chunk,
  s a scalar step size. v1 = velocity(x, t, s); x' = x + (t1 - t)·v1; v2 = velocity(x', t1, s);
  target = ((t1 - t)·v1 + (t2 - t1)·v2) / (t2 - t), per chunk. Where a chunk does not move
  (clean, or already at t = 1) the target is v1. hold_frames (N, K·F) bool: latent frames
  that keep their value in x' (an I2V image frame, which the sampler writes back every step).
  """
  t = jnp.asarray(t, F32)
  frames = x.shape[2] // t.shape[1]
  t1 = next_level(t, s, clean)
  t2 = next_level(t1, s, clean)
  d1, d2 = t1 - t, t2 - t1
  v1 = velocity(x, t, s)
  x_mid = x + _per_frame(d1, frames) * v1
  if hold_frames is not None:
    x_mid = jnp.where(jnp.asarray(hold_frames, bool)[:, None, :, None, None], x, x_mid)
  v2 = velocity(x_mid, t1, s)
  total = d1 + d2
  moved = total > 0
  w1 = jnp.where(moved, d1 / jnp.where(moved, total, 1.0), 1.0)
  w2 = jnp.where(moved, d2 / jnp.where(moved, total, 1.0), 0.0)
  target = _per_frame(w1, frames) * v1 + _per_frame(w2, frames) * v2
  return jax.lax.stop_gradient(target)


def guided_velocity(v_text, v_prev, v_alone, scale_prev, scale_text):
  """MAGI's three-pass guidance: (1 - s_p)·v_alone + (s_p - s_t)·v_prev + s_t·v_text.

  v_text: text and earlier chunks seen; v_prev: earlier chunks, null caption; v_alone: each
  chunk alone with the null caption. Scales broadcast against the velocities (per frame in
  the sampler). With both scales 1 it is v_text."""
  return (1 - scale_prev) * v_alone + (scale_prev - scale_text) * v_prev + scale_text * v_text
