"""The optimizer of the report (MAGI-1 report, arXiv 2505.13211): AdamW (0.9, 0.95), weight decay
0.1, linear warm-up, global-norm clipping, as one optax chain built from the config.

Weight decay applies to matrices only (kernels, embeddings); norms, biases, the learned RoPE
bands and the null caption rows are not decayed (the report does not say; this is the usual
choice for transformers).
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate(peak: float, warmup_steps: int, total_steps: int, schedule: str = "constant",
                  end_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then constant / cosine / linear decay
  to `end_lr` at `total_steps`."""
  if schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {schedule!r}")
  if peak <= 0 or warmup_steps < 0 or total_steps < 1:
    raise ValueError(f"bad learning-rate settings: peak {peak}, warmup {warmup_steps}, "
                     f"total {total_steps}")
  warm = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  rest = max(total_steps - warmup_steps, 1)
  if schedule == "constant":
    after = optax.constant_schedule(peak)
  elif schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, rest, alpha=end_lr / peak)
  else:
    after = optax.linear_schedule(peak, end_lr, rest)
  if warmup_steps == 0:
    return after
  return optax.join_schedules([warm, after], [warmup_steps])


def decay_mask(params):
  """True for parameters that get weight decay: arrays with two or more dims, except the
  null caption rows (a learned input, not a weight)."""
  def keep(path, x):
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    return x.ndim >= 2 and "null_caption_embedding" not in names
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.95,
                   weight_decay: float = 0.1, grad_clip: float = 1.0, eps: float = 1e-8):
  parts = []
  if grad_clip and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)
