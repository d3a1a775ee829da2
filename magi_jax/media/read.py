"""Input pixels through the official ffmpeg filter graphs (official
inference/pipeline/video_process.py).

ffmpeg's bicubic swscale, its yuv -> rgb conversion and its fps resampling define the input
pixels, so they are not re-implemented: these functions run the ffmpeg binary shipped with
imageio-ffmpeg and read raw rgb24 frames from its stdout.

  image: ffmpeg -f image2pipe -i - -vf scale=W:H -frames:v 1 -f rawvideo -pix_fmt rgb24 -
  video: ffmpeg -ss 0 -i FILE -vf fps=24,scale=W:H [-frames:v N] -f rawvideo -pix_fmt rgb24 -

Differences from the official code: the video container is probed instead of forced to mp4
(the decoded pixels are the same); an unknown aspect policy raises instead of falling back to
"fit"; the first `max_frames` frames are kept (official: 32, hard-coded) and ffmpeg is told to
stop there.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np

from magi_jax.media.errors import MediaError, ffmpeg_error, media_error
from magi_jax.media.frames import SIZE_MULTIPLE, validate_size

POLICIES = ("fit", "crop", "pad")


def pixels_to_model(frames):
  """uint8 (..., T, H, W, 3) -> float32 (..., 3, T, H, W) in [-1, 1], the layout and range
  the VAE encoder (and a pixel-space DiT) takes; numpy in, numpy out; jax in (traced), jax
  out. The inverse of `media.write.to_uint8`'s scaling."""
  from einops import rearrange
  x = frames.astype(np.float32) / 127.5 - 1.0
  return rearrange(x, "... t h w c -> ... c t h w")


def _ffmpeg_exe() -> str:
  import imageio_ffmpeg   # lazy: frame arithmetic must not need it
  return imageio_ffmpeg.get_ffmpeg_exe()


def _check_file(path) -> None:
  if not os.path.exists(path):
    raise media_error(path, "no such file")
  if not os.path.isfile(path):
    raise media_error(path, "is not a regular file")
  if os.path.getsize(path) == 0:
    raise media_error(path, "file is empty (0 bytes)")


# Leading bytes of still-image and video containers (GIF is left out: it may be either).
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_VIDEO_MAGIC = ((b"\x1a\x45\xdf\xa3", "Matroska/WebM"),)


def container_kind(path) -> tuple[str, str] | None:
  """('image' | 'video', format name) from the file's first bytes, or None when unknown."""
  with open(path, "rb") as f:
    head = f.read(16)
  for magic, name in _IMAGE_MAGIC:
    if head.startswith(magic):
      return "image", name
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    return "image", "WebP"
  if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
    return "video", "AVI"
  if head[4:8] == b"ftyp":
    return ("image", "AVIF/HEIF") if head[8:12] in (b"avif", b"heic", b"mif1") else (
        "video", "MP4/MOV")
  for magic, name in _VIDEO_MAGIC:
    if head.startswith(magic):
      return "video", name
  return None


def _check_kind(path, want: str) -> None:
  """Refuses a video where an image is read and the other way round (ffmpeg reads either)."""
  kind = container_kind(path)
  if kind is None or kind[0] == want:
    return
  if want == "video":
    raise media_error(path, f"is an image ({kind[1]}), not a video: a V2V prefix needs a video "
                            "(to start from one image use I2V: --config.mode=i2v "
                            "--config.image=PATH)")
  raise media_error(path, f"is a video ({kind[1]}), not an image: I2V starts from one image "
                          "(to continue a video use V2V: --config.mode=v2v --config.video=PATH)")


def _scale_filter(height: int, width: int, policy: str) -> str:
  """'fit' stretches to W x H; 'crop' covers then centre-crops; 'pad' fits inside, black bars."""
  if policy == "fit":
    return f"scale={width}:{height}"
  if policy == "crop":
    return f"scale={width}:{height}:force_original_aspect_ratio=increase,crop={width}:{height}"
  if policy == "pad":
    return (f"scale={width}:{height}:force_original_aspect_ratio=decrease,"
            f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:color=black")
  raise MediaError(f"aspect policy {policy!r} is not one of {POLICIES}")


def _run(args, path, what: str, stdin: bytes | None = None) -> bytes:
  """Runs ffmpeg, returns its stdout; failures become MediaError naming `path`."""
  cmd = [_ffmpeg_exe(), "-hide_banner", "-loglevel", "error"] + args
  try:
    res = subprocess.run(cmd, input=stdin, capture_output=True,
                         stdin=None if stdin is not None else subprocess.DEVNULL, check=False)
  except OSError as e:
    raise media_error(path, f"cannot run ffmpeg ({e})") from e
  if res.returncode != 0:
    err = res.stderr
    if b"does not contain any stream" in err and b"no decoder" not in err:
      if what == "video":
        raise media_error(path, "video has 0 frames (no video stream)")
      raise media_error(path, "cannot be decoded as an image (ffmpeg: no image stream found)")
    raise ffmpeg_error(path, f"cannot be decoded as {'an' if what == 'image' else 'a'} {what}",
                       err)
  return res.stdout


def read_image(path, height: int, width: int, policy: str = "fit", *,
               multiple: int = SIZE_MULTIPLE) -> np.ndarray:
  """The I2V conditioning image as uint8 [1, height, width, 3] (official `ffmpeg_i2v`).

  policy: "fit" (official default: stretch, aspect ratio ignored), "crop" or "pad".
  multiple: what height and width must divide by (`validate_size`).
  The file's bytes are piped to ffmpeg as image2pipe, exactly as the official code does.
  """
  _check_file(path)
  _check_kind(path, "image")
  validate_size(height, width, multiple)
  vf = _scale_filter(height, width, policy)
  with open(path, "rb") as f:
    data = f.read()
  out = _run(["-f", "image2pipe", "-i", "-", "-vf", vf, "-frames:v", "1",
              "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], path, "image", stdin=data)
  if len(out) != height * width * 3:
    raise media_error(path, f"ffmpeg returned {len(out)} bytes instead of one "
                            f"{width}x{height} rgb24 image")
  return np.frombuffer(out, np.uint8).reshape(1, height, width, 3)


def stream_video(path, height: int, width: int, fps: int = 24, *, block: int = 24,
                 multiple: int = SIZE_MULTIPLE):
  """`read_video`'s frames (the same filter graph) as uint8 blocks [<= block, H, W, 3], read
  from ffmpeg as it decodes: memory stays a few blocks whatever the video's length. Raises
  MediaError as read_video does (an undecodable file after the frames it did decode)."""
  _check_file(path)
  _check_kind(path, "video")
  validate_size(height, width, multiple)
  cmd = [_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-ss", "0", "-i",
         "file:" + os.fspath(path), "-vf", f"fps={fps},scale={width}:{height}", "-f",
         "rawvideo", "-pix_fmt", "rgb24", "-"]
  frame_bytes = height * width * 3
  try:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
  except OSError as e:
    raise media_error(path, f"cannot run ffmpeg ({e})") from e
  import tempfile
  import threading
  err = tempfile.TemporaryFile()        # drained on a thread: a full stderr pipe would stall
  drain = threading.Thread(target=lambda: err.write(proc.stderr.read()), daemon=True)
  drain.start()
  total = 0
  try:
    while True:
      data = proc.stdout.read(frame_bytes * block)
      n = len(data) // frame_bytes
      if n:
        total += n
        yield np.frombuffer(data, np.uint8, count=n * frame_bytes).reshape(n, height, width, 3)
      if len(data) < frame_bytes * block:
        break
  finally:
    proc.stdout.close()
    code = proc.wait()
    drain.join()
    err.seek(0)
    stderr = err.read()
    err.close()
  if code != 0:
    if b"does not contain any stream" in stderr and b"no decoder" not in stderr:
      raise media_error(path, "video has 0 frames (no video stream)")
    raise ffmpeg_error(path, "cannot be decoded as a video", stderr)
  if total == 0:
    raise media_error(path, "video has 0 frames")


def frame_size(path) -> tuple[int, int]:
  """(height, width) of a video's first frame or of an image, as ffmpeg shows it (rotation
  applied): the frame is decoded to PNG and its header read."""
  _check_file(path)
  out = _run(["-nostdin", "-i", "file:" + os.fspath(path), "-frames:v", "1", "-f", "image2pipe",
              "-vcodec", "png", "-"], path, "video")
  if len(out) < 24 or out[:8] != b"\x89PNG\r\n\x1a\n":
    raise media_error(path, "ffmpeg returned no frame to measure")
  return int.from_bytes(out[20:24], "big"), int.from_bytes(out[16:20], "big")


def read_video(path, height: int, width: int, fps: int = 24,
               max_frames: int | None = 32, *, multiple: int = SIZE_MULTIPLE) -> np.ndarray:
  """The first `max_frames` frames (None: all) of a video as uint8 [N, height, width, 3].

  Official `ffmpeg_v2v` graph: seek to 0, resample to `fps` with ffmpeg's fps filter, then
  stretch to width x height. The V2V prefix is the FIRST 32 frames (max_frames=32). A still
  image (PNG, JPEG, ...) is refused: ffmpeg would read it as a one-frame video.
  """
  _check_file(path)
  _check_kind(path, "video")
  validate_size(height, width, multiple)
  if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                 or max_frames < 1):
    raise MediaError(f"max_frames {max_frames!r} must be a positive integer or None")
  if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
    raise MediaError(f"fps {fps!r} must be a positive integer")
  stop = ["-frames:v", str(max_frames)] if max_frames is not None else []
  out = _run(["-nostdin", "-ss", "0", "-i", "file:" + os.fspath(path),
              "-vf", f"fps={fps},scale={width}:{height}"] + stop +
             ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"], path, "video")
  frame_bytes = height * width * 3
  n = len(out) // frame_bytes
  if n == 0:
    raise media_error(path, "video has 0 frames")
  video = np.frombuffer(out, np.uint8, count=n * frame_bytes).reshape(n, height, width, 3)
  return video[:max_frames] if max_frames is not None else video
