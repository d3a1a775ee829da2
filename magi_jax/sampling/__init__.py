"""The autoregressive chunk sampler: schedule, window plan, guided step, streaming driver."""

from magi_jax.sampling.sampler import (CallRecord, Chunk, Sampler, SamplerError, SamplerOptions,
                                       final_latent)
from magi_jax.sampling.schedule import distill_intervals, guidance_bucket, nearly_clean, timesteps
from magi_jax.sampling.window import StepPlan, plan_steps
