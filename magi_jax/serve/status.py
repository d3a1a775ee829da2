"""The page's status line (Markdown): where a request is, and each chunk's time.

    **request 3 · chunk 2/3** · 16 / 24 frames · 1.9 s for this chunk
    | chunk | frames | seconds |   (one row per finished chunk)

and, once the video is complete, `**request 3 · done** · 24 frames, 64x64, 3 chunks in 7.1 s`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Status:
  request: int
  chunks: int                 # chunks the request hands over
  frames: int                 # frames the finished video has (the frame plan)
  times: list = dataclasses.field(default_factory=list)      # seconds of each finished chunk
  counts: list = dataclasses.field(default_factory=list)     # frames of each finished chunk

  def add(self, new_frames: int, seconds: float) -> None:
    self.counts.append(new_frames)
    self.times.append(seconds)

  def _table(self) -> str:
    rows = [f"| {i + 1} | {n} | {t:.2f} |"
            for i, (n, t) in enumerate(zip(self.counts, self.times))]
    return "\n".join(["| chunk | frames | seconds |", "|---|---|---|", *rows])

  def waiting(self) -> str:
    return (f"**request {self.request} · generating chunk 1/{self.chunks}** · {self.frames} "
            "frames to make (the first chunk includes loading the prefix and, on a new size, "
            "compiling)")

  def running(self) -> str:
    done = sum(self.counts)
    return (f"**request {self.request} · chunk {len(self.times)}/{self.chunks}** · {done} / "
            f"{self.frames} frames · {self.times[-1]:.2f} s for this chunk\n\n{self._table()}")

  def finished(self, width: int, height: int, seconds: float) -> str:
    return (f"**request {self.request} · done** · {sum(self.counts)} frames, {width}x{height}, "
            f"{len(self.times)} chunks in {seconds:.1f} s\n\n{self._table()}")
