"""Flow matching per chunk (MAGI-1 report, arXiv 2505.13211, §2), pure functions.

x_t = (1 - t)·x0 + t·x1 with x0 noise and x1 clean; the target velocity is v* = x1 - x0.
Two parameterisations of the network output share these functions:

* "velocity" (the official models): the output is v, the loss is |v - v*|².
* "clean": the output is an estimate of x1; its velocity is (x1_hat - x_t) / (1 - t) and the
  loss is |x1_hat - x1|², i.e. the velocity loss weighted by (1 - t)². A demo choice for tiny
  models whose patches are wider than the model (see experiments/configs/bouncing_tiny.py):
  predicting the clean frame leaves no residual noise in the background.
"""

from __future__ import annotations

import jax.numpy as jnp

F32 = jnp.float32
PREDICTIONS = ("velocity", "clean")
MIN_ONE_MINUS_T = 1e-3     # clean -> velocity conversion at t -> 1


def check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def frame_t(t_chunks, frames_per_chunk: int):
  """(N, K) per-chunk levels -> (N, K·F) per latent frame."""
  return jnp.repeat(jnp.asarray(t_chunks, F32), frames_per_chunk, axis=1)


def interpolate(x0, x1, t_frames):
  """x0, x1 (N, C, T, H, W); t_frames (N, T)."""
  t = jnp.asarray(t_frames, F32)[:, None, :, None, None]
  return (1.0 - t) * x0 + t * x1


def velocity_target(x0, x1):
  return x1 - x0


def clean_to_velocity(x1_hat, x_t, t_frames):
  """The velocity of a clean-sample estimate: (x1_hat - x_t) / (1 - t)."""
  t = jnp.asarray(t_frames, F32)[:, None, :, None, None]
  return (x1_hat - x_t) / jnp.maximum(1.0 - t, MIN_ONE_MINUS_T)


def clean_estimate(out, x_t, t_frames, prediction: str):
  """The network's estimate of x1 from its output `out` at x_t: the output itself for
  "clean", x_t + (1 - t)·v for "velocity"."""
  check_prediction(prediction)
  if prediction == "clean":
    return out.astype(F32)
  t = jnp.asarray(t_frames, F32)[:, None, :, None, None]
  return x_t.astype(F32) + (1.0 - t) * out.astype(F32)


def per_frame_sq_error(pred, x0, x1, prediction: str):
  """(N, T) mean squared error per frame of the network output against its target."""
  target = x1 if prediction == "clean" else velocity_target(x0, x1)
  return jnp.mean(jnp.square(pred.astype(F32) - target.astype(F32)), axis=(1, 3, 4))


def weighted_mean(per_frame, frame_weight):
  """Mean over the frames with weight > 0 (all videos of the batch pooled): packing the same
  videos differently gives the same loss."""
  w = jnp.asarray(frame_weight, F32)
  return jnp.sum(per_frame * w) / jnp.maximum(jnp.sum(w), 1e-8)
