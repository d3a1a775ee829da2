"""Compiling a video's sampler steps ahead of time, in the background.

The sampler calls one compiled step per distinct call signature (chunks in the call, refresh,
cached chunks, nearly-clean copy, static key ranges, shapes): a short video needs a dozen.
Jitted on first use, each compile blocks the chunk that needs it. `compile_ahead` enumerates
the calls of a video from the plan alone (`Sampler.calls`: no arrays, no model call), builds
their abstract inputs and compiles them on a thread pool, first calls first, while the caller
goes on (loading the text encoder and the VAE, encoding the prompt). The sampler's calls then
pick up the executables (`make_step`'s `step.ahead`), waiting only for a compile still
running. The compiled programs are the jitted step's own, so the results are identical.

Shapes follow what `Sampler.sample` builds (`step.abstract_inputs`, the planner's too): latents
and levels float32, text rows and masks float32, key ranges int32, the KV cache in the DiT's
compute dtype.
A prefix of whole chunks (V2V) also needs the prefill pass, which is compiled on first use.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

from magi_jax.diffusion.step import abstract_inputs, tokens_per_chunk


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


def compile_ahead(sampler, *, latent_hw: tuple[int, int], num_chunks: int,
                  prefix_latent_frames: int = 0, workers: int | None = None) -> Ahead:
  """Starts compiling every distinct step of a video of `num_chunks` chunks (latent size
  `latent_hw`, a prefix of `prefix_latent_frames` latent frames) and returns at once."""
  m, chunk_width = sampler.model.cfg, sampler.cfg.runtime.chunk_width
  # One compile per two cores (up to 4), first calls first: the caller keeps a core for its
  # own loading, and the first chunk's steps are not slowed by the later ones.
  workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="magi-compile")
  futures, seen = [], set()
  for call in sampler.calls(num_chunks, prefix_latent_frames,
                            tokens_per_chunk(m, chunk_width, latent_hw)):
    inputs = abstract_inputs(m, chunk_width=chunk_width, call_chunks=len(call.plan.chunks),
                             denoised=call.plan.num_denoised, latent_hw=latent_hw,
                             cached_chunks=call.cached_chunks,
                             cache_dtype=sampler.model.precision.compute_dtype,
                             distill=bool(sampler.cfg.engine.distill))
    future = sampler.step.ahead(inputs, call.options, pool.submit)
    if id(future) not in seen:
      seen.add(id(future))
      futures.append(future)
  return Ahead(futures, pool)
