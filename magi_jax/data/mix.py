"""Several batch streams as one: each step takes its batch from one stream, drawn by weight.

Why: a real run mixes images with videos (MAGI-1's report: 4:1) and several frame sizes
(aspect-ratio buckets). Each stream keeps one static batch shape, so the jitted step compiles
once per stream and never pads a portrait clip into a landscape row. The draw of step n is
`default_rng([seed, n])` over the normalised weights: the same on every process (they all run
the same program at each step) and after a restore, since the state is the step count and each
stream's own grain state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from magi_jax.data.errors import DataError


class MixedIterator:
  """next() -> the batch of the stream step n draws, with that stream's `marks` added.

  streams: name -> iterator of batch dicts (with get_state / set_state);
  weights: name -> weight >= 0 (at least one positive);
  marks: name -> dict of arrays merged into that stream's batches (e.g. an image flag)."""

  def __init__(self, streams: Mapping, weights: Mapping[str, float], seed: int,
               marks: Mapping[str, dict] | None = None):
    if set(streams) != set(weights):
      raise DataError(f"streams {sorted(streams)} and weights {sorted(weights)} differ")
    self.names = sorted(streams)
    w = np.array([float(weights[n]) for n in self.names], np.float64)
    if not len(w) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
      raise DataError(f"stream weights must be >= 0 with a positive sum, got {dict(weights)}")
    self.p = w / w.sum()
    self.streams, self.seed, self.step = dict(streams), int(seed), 0
    self.marks = {n: dict((marks or {}).get(n, {})) for n in self.names}

  def pick(self, step: int) -> str:
    if len(self.names) == 1:
      return self.names[0]
    u = np.random.default_rng([self.seed, step]).random()
    return self.names[min(int(np.searchsorted(np.cumsum(self.p), u, side="right")),
                          len(self.names) - 1)]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    name = self.pick(self.step)
    batch = dict(next(self.streams[name]))
    self.step += 1
    for k, v in self.marks[name].items():
      batch[k] = v
    return batch

  def get_state(self) -> dict:
    return {"step": self.step, "streams": {n: self.streams[n].get_state() for n in self.names}}

  def set_state(self, state: dict) -> None:
    if sorted(state.get("streams", {})) != self.names:
      raise DataError(f"the saved data position has streams {sorted(state.get('streams', {}))}, "
                      f"this run has {self.names}: the data changed since the checkpoint")
    self.step = int(state["step"])
    for n in self.names:
      self.streams[n].set_state(state["streams"][n])

  def start_prefetch(self) -> None:
    for it in self.streams.values():
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()
