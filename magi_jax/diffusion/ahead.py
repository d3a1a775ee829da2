"""Compiling a video's sampler steps ahead of time, in the background.

The sampler calls one compiled step per distinct call signature (chunks in the call, refresh,
cached chunks, nearly-clean copy, static key ranges, shapes): a short video needs a dozen.
Jitted on first use, each compile blocks the chunk that needs it. `compile_ahead` enumerates
the calls of a video from the plan alone (`Sampler.calls`: no arrays, no model call), builds
their abstract inputs and compiles them on a thread pool, first calls first, while the caller
goes on (loading the text encoder and the VAE, encoding the prompt). The sampler's calls then
pick up the executables (`make_step`'s `step.ahead`), waiting only for a compile still
running. The compiled programs are the jitted step's own, so the results are identical.

Shapes follow what `Sampler.sample` builds: latents and levels float32, text rows and masks
float32 of (text_length, text_dim), key ranges int32, the KV cache in the DiT's compute dtype.
A prefix of whole chunks (V2V) also needs the prefill pass, which is compiled on first use.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import jax
import numpy as np

from magi_jax.models.kv_cache import KVCache
from magi_jax.diffusion.step import StepInputs

F32, I32 = np.float32, np.int32


@dataclasses.dataclass
class Ahead:
  """The background compiles of one video: `wait()` blocks until all are done (and raises a
  compile's error); `done()` counts the finished ones."""
  futures: list
  pool: concurrent.futures.ThreadPoolExecutor

  def done(self) -> int:
    return sum(f.done() for f in self.futures)

  def wait(self) -> int:
    for f in self.futures:
      f.result()
    self.pool.shutdown(wait=True)
    return len(self.futures)


def _abstract_inputs(sampler, call, *, latent_hw, tokens_per_chunk, text_length, text_dim):
  m = sampler.model.cfg
  chunk_width = sampler.cfg.runtime.chunk_width
  h, w = latent_hw
  n, d = len(call.plan.chunks), call.plan.num_denoised
  a = jax.ShapeDtypeStruct
  cache = None
  if call.cached_chunks:
    shape = (m.num_layers, 1, call.cached_chunks * tokens_per_chunk, m.num_query_groups,
             m.head_dim)
    dtype = sampler.model.precision.compute_dtype
    cache = KVCache(a(shape, dtype), a(shape, dtype))
  return StepInputs(
      x=a((1, m.latent_channels, n * chunk_width, h, w), F32), t=a((n,), F32), dt=a((d,), F32),
      y_cond=a((n, text_length, text_dim), F32), m_cond=a((n, text_length), F32),
      y_null=a((1, text_length, text_dim), F32), m_null=a((1, text_length), F32),
      ranges=a((n, 2), I32), first_chunk=a((), I32), cache=cache, scale_prev=a((d,), F32),
      scale_text=a((d,), F32), blend=a((), F32),
      step_size=a((), F32) if sampler.cfg.engine.distill else None)


def compile_ahead(sampler, *, latent_hw: tuple[int, int], num_chunks: int,
                  prefix_latent_frames: int = 0, text_length: int | None = None,
                  text_dim: int | None = None, workers: int | None = None) -> Ahead:
  """Starts compiling every distinct step of a video of `num_chunks` chunks (latent size
  `latent_hw`, a prefix of `prefix_latent_frames` latent frames) and returns at once."""
  m = sampler.model.cfg
  text_length = text_length or m.caption_max_length
  text_dim = text_dim or m.caption_channels
  h, w = latent_hw
  tokens_per_chunk = (sampler.cfg.runtime.chunk_width // m.t_patch_size) * (h // m.patch_size) * (
      w // m.patch_size)
  # One compile per two cores (up to 4), first calls first: the caller keeps a core for its
  # own loading, and the first chunk's steps are not slowed by the later ones.
  workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="magi-compile")
  futures, seen = [], set()
  for call in sampler.calls(num_chunks, prefix_latent_frames, tokens_per_chunk):
    inputs = _abstract_inputs(sampler, call, latent_hw=latent_hw,
                              tokens_per_chunk=tokens_per_chunk, text_length=text_length,
                              text_dim=text_dim)
    future = sampler.step.ahead(inputs, call.options, pool.submit)
    if id(future) not in seen:
      seen.add(id(future))
      futures.append(future)
  return Ahead(futures, pool)
