"""Training on the model's own context: clean chunks replaced by the model's estimate of them.

A continuation trained on clean prefixes is sampled from its own generated chunks, and a
long rollout conditions only on those: a slightly dim or speckled chunk makes the next one
dimmer (exposure bias; measured on the bouncing demo, a rolled-out object fades out within
a chunk and comes back, issue 15). The remedy here is the cheap end of Self-Forcing
(Huang et al., 2025: train on the model's own rollouts): before the loss pass, one extra
forward pass of the same packed row, with the clean chunks of a share `p` of the V2V videos
re-noised to one level t_s ~ U[t_min, t_max] per video, gives the model's own clean estimate
of those chunks (stop-gradient). The loss pass then conditions on the estimates instead of
the clean chunks; its targets, the noisy chunks, stay the true data: the model is trained to
produce the true next chunk from a context with its own artifacts. Measured on the bouncing
demo (README, "Training on its own context"): long rollouts stay whole more often, and
continuations from a clean prefix get less precise, since the context it learns to discount
is sometimes the truth.

What the estimate pass sees, per selected video: its clean chunks at t_s with their
captions (a generated chunk was sampled with its caption), each seeing the video's earlier
chunks at the same level, fresh noise. Other chunks of the row go through unchanged; block-
causal attention keeps them from changing the clean chunks' estimates, and they are not used.
The cost is one forward pass of the row per step (no backward), from step `from_step` on
(Self-Forcing is a stage after ordinary training: the estimates mean something only once the
model denoises; earlier steps skip the pass under `lax.cond` and cost what they did).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from magi_jax.diffusion import flow
from magi_jax.diffusion.conditioning import Conditioning
from magi_jax.diffusion.segments import per_segment, segment_layout

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class OwnContext:
  p: float = 0.0          # share of V2V videos whose clean chunks are replaced (0: off)
  t_min: float = 0.2      # the estimate's level t_s ~ U[t_min, t_max] (t = 1 is clean)
  t_max: float = 0.5
  from_step: int = 0      # steps before this one train on clean context (no extra pass)

  def __post_init__(self):
    if not 0.0 <= self.p <= 1.0:
      raise ValueError(f"objective.own_context must be in [0, 1], got {self.p}")
    if not 0.0 <= self.t_min <= self.t_max < 1.0:
      raise ValueError(f"objective.own_context_t must satisfy 0 <= t_min <= t_max < 1, got "
                       f"({self.t_min}, {self.t_max})")
    if self.from_step < 0:
      raise ValueError(f"objective.own_context_from must be >= 0, got {self.from_step}")

  @property
  def on(self) -> bool:
    return self.p > 0.0


def estimate_conditioning(key, segment_ids, cond: Conditioning, frames_per_chunk: int,
                          own: OwnContext) -> tuple[Conditioning, jax.Array]:
  """(conditioning of the estimate pass, (N, K·F) bool frames to replace): the clean chunks
  of the selected videos at their video's t_s, with captions."""
  seg = jnp.asarray(segment_ids, jnp.int32)
  N, K = seg.shape
  _, start, _ = segment_layout(seg)
  k_sel, k_t = jax.random.split(key)
  chosen = per_segment(jax.random.uniform(k_sel, (N, K)), start) < own.p
  t_s = per_segment(jax.random.uniform(k_t, (N, K), F32, own.t_min, own.t_max), start)
  sel = chosen & cond.clean & (seg > 0)
  sel_frames = jnp.repeat(sel, frames_per_chunk, axis=1)
  est = dataclasses.replace(
      cond, t=jnp.where(sel, t_s, cond.t),
      frame_t=jnp.where(sel_frames, flow.frame_t(t_s, frames_per_chunk), cond.frame_t),
      text_drop=cond.text_drop & ~sel)
  return est, sel_frames


def with_own_context(x1, estimate, replace_frames):
  """x1 (N, C, T, h, w) with the frames `replace_frames` (N, T) taken from `estimate`
  (stop-gradient)."""
  m = replace_frames[:, None, :, None, None]
  return jnp.where(m, jax.lax.stop_gradient(estimate).astype(x1.dtype), x1)


def own_context_batch(model, batch, cond: Conditioning, key, obj, step=None):
  """`batch` with x1's selected clean chunks replaced by the model's estimate (module
  docstring); `obj` is the `Objective` whose `velocity_of_row` runs the estimate pass. With
  `step` (traced) and `from_step` > 0, steps before `from_step` return `batch` unchanged."""
  if step is not None and obj.own_context.from_step > 0:
    return jax.lax.cond(jnp.asarray(step) >= obj.own_context.from_step,
                        lambda: own_context_batch(model, batch, cond, key, obj),
                        lambda: batch)
  from magi_jax.train.objective import velocity_of_row
  own: OwnContext = obj.own_context
  k_sel, k_noise = jax.random.split(key)
  x1 = batch["x1"].astype(F32)
  est, replace = estimate_conditioning(k_sel, batch["segment_ids"], cond, obj.chunk_width, own)
  noise = jax.random.normal(k_noise, x1.shape, F32)
  out, _ = velocity_of_row(model, batch, est, noise, obj)
  x_t = flow.interpolate(noise, x1, est.frame_t)
  x1_hat = flow.clean_estimate(out, x_t, est.frame_t, obj.prediction)
  return {**batch, "x1": with_own_context(x1, x1_hat, replace)}
