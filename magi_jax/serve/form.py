"""The page's form -> a validated request: `prepare(form, runtime, directory, name)`.

Everything is checked before any model work, and each error (`FormError`, `RequestError`,
`MediaError`, `PromptScheduleError`) names the page field to change:

* Prompt: what the whole video shows. Prompts per chunk, when filled, replace it; they are
  either the JSON of a prompt file (`magi_jax.text.prompts`: a list of {"prompt", "start",
  "end"} over the generated chunks, counted from 0) or plain lines, one prompt per generated
  chunk in order, the last line holding for every chunk after it.
* Mode T2V / I2V / V2V: I2V needs the Image upload, V2V the Video upload (its first "Prefix
  frames" frames are the prefix); both uploads are decoded here, so an unreadable file is
  refused before the request queues for the model.
* Height / width (multiples of 16), frames (a multiple of 4), steps (a multiple of the preset's
  denoising window), guidance (the text scale of every guided noise level: the preset's
  levels without text guidance stay at 0), seed.

The request's files go to `directory` (fresh for each request): the video `name` and, for
per-chunk prompts, `prompts.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from magi_jax.configs import RuntimeConfig
from magi_jax.generate.request import MODES, Request
from magi_jax.media import FramePlan, plan_frames, prefix_latent_frames_for_video
from magi_jax.media.read import read_image, read_video
from magi_jax.serve.errors import FormError
from magi_jax.text.prompts import PromptScheduleError, as_schedule, prompts_per_chunk

PROMPTS_FILE = "prompts.json"


@dataclasses.dataclass(frozen=True)
class Form:
  """The page's fields as the browser sends them (numbers may come as floats or None)."""
  mode: str = "t2v"
  prompt: str = ""
  chunk_prompts: str = ""
  image: str | None = None
  video: str | None = None
  prefix_frames: object = 32
  height: object = 64
  width: object = 64
  num_frames: object = 24
  num_steps: object = 6
  guidance: object = 7.5
  seed: object = 1234


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A checked request: what to generate, its runtime settings and its frame plan."""
  request: Request
  runtime: dict               # `Components.with_runtime` fields
  plan: FramePlan

  @property
  def chunks(self) -> int:
    """The chunks `generate` hands over (`on_chunk` calls)."""
    return len(self.plan.emitted_chunks)


def whole(label: str, value, minimum: int = 1) -> int:
  """`value` as an int >= minimum, or a FormError naming the field."""
  if value is None or (isinstance(value, str) and not value.strip()):
    raise FormError(f"{label} is empty: give a whole number >= {minimum}")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise FormError(f"{label} {value!r} is not a number") from None
  if isinstance(value, bool) or not number.is_integer():
    raise FormError(f"{label} {value!r} is not a whole number")
  if number < minimum:
    raise FormError(f"{label} {int(number)} is below {minimum}")
  return int(number)


def guidance_scales(runtime: RuntimeConfig, value) -> tuple:
  """The text scale of each noise-level bucket: `value` where the preset guides by text."""
  try:
    scale = float(value)
  except (TypeError, ValueError):
    raise FormError(f"Guidance {value!r} is not a number (the text scale, e.g. 7.5)") from None
  if not math.isfinite(scale) or scale < 0:
    raise FormError(f"Guidance {value!r} must be a finite number >= 0 (e.g. 7.5)")
  return tuple(scale if s else 0.0 for s in runtime.text_scales)


def default_guidance(runtime: RuntimeConfig) -> float:
  return float(max(runtime.text_scales, default=0.0))


def _steps(runtime: RuntimeConfig, value) -> int:
  steps = whole("Steps", value)
  multiple = math.lcm(runtime.window_size, len(runtime.noise2clean_kvrange) or 1)
  if steps % multiple:
    lo = steps // multiple * multiple
    hint = f"{lo} or {lo + multiple}" if lo else str(multiple)
    raise FormError(f"Steps {steps} is not a multiple of {multiple} (the preset's denoising "
                    f"window); try {hint}")
  return steps


def _mode(value) -> str:
  mode = (value or "").strip().lower()
  if mode not in MODES:
    raise FormError(f"Mode {value!r}: pick one of {', '.join(m.upper() for m in MODES)}")
  return mode


def _upload(form: Form, mode: str) -> dict:
  """The Request's image / video fields: the upload the mode needs (the other one ignored)."""
  if mode == "i2v" and not form.image:
    raise FormError("mode I2V starts from an image: upload one under Image (or pick T2V)")
  if mode == "v2v" and not form.video:
    raise FormError("mode V2V continues a video: upload one under Video (or pick T2V)")
  return {"image": form.image if mode == "i2v" else "",
          "video": form.video if mode == "v2v" else ""}


def _prefix_latents(req: Request) -> int:
  """Decodes the request's upload (a bad one fails here) -> its prefix latent frames."""
  if req.mode == "i2v":
    read_image(req.image, req.height, req.width)
    return 1
  if req.mode == "v2v":
    frames = read_video(req.video, req.height, req.width, fps=req.fps,
                        max_frames=req.prefix_frames)
    return prefix_latent_frames_for_video(frames.shape[0], req.fps)
  return 0


def chunk_schedule(text: str, num_chunks: int) -> list[dict]:
  """Prompts per chunk (prompt-file JSON or one line per chunk) -> prompt-file entries."""
  text = text.strip()
  if text.startswith(("[", "{")):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise FormError(f"Prompts per chunk: not valid JSON ({e}); give a list of "
                      '{"prompt", "start", "end"} or one prompt per line') from None
    if not isinstance(data, list) or not data:
      raise FormError('Prompts per chunk: the JSON must be a non-empty list of {"prompt", '
                      '"start", "end"} entries')
    try:
      entries = [dataclasses.asdict(cp) for cp in as_schedule(data, num_chunks)]
    except PromptScheduleError:
      raise
    except (TypeError, ValueError) as e:
      raise FormError(f"Prompts per chunk: {e}; each entry is {{\"prompt\": text, \"start\": "
                      "chunk, \"end\": chunk}") from None
  else:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > num_chunks:
      raise FormError(f"Prompts per chunk: {len(lines)} lines, but the video has {num_chunks} "
                      f"generated chunks; give at most {num_chunks} lines (or more frames)")
    entries = [{"prompt": line, "start": i, "end": i + 1} for i, line in enumerate(lines)]
    entries[-1]["end"] = num_chunks
  prompts_per_chunk(entries, num_chunks)      # gaps, overlaps and ranges named here
  return entries


def prepare(form: Form, runtime: RuntimeConfig, directory: str, name: str) -> Prepared:
  """The checked request of `form` under the server's `runtime`, writing into `directory`."""
  mode = _mode(form.mode)
  prompt = (form.prompt or "").strip()
  per_chunk = (form.chunk_prompts or "").strip()
  if not prompt and not per_chunk:
    raise FormError("the prompt is empty: type what the video should show under Prompt (or "
                    "fill Prompts per chunk)")
  height, width = whole("Height", form.height), whole("Width", form.width)
  num_frames = whole("Frames", form.num_frames)
  prefix_frames = whole("Prefix frames", form.prefix_frames)
  fields = {"video_size_h": height, "video_size_w": width, "num_frames": num_frames,
            "num_steps": _steps(runtime, form.num_steps),
            "text_scales": guidance_scales(runtime, form.guidance)}
  seed = whole("Seed", form.seed, minimum=0)
  # Per-chunk prompts stand in for the prompt until the chunk count is known (below).
  request = Request(mode=mode, prompt=prompt or per_chunk, **_upload(form, mode), height=height,
                    width=width, num_frames=num_frames, seed=seed, prefix_frames=prefix_frames,
                    output=os.path.join(directory, name))
  request.validate()                          # sizes, frame count, output format first
  plan = plan_frames(num_frames, _prefix_latents(request), runtime.chunk_width,
                     runtime.temporal_downsample_factor, request.fps)
  request = dataclasses.replace(request, prompt=prompt)
  if per_chunk:
    path = os.path.join(directory, PROMPTS_FILE)
    entries = chunk_schedule(per_chunk, plan.infer_chunk_num - plan.clean_chunk_num)
    with open(path, "w") as f:
      json.dump(entries, f, indent=1)
    request = dataclasses.replace(request, prompt="", prompt_file=path)
  request.validate()
  return Prepared(request, fields, plan)
