"""A DiT trained to predict the clean sample, seen by the sampler as a velocity model.

The sampler only speaks velocities. `CleanPredictionDiT` wraps a `VideoDiT` whose output is
an estimate of x1 and returns v = (x1_hat - x) / (1 - t) per chunk, the velocity of that
estimate (magi_jax.diffusion.flow). Everything else (config, input checks, KV cache) is the
wrapped model's.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from magi_jax.diffusion.flow import clean_to_velocity, frame_t

F32 = jnp.float32


class CleanPredictionDiT(nnx.Module):

  def __init__(self, dit):
    self.dit = dit
    self.cfg = dit.cfg
    self.distill = dit.distill
    self.precision = dit.precision

  def check_inputs(self, *args, **kwargs):
    return self.dit.check_inputs(*args, **kwargs)

  def __call__(self, x, t, *args, **kwargs):
    out = self.dit(x, t, *args, **kwargs)
    t_frames = frame_t(t, x.shape[2] // t.shape[1])
    return dataclasses.replace(out, velocity=clean_to_velocity(out.velocity, x.astype(F32),
                                                               t_frames))


def as_velocity_model(dit, prediction: str):
  """The model the sampler should call for a DiT trained with `prediction`."""
  if prediction == "velocity":
    return dit
  if prediction == "clean":
    return CleanPredictionDiT(dit)
  raise ValueError(f"prediction must be 'velocity' or 'clean', got {prediction!r}")
