"""What to generate, validated before any model work (every error says what to change)."""

from __future__ import annotations

import dataclasses
import os

from magi_jax.errors import MagiError
from magi_jax.media import MediaError, validate_num_frames, validate_size
from magi_jax.media.write import FORMATS

MODES = ("t2v", "i2v", "v2v")


class RequestError(MagiError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Request:
  mode: str = "t2v"
  prompt: str = ""
  prompt_file: str = ""           # per-chunk prompts (JSON, see magi_jax.text.prompts)
  image: str = ""                 # i2v
  video: str = ""                 # v2v
  prefix_frames: int = 32         # v2v: how many frames of the video are the prefix
  height: int = 0
  width: int = 0
  num_frames: int = 0
  seed: int = 1234
  output: str = "sample.mp4"
  fps: int = 24

  def validate(self) -> None:
    if self.mode not in MODES:
      raise RequestError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
    if not self.prompt and not self.prompt_file:
      raise RequestError("give a prompt (--config.prompt) or a per-chunk prompt file "
                         "(--config.prompt_file)")
    if self.prompt and self.prompt_file:
      raise RequestError("give either --config.prompt or --config.prompt_file, not both")
    if self.prompt_file and not os.path.exists(self.prompt_file):
      raise RequestError(f"{self.prompt_file}: prompt file not found")
    if self.mode == "i2v":
      if not self.image:
        raise RequestError("mode i2v needs an image (--config.image=PATH)")
      if not os.path.exists(self.image):
        raise RequestError(f"{self.image}: image not found")
    if self.mode == "v2v":
      if not self.video:
        raise RequestError("mode v2v needs a prefix video (--config.video=PATH)")
      if not os.path.exists(self.video):
        raise RequestError(f"{self.video}: video not found")
      if self.prefix_frames < 1:
        raise RequestError(f"prefix_frames must be >= 1, got {self.prefix_frames}")
    if self.mode != "i2v" and self.image:
      raise RequestError(f"--config.image is only used by mode i2v (mode is {self.mode})")
    if self.mode != "v2v" and self.video:
      raise RequestError(f"--config.video is only used by mode v2v (mode is {self.mode})")
    try:
      validate_size(self.height, self.width)
      validate_num_frames(self.num_frames)
    except MediaError as e:
      raise RequestError(str(e)) from None
    ext = os.path.splitext(self.output)[1].lower()
    if ext not in FORMATS:
      raise RequestError(f"output {self.output!r}: use one of {', '.join(FORMATS)}")
    if self.fps != 24:
      raise RequestError(f"fps {self.fps}: the models and the VAE tiling are built for 24 fps")
    out_dir = os.path.dirname(os.path.abspath(self.output))
    if not os.path.isdir(out_dir):
      raise RequestError(f"output directory {out_dir} does not exist")
