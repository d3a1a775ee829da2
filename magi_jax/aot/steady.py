"""Which sampler calls a long video repeats: the steady state of the denoising window.

The sampler (magi_jax.diffusion.sampler) compiles one step per distinct call shape: chunks in
the call (refresh chunk included), refresh or not, cached chunks read, nearly-clean copy. Once
the window is full, every stage repeats the same shapes, whatever the video length; those are
the programs a capacity plan must fit. With the official kv ranges the window itself covers
every range at the refresh step, so a stage has two shapes: the refresh call (window + the
finished chunk, no cache) and the other calls (window + the cached chunks the kv ranges reach).

`steady_calls(cfg, chunks)` returns the distinct call shapes of the stage whose calls are
largest (chunks in the call + nearly-clean copy + cached chunks; the latest such stage), i.e.
the steady state of a long video, or the peak stage of a short one. Pure Python, T2V (no
prefix chunks; I2V calls have the same shapes).
"""

from __future__ import annotations

import dataclasses
import math

from magi_jax.configs import MagiConfig
from magi_jax.diffusion import schedule
from magi_jax.diffusion.window import StepPlan, call_ranges, call_widths, plan_steps


@dataclasses.dataclass(frozen=True)
class CallShape:
  plan: StepPlan               # the first step of the stage with this shape
  cache_chunks: int            # cached chunks the call reads
  nearly_clean: bool           # cfg 1: the oldest chunk's isolated copy is appended

  @property
  def call_chunks(self) -> int:
    return len(self.plan.chunks)

  @property
  def name(self) -> str:
    parts = ["step"]
    if self.plan.refresh:
      parts.append("refresh")
    if self.cache_chunks:
      parts.append(f"cache{self.cache_chunks}")
    if self.nearly_clean:
      parts.append("nearly")
    return "+".join(parts)

  def describe(self) -> str:
    p = self.plan
    return (f"chunks [{p.slice_point}, {p.c1}) = {self.call_chunks} in the call"
            f"{' (refresh of chunk ' + str(p.slice_point) + ')' if p.refresh else ''}, "
            f"{self.cache_chunks} cached, nearly_clean={self.nearly_clean}")


def cache_chunks(plan: StepPlan, cfg: MagiConfig) -> int:
  """Cached chunks this call reads (the sampler's `need`)."""
  rt = cfg.runtime
  widths = call_widths(plan, rt.num_steps, rt.noise2clean_kvrange, rt.clean_chunk_kvrange)
  return call_ranges(plan, widths, 1)[1]


def default_chunks(cfg: MagiConfig) -> int:
  """Enough chunks for a full window whose kv ranges reach no further back than the video
  start: window + widest kv range + 1. With unbounded ranges (the cache grows with the
  video, no steady state) the preset's own video length (runtime num_frames)."""
  rt = cfg.runtime
  widths = list(rt.noise2clean_kvrange) + [rt.clean_chunk_kvrange]
  if rt.noise2clean_kvrange and min(widths) >= 1:
    return rt.window_size + max(widths) + 1
  return max(1, math.ceil(rt.num_frames / (rt.chunk_width * rt.temporal_downsample_factor)))


def steady_calls(cfg: MagiConfig, num_chunks: int) -> list[CallShape]:
  rt, eng = cfg.runtime, cfg.engine
  plans = plan_steps(num_chunks, 0, rt.window_size, rt.num_steps)
  ts = schedule.timesteps(rt.num_steps, eng.shortcut_mode)
  dsps = rt.num_steps // rt.window_size
  stages: dict[int, list[CallShape]] = {}
  for p in plans:
    nearly = rt.cfg_number == 1 and schedule.nearly_clean(
        ts[p.step_indices[0]], eng.distill_nearly_clean_chunk_threshold)
    stages.setdefault(p.step // dsps, []).append(CallShape(p, cache_chunks(p, cfg), bool(nearly)))
  size = lambda c: c.call_chunks + c.nearly_clean + c.cache_chunks
  best = max(stages, key=lambda s: (max(size(c) for c in stages[s]), s))
  shapes: dict[tuple, CallShape] = {}
  for c in stages[best]:
    shapes.setdefault((c.call_chunks, c.plan.refresh, c.cache_chunks, c.nearly_clean), c)
  return list(shapes.values())
