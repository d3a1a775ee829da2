"""The official timestep schedule and the per-step scalars derived from it (pure numpy, f32).

t = 0 is noise and t = 1 is clean. u = linspace(0, 1, n + 1) evaluated the way torch does it
in float32 (or the 12-step shortcut grid), then the "sd3" warp with shift 3:
t = (c1·u²) / (1 + c2·u²), c1 = 1/3 and c2 = 1/3 - 1 each rounded once from double to f32.
Every operation is float32 in the official order, so the schedule is bit-exact; this matters
because entries land exactly on guidance bucket edges (0.1, 0.3) and on the distilled
nearly-clean test `t > 0.3`, which is made in double on the f32 value (f32(0.3) passes).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
SHIFT = 3.0
SHORTCUT_BASE = (0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)
# Which base offsets each 12-step shortcut mode keeps (u-steps per quarter in 1/16 units).
SHORTCUT_KEEP = {"8,16,16": (0, 2, 3), "16,16,8": (0, 1, 2)}
SHORTCUT_INTERVALS = {"8,16,16": (2, 1, 1), "16,16,8": (1, 1, 2)}


def torch_linspace_f32(num_steps: int) -> np.ndarray:
  """torch.linspace(0, 1, num_steps + 1) in float32: first half i·step, second 1 - (n-i)·step."""
  n = num_steps + 1
  step = F32(1.0) / F32(num_steps)
  i = np.arange(n)
  lo = i.astype(F32) * step
  hi = F32(1.0) - (num_steps - i).astype(F32) * step
  return np.where(i < n // 2, lo, hi).astype(F32)


def shortcut_grid(shortcut_mode: str) -> np.ndarray:
  if shortcut_mode not in SHORTCUT_KEEP:
    raise ValueError(f"shortcut_mode must be one of {sorted(SHORTCUT_KEEP)}, got {shortcut_mode!r}")
  offsets = np.array([SHORTCUT_BASE[k] for k in SHORTCUT_KEEP[shortcut_mode]], F32)
  u = np.concatenate([offsets + F32(a) for a in (0.0, 0.25, 0.5, 0.75, 1.0)])
  return u[:13].astype(F32)


def sd3_warp(u: np.ndarray, shift: float = SHIFT) -> np.ndarray:
  c1 = F32(1.0 / shift)
  c2 = F32(1.0 / shift - 1.0)
  x = (u * u).astype(F32)
  return ((c1 * x) / (F32(1.0) + c2 * x)).astype(F32)


def timesteps(num_steps: int, shortcut_mode: str = "8,16,16") -> np.ndarray:
  """(num_steps + 1,) float32; entry σ is the t a chunk has before its σ-th update."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  u = shortcut_grid(shortcut_mode) if num_steps == 12 else torch_linspace_f32(num_steps)
  return sd3_warp(u)


def distill_intervals(num_steps: int, shortcut_mode: str = "8,16,16") -> np.ndarray:
  """Per local stage step: the u-step in 1/16 units ([2,1,1]... or [1,1,2]...; else ones)."""
  if num_steps % 3 == 0:
    return np.resize(np.array(SHORTCUT_INTERVALS[shortcut_mode]), num_steps)
  return np.ones(num_steps, np.int64)


def guidance_bucket(t: float, cfg_t_range) -> int:
  """Index into prev_chunk_scales / text_scales: #{b : f32(b - 1e-7) < t} - 1 (f32 values)."""
  edges = np.asarray(cfg_t_range, F32) - F32(1e-7)
  return max(int(np.sum(edges < F32(t))) - 1, 0)


def nearly_clean(t: float, threshold: float) -> bool:
  """The official test: the f32 t read as a double, compared with a double threshold."""
  return float(F32(t)) > float(threshold)
