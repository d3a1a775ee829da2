"""What the page plays while a video is generated: one small mp4 per chunk.

Streaming (`gr.Video(streaming=True)`): each chunk's frames become their own mp4 segment
(`segment_000.mp4`, ...), which gradio remuxes into its HLS stream, so the player grows by one
chunk at a time. That needs ffmpeg and ffprobe on PATH (gradio calls them; the mp4 writer of
`magi_jax.media` uses the ffmpeg of imageio-ffmpeg); without them the page falls back to a plain
player fed after each chunk with an mp4 of every frame so far (`so_far_000.mp4`, ...), which
keeps the frames in memory until the request ends. ffmpeg without ffprobe is refused at start
(gradio probes every video it shows once ffmpeg is there).
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from magi_jax.media import VideoWriter
from magi_jax.serve.errors import ServeError

STREAM_TOOLS = ("ffmpeg", "ffprobe")


def can_stream() -> bool:
  """Whether gradio's streaming video output has its tools here (both, or neither: gradio
  probes every video it shows with ffprobe once ffmpeg is on PATH)."""
  found = [tool for tool in STREAM_TOOLS if shutil.which(tool)]
  if found == ["ffmpeg"]:
    raise ServeError("ffmpeg is on PATH but ffprobe is not, and gradio's video player needs "
                     "both: install ffprobe with it (Debian: apt-get install ffmpeg) or take "
                     "ffmpeg off PATH")
  return len(found) == len(STREAM_TOOLS)


class Preview:
  """Writes the file the player gets after each chunk, in the request's own directory."""

  def __init__(self, directory: str, height: int, width: int, *, streaming: bool,
               fps: int = 24):
    self.directory, self.height, self.width, self.fps = directory, height, width, fps
    self.streaming = streaming
    self._frames: list[np.ndarray] = []
    self.count = 0

  def add(self, frames: np.ndarray) -> str:
    """The path of the file for the chunk `frames` (T, H, W, 3) uint8."""
    stem = "segment" if self.streaming else "so_far"
    path = os.path.join(self.directory, f"{stem}_{self.count:03d}.mp4")
    self.count += 1
    if not self.streaming:
      self._frames.append(frames)
    with VideoWriter(path, self.height, self.width, fps=self.fps) as writer:
      for part in ([frames] if self.streaming else self._frames):
        writer.append(part)
    return path
