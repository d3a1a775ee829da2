"""The server's state and one request's run: `load_server(c)`, then `Server.run(form)`.

`load_server` loads the components once from a sampling ConfigDict (`build_from_config`: the
checks, presets and weights of `python -m experiments.sample`, so `--config.checkpoint=
sand-ai/MAGI-1` serves the released model); the config's request becomes the page's defaults.
A training run directory (`--config.checkpoint=runs/NAME`) is refused: its sampler returns
the whole video at once, with no chunks to stream (sample it with `experiments.sample`).

`Server.run(form)` yields `Update`s: the status before the first chunk, one per chunk (with
the player's new file) and the last with the finished video. Each request writes into a fresh
directory of its own under `root` (`request-0003-XXXX/sample-0003.mp4`, its segments, its
prompt file), and its generation runs under the server's one lock.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
import threading
from collections.abc import Iterator

from magi_jax.generate import ChunkFrames, Components, Request, build_from_config, generate
from magi_jax.generate.pipeline import JittedVAE
from magi_jax.generate.trained import is_run_dir
from magi_jax.serve.errors import ServeError
from magi_jax.serve.form import Form, default_guidance, prepare
from magi_jax.serve.job import Job
from magi_jax.serve.preview import Preview, can_stream
from magi_jax.serve.status import Status


@dataclasses.dataclass(frozen=True)
class Update:
  status: str                     # the status line (Markdown)
  video: str | None = None        # a new file for the player; None: unchanged
  final: str | None = None        # the finished video, on the last update


class Server:
  def __init__(self, comp: Components, defaults: Request, flags, options, *, root: str,
               streaming: bool, preset: str = ""):
    if not isinstance(comp.vae, JittedVAE):
      comp.vae = JittedVAE(comp.vae)     # compiled once for every request, not per copy
    self.comp, self.flags, self.options = comp, flags, options
    self.root, self.streaming, self.preset = root, streaming, preset
    self.defaults = self._form(defaults)
    self._stem, self._ext = os.path.splitext(os.path.basename(defaults.output))
    self._lock = threading.Lock()          # one generation at a time on the shared parts
    self._ids = itertools.count(1)
    self._ids_lock = threading.Lock()

  def _form(self, req: Request) -> Form:
    rt = self.comp.cfg.runtime
    chunk_prompts = ""
    if req.prompt_file:
      with open(req.prompt_file) as f:
        chunk_prompts = f.read()
    return Form(mode=req.mode, prompt=req.prompt, chunk_prompts=chunk_prompts,
                image=req.image or None, video=req.video or None,
                prefix_frames=req.prefix_frames, height=rt.video_size_h, width=rt.video_size_w,
                num_frames=rt.num_frames, num_steps=rt.num_steps,
                guidance=default_guidance(rt), seed=req.seed)

  def _next_id(self) -> int:
    with self._ids_lock:
      return next(self._ids)

  def run(self, form: Form) -> Iterator[Update]:
    """The updates of one request (raises a MagiError naming the field of a bad form)."""
    rid = self._next_id()
    directory = tempfile.mkdtemp(prefix=f"request-{rid:04d}-", dir=self.root)
    prepared = prepare(form, self.comp.cfg.runtime, directory,
                       f"{self._stem}-{rid:04d}{self._ext}")
    req = prepared.request
    comp = self.comp.with_runtime(**prepared.runtime)
    status = Status(rid, prepared.chunks, prepared.plan.output_frames)
    preview = Preview(directory, req.height, req.width, streaming=self.streaming)

    def work(on_chunk):
      return generate(comp, req, flags=self.flags, options=self.options, progress=False,
                      log=lambda line: print(f"request {rid}: {line}", flush=True),
                      on_chunk=on_chunk)

    yield Update(status.waiting())
    events = Job(work, self._lock).events()
    try:
      for event in events:
        if isinstance(event, ChunkFrames):
          status.add(int(event.frames.shape[0]), event.seconds)
          yield Update(status.running(), video=preview.add(event.frames))
        else:
          yield Update(status.finished(req.width, req.height, event.seconds),
                       final=event.output)
    finally:
      events.close()                     # the page went away: the work stops at its next chunk


def check_servable(c) -> None:
  """Raises ServeError for a config the server cannot stream (a training run directory)."""
  if is_run_dir(c.checkpoint):
    raise ServeError(f"--config.checkpoint={c.checkpoint} is a training run directory, whose "
                     "sampler makes the whole video at once: the server streams official, "
                     "converted, repository (owner/name) or tiny-preset weights; sample the run "
                     f"with python -m experiments.sample --config.checkpoint={c.checkpoint}")


def load_server(c, *, root: str | None = None, streaming: bool | None = None) -> Server:
  """The components of sampling config `c`, loaded once; requests write under `root` (a new
  temporary directory by default); `streaming` None: when ffmpeg and ffprobe are on PATH."""
  check_servable(c)
  comp, req, flags, options = build_from_config(c)
  if root is None:
    root = tempfile.mkdtemp(prefix="magi_serve_")
  os.makedirs(root, exist_ok=True)
  return Server(comp, req, flags, options, root=os.path.abspath(root),
                streaming=can_stream() if streaming is None else streaming, preset=c.preset)
