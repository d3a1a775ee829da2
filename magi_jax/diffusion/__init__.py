"""The autoregressive chunk sampler: schedule, window plan, guided step, streaming driver."""

from magi_jax.diffusion.sampler import (CallRecord, Chunk, Sampler, SamplerError, SamplerOptions,
                                       final_latent)
from magi_jax.diffusion.schedule import distill_intervals, guidance_bucket, nearly_clean, timesteps
from magi_jax.diffusion.window import StepPlan, plan_steps

__all__ = ["CallRecord", "Chunk", "Sampler", "SamplerError", "SamplerOptions", "StepPlan",
           "distill_intervals", "final_latent", "guidance_bucket", "nearly_clean", "plan_steps",
           "timesteps"]
