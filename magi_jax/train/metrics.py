"""Where training metrics go: TensorBoard event files, a log line with ETA, a loss plot.

tensorboardX writes TensorBoard event files without TensorFlow (flax's and clu's writers
need it). Scalars are the mean over each logging interval; the per-level loss is the mean of
the chunk losses whose t fell in each bucket of `objective.T_BUCKETS`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from magi_jax.train.objective import T_BUCKETS


def bucket_names():
  return [f"loss_t/{a:.1f}-{b:.1f}" for a, b in zip(T_BUCKETS[:-1], T_BUCKETS[1:])]


class MetricsLog:
  """Accumulates per-step metrics; `flush(step)` writes the interval means everywhere."""

  def __init__(self, workdir: str, *, total_steps: int, enabled: bool = True,
               resume_step: int = 0):
    """resume_step: the step the run (re)starts from; points logged after it by an earlier
    attempt are dropped from metrics.jsonl and TensorBoard (its `purge_step`), so every step
    appears once however often the run resumed."""
    self.workdir, self.total_steps = workdir, total_steps
    # In a multi-host run every process computes the same (replicated) metrics; one writes.
    self.primary = jax.process_index() == 0
    self.enabled = enabled
    self.history_path = os.path.join(workdir, "metrics.jsonl")
    self.resume_step, self._extra_files = resume_step, set()
    if self.primary:
      drop_history_after(self.history_path, resume_step)
    self.writer = None
    if enabled and self.primary:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                  purge_step=resume_step + 1)
    self._reset()
    self._t0 = time.time()
    self._t_last = time.time()
    self._start_step = None

  def _reset(self):
    self.sums, self.n, self.skipped = {}, 0, 0
    self.bucket_sum = np.zeros(len(T_BUCKETS) - 1)
    self.bucket_n = np.zeros(len(T_BUCKETS) - 1)
    self.tokens = 0.0
    self.by_size = {}

  def add(self, m: dict) -> None:
    m = {k: np.asarray(v) for k, v in m.items()}
    if int(m["finite"]) == 0:
      self.skipped += 1
    else:
      for k in ("loss", "grad_norm"):
        self.sums[k] = self.sums.get(k, 0.0) + float(m[k])
      self.bucket_sum += m["bucket_loss_sum"]
      self.bucket_n += m["bucket_count"]
      self.n += 1
      if "step_size" in m:        # distillation: the loss of each step size on its own
        name = f"loss_s/1_{round(1 / float(m['step_size']))}"
        total, count = self.by_size.get(name, (0.0, 0))
        self.by_size[name] = (total + float(m["loss"]), count + 1)
    self.sums["learning_rate"] = float(m["learning_rate"])
    self.tokens += float(m["tokens"])

  def flush(self, step: int) -> dict:
    now = time.time()
    if self._start_step is None:
      self._start_step = step
    dt = max(now - self._t_last, 1e-9)
    steps = max(self.n + self.skipped, 1)
    out = {k: v / max(self.n, 1) for k, v in self.sums.items() if k != "learning_rate"}
    out["learning_rate"] = self.sums.get("learning_rate", 0.0)
    out["skipped_steps"] = self.skipped
    out["step_time_s"] = dt / steps
    out["tokens_per_s"] = self.tokens / dt
    for name, s, n in zip(bucket_names(), self.bucket_sum, self.bucket_n):
      if n:
        out[name] = s / n
    for name, (total, count) in sorted(self.by_size.items()):
      out[name] = total / count
    if self.writer is not None:
      for k, v in out.items():
        self.writer.add_scalar(k, v, step)
      self.writer.flush()
    if self.primary:
      with open(self.history_path, "a") as f:
        f.write(json.dumps({"step": step, **out}) + "\n")
    self._t_last = now
    self._reset()
    return out

  def line(self, step: int, out: dict, steps_done_here: int, committed: int | None = None) -> str:
    """The log line; `committed`: the newest checkpoint whose save has finished."""
    elapsed = time.time() - self._t0
    rate = elapsed / max(steps_done_here, 1)
    eta = rate * max(self.total_steps - step, 0)
    return (f"step {step}/{self.total_steps}  loss {out.get('loss', float('nan')):.4f}  "
            f"grad {out.get('grad_norm', float('nan')):.3f}  lr {out['learning_rate']:.2e}  "
            f"{out['step_time_s'] * 1000:.0f} ms/step  {out['tokens_per_s']:.0f} tok/s  "
            f"ETA {eta / 60:.1f} min"
            + (f"  skipped {out['skipped_steps']}" if out["skipped_steps"] else "")
            + (f"  saved {committed}" if committed is not None else ""))

  def scalars(self, step: int, values: dict, filename: str) -> None:
    """Writes `values` as TensorBoard scalars at `step` and as one row of <workdir>/filename
    (rows past the resume step of an earlier attempt are dropped first, as for metrics.jsonl)."""
    if not self.primary:
      return
    path = os.path.join(self.workdir, filename)
    if path not in self._extra_files:
      drop_history_after(path, self.resume_step)
      self._extra_files.add(path)
    if self.writer is not None:
      for k, v in values.items():
        self.writer.add_scalar(k, v, step)
      self.writer.flush()
    with open(path, "a") as f:
      f.write(json.dumps({"step": step, **values}) + "\n")

  def add_image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
    if self.writer is not None:
      self.writer.add_image(tag, image_hwc, step, dataformats="HWC")
      self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()


def drop_history_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without its rows past `step` (atomically; a torn last line of a
  killed run goes too)."""
  if not os.path.exists(path):
    return
  keep, changed = [], False
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        changed = True
        continue
      if int(row.get("step", 0)) > step:
        changed = True
        continue
      keep.append(line if line.endswith("\n") else line + "\n")
  if changed:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


def plot_loss_curve(history_path: str, out_png: str) -> None:
  """Loss (and per-level loss) against step, from metrics.jsonl."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = []
  with open(history_path) as f:
    for line in f:
      if line.strip():
        rows.append(json.loads(line))
  if not rows:
    return
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  steps = [r["step"] for r in rows]
  ax.plot(steps, [r.get("loss", np.nan) for r in rows], label="loss", lw=2)
  for name in bucket_names():
    ax.plot(steps, [r.get(name, np.nan) for r in rows], label=name.split("/")[1], lw=0.8)
  ax.set_xlabel("step")
  ax.set_ylabel("flow-matching loss")
  ax.set_yscale("log")
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_png)
  plt.close(fig)
