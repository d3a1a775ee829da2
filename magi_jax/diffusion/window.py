"""The window schedule (official inference/pipeline/video_generate.py): which chunks
each step denoises.

Up to `window` chunks are in flight, staggered by `dsps = num_steps // window` steps, the
oldest (cleanest) first. Stage i (= n_clean + stage counter) holds chunks [c0, c1); a chunk in
window slot j is at its own step σ = j·dsps + idx. At the first step of a stage in which the
window has moved, the chunk that just finished is re-run at `clean_t` ("refresh") so its keys
and values enter the cache. Everything here is plain Python over integers.
"""

from __future__ import annotations

import dataclasses

from magi_jax.attention.masks import chunk_kv_ranges


@dataclasses.dataclass(frozen=True)
class StepPlan:
  step: int                      # global step counter s
  idx: int                       # local step inside the stage (s mod dsps)
  c0: int                        # first denoised chunk
  c1: int                        # one past the last denoised chunk
  step_indices: tuple[int, ...]  # per denoised chunk (oldest first): its own step index σ
  refresh: bool                  # chunk c0 - 1 is re-run at clean_t in front of the window
  emits: int | None              # chunk that is clean after this step (c0 when σ reaches the end)

  @property
  def slice_point(self) -> int:
    return self.c0 - 1 if self.refresh else self.c0

  @property
  def chunks(self) -> range:
    """Absolute chunk indices of the call, refresh chunk included."""
    return range(self.slice_point, self.c1)

  @property
  def num_denoised(self) -> int:
    return self.c1 - self.c0


def plan_steps(num_chunks: int, num_clean: int, window: int, num_steps: int) -> list[StepPlan]:
  """Every step of one video: chunks [num_clean, num_chunks) go from t = 0 to 1."""
  if num_steps % window:
    raise ValueError(f"num_steps {num_steps} must be divisible by window_size {window}")
  if not 0 <= num_clean < num_chunks:
    raise ValueError(f"need 0 <= clean chunks ({num_clean}) < chunks ({num_chunks})")
  dsps = num_steps // window
  plans = []
  for s in range(dsps * (num_chunks + window - 1 - num_clean)):
    stage, idx = divmod(s, dsps)
    i = num_clean + stage
    c0, c1 = max(num_clean, i - window + 1), min(num_chunks, i + 1)
    j0, j1 = max(0, i - num_chunks + 1), min(window, i - num_clean + 1)
    step_indices = tuple(j * dsps + idx for j in range(j1 - 1, j0 - 1, -1))
    assert len(step_indices) == c1 - c0
    plans.append(StepPlan(s, idx, c0, c1, step_indices, refresh=(c0 > num_clean and idx == 0),
                          emits=c0 if step_indices[0] == num_steps - 1 else None))
  return plans


def kv_width(step_index: int, num_steps: int, noise2clean_kvrange) -> int | None:
  """Chunks a denoised chunk at step σ attends to (itself included); None = all earlier."""
  if not noise2clean_kvrange:
    return None
  q = num_steps // len(noise2clean_kvrange)
  return int(noise2clean_kvrange[step_index // q])


def call_widths(plan: StepPlan, num_steps: int, noise2clean_kvrange,
                clean_chunk_kvrange: int) -> list[int | None]:
  """The kv-range width of each chunk of a call, refresh chunk first: the refresh chunk's is
  `clean_chunk_kvrange` (-1 in the official config: every earlier chunk, None here)."""
  clean = None if clean_chunk_kvrange == -1 else clean_chunk_kvrange
  return [clean] * plan.refresh + [kv_width(s, num_steps, noise2clean_kvrange)
                                   for s in plan.step_indices]


def call_ranges(plan: StepPlan, widths, tokens_per_chunk: int):
  """(absolute ranges, cached chunks read): the call's key ranges from the start of the video
  (the official kv_range of one element) and how many chunks before `slice_point` they reach."""
  absolute = chunk_kv_ranges(list(plan.chunks), widths=widths)
  need = max(0, plan.slice_point - int(absolute[:, 0].min()))
  return absolute * tokens_per_chunk, need


def cache_chunks_needed(plans, num_steps: int, noise2clean_kvrange, clean_width: int) -> int:
  """The most cached chunks any call reads (how many the bounded cache must keep)."""
  return max((call_ranges(p, call_widths(p, num_steps, noise2clean_kvrange, clean_width), 1)[1]
              for p in plans), default=0)
