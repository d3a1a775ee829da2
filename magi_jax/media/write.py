"""Writing generated frames: streaming H.264 mp4 (the official settings of
inference/pipeline/video_process.py) or GIF.

mp4: the official ffmpeg call, `-f rawvideo -pix_fmt rgb24 -s WxH -r FPS -i -` ->
`-f mp4 -vcodec libx264 -pix_fmt yuv420p` with x264's defaults written out (CRF 23, preset
medium). Frames stream into ffmpeg's stdin, so the video never sits in memory as a whole.
The codec is lossy: compare uint8 frames BEFORE writing when checking parity.

gif: Pillow, frames are buffered in memory until close (GIFs are previews: keep them short).
GIF delays are whole centiseconds, so per-frame delays alternate (40, 40, 50 ms at 24 fps) to
keep the average rate exact. Pillow merges a frame identical to the previous one into it
(adding its delay): playback timing is kept but a reader may count fewer frames.
"""

from __future__ import annotations

import numbers
import os
import subprocess
import tempfile

import numpy as np

from magi_jax.media.errors import MediaError, ffmpeg_error, media_error

FORMATS = (".mp4", ".gif")


def to_uint8(x, compute_dtype=np.float32) -> np.ndarray:
  """Decoder pixels in [-1, 1] -> uint8, in the official order: x*127.5 + 127.5, clamp, truncate.

  Each step is rounded to `compute_dtype`. The official decode runs it on bf16 tensors; pass
  `ml_dtypes.bfloat16` (with bf16 input) to reproduce that rounding.
  """
  x = np.asarray(x).astype(compute_dtype)
  y = x * np.asarray(127.5, compute_dtype) + np.asarray(127.5, compute_dtype)
  y = np.clip(y.astype(np.float32), 0, 255)
  return y.astype(np.uint8)       # truncation toward zero, as torch's .type(torch.uint8)


def _format(path) -> str:
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext not in FORMATS:
    raise media_error(path, f"unknown video extension {ext or '(none)'!r}; use one of {FORMATS}")
  return ext


def _check_frames(path, frames, height=None, width=None) -> np.ndarray:
  """uint8 [t, H, W, 3] (with H, W as given, if given), else a MediaError naming the rule."""
  a = np.asarray(frames)
  if a.dtype != np.uint8:
    raise media_error(path, f"frames must be uint8 [T, H, W, 3], got dtype {a.dtype} "
                            "(convert decoder output with to_uint8)")
  if a.ndim != 4 or a.shape[-1] != 3:
    raise media_error(path, f"frames must be uint8 [T, H, W, 3] with 3 channels, got shape "
                            f"{a.shape}")
  if height is not None and a.shape[1:3] != (height, width):
    raise media_error(path, f"frames are {a.shape[2]}x{a.shape[1]} but the video is "
                            f"{width}x{height}")
  return a


def gif_delays_ms(num_frames: int, fps: float) -> list:
  """Per-frame GIF delays in ms, multiples of 10, whose running sum tracks i * 1000 / fps."""
  ends = [round((i + 1) * 100 / fps) * 10 for i in range(num_frames)]
  return [max(e - s, 10) for s, e in zip([0] + ends[:-1], ends)]


class _Mp4Sink:
  """libx264 yuv420p through an ffmpeg subprocess fed on stdin."""

  def __init__(self, path, height, width, fps, crf, preset):
    import imageio_ffmpeg   # lazy: frame arithmetic must not need it
    self.path = path
    self._log = tempfile.TemporaryFile()     # a file, not a pipe: ffmpeg can never block on it
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps),
           "-i", "-", "-f", "mp4", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
           "-crf", str(crf), "-preset", preset, "file:" + os.fspath(path)]
    # Own session: a Ctrl-C in the terminal reaches Python only, which then closes stdin so
    # ffmpeg finalises the file itself.
    self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=self._log, start_new_session=True)

  def write(self, frames: np.ndarray) -> None:
    try:
      self._proc.stdin.write(memoryview(np.ascontiguousarray(frames)).cast("B"))
    except OSError:      # ffmpeg died (disk full, bad path...): report why
      self.close()
      raise media_error(self.path, "ffmpeg stopped accepting frames") from None

  def close(self) -> None:
    if self._proc is None:
      return
    proc, self._proc = self._proc, None
    try:
      proc.stdin.close()
    except OSError:
      pass
    rc = proc.wait()
    self._log.seek(0)
    err = self._log.read()
    self._log.close()
    if rc != 0:
      raise ffmpeg_error(self.path, f"writing the mp4 failed (ffmpeg exit code {rc})", err)


class _GifSink:
  """Buffers frames; Pillow writes the looping GIF on close."""

  def __init__(self, path, fps):
    self.path, self.fps, self._frames = path, fps, []

  def write(self, frames: np.ndarray) -> None:
    self._frames.extend(np.array(f) for f in frames)    # copies: the caller may reuse its buffer

  def close(self) -> None:
    from PIL import Image
    frames, self._frames = self._frames, []
    if not frames:
      return
    images = [Image.fromarray(f) for f in frames]
    try:
      images[0].save(os.fspath(self.path), format="GIF", save_all=True,
                     append_images=images[1:], duration=gif_delays_ms(len(images), self.fps),
                     loop=0)
    except OSError as e:
      raise media_error(self.path, f"cannot write the GIF ({e})") from e


class VideoWriter:
  """Streaming writer: `with VideoWriter(path, H, W, fps) as w: w.append(frames)` (any times).

  The format follows the extension: .mp4 (H.264, yuv420p: H and W must be even) or .gif.
  Nothing is written until the first append. If the `with` block raises, the file is still
  finalised (a playable prefix of a long run is useful) and the original exception propagates.
  """

  def __init__(self, path, height: int, width: int, fps: float = 24, crf: int = 23,
               preset: str = "medium"):
    self.path = path
    self._ext = _format(path)
    for name, v in (("height", height), ("width", width)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise media_error(path, f"{name} {v!r} must be a positive integer")
      if self._ext == ".mp4" and v % 2:
        raise media_error(path, f"{name} {v} is odd; yuv420p H.264 needs an even {name}")
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not fps > 0:
      raise media_error(path, f"fps {fps!r} must be a positive number")
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(parent):
      raise media_error(path, f"no such directory {parent!r}")
    self.height, self.width, self.fps = int(height), int(width), fps
    self._crf, self._preset = crf, preset
    self._sink = None
    self._closed = False
    self.num_frames = 0

  def append(self, frames) -> None:
    """Adds uint8 frames [t, H, W, 3] (H, W as given to the constructor)."""
    if self._closed:
      raise media_error(self.path, "append after close")
    a = _check_frames(self.path, frames, self.height, self.width)
    if a.shape[0] == 0:
      return
    if self._sink is None:
      if self._ext == ".mp4":
        self._sink = _Mp4Sink(self.path, self.height, self.width, self.fps, self._crf,
                              self._preset)
      else:
        self._sink = _GifSink(self.path, self.fps)
    self._sink.write(a)
    self.num_frames += a.shape[0]

  def close(self) -> None:
    """Finalises the file; raises MediaError if no frame was ever appended. Idempotent."""
    if self._closed:
      return
    self._closed = True
    if self._sink is None:
      raise media_error(self.path, "no frames were appended; nothing was written")
    self._sink.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
      return False
    try:
      self.close()          # keep and finalise what was written so far
    except MediaError:
      pass                  # the original exception matters more
    return False


def write_video(path, frames, fps: float = 24, crf: int = 23, preset: str = "medium") -> None:
  """Writes uint8 frames [T, H, W, 3] to .mp4 (official H.264 settings) or .gif."""
  _format(path)
  a = _check_frames(path, frames)
  if a.shape[0] == 0:
    raise media_error(path, "video has 0 frames; nothing to write")
  with VideoWriter(path, a.shape[1], a.shape[2], fps, crf=crf, preset=preset) as w:
    w.append(a)
