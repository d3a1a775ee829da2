"""What a project adds to the trainer, named in the config rather than imported by it.

The trainer knows two data sources (`video_folder`, `prepared`) and one text path
(`precomputed` T5 rows). A project (e.g. `magi_jax.proj.bouncing.training`, the README's
demo) is a module with a `PROJECT = Project(...)`: its data sources by `config.data.kind`, its
trainable text encoders by `config.text.kind`, and its evaluators by the names listed in
`config.evals` (run at `sample_every` steps and at the end). `config.project` names the
module; the trainer imports it by name, so nothing in the library imports a project.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any
from collections.abc import Callable, Mapping

from magi_jax.configs import ConfigError


@dataclasses.dataclass(frozen=True)
class TextKind:
  """A text encoder trained with the DiT: `tokenizer(c)` and `encoder(c, tokenizer,
  caption_channels, rngs) -> nnx.Module` mapping token ids to caption rows."""
  tokenizer: Callable[[Any], Any]
  encoder: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Project:
  """data: kind -> fn(c, workdir, tokenizer, common_kwargs) -> grain iterator of batches;
  text: kind -> TextKind; evals: name -> fn(c, model, tokenizer, workdir, step, log, echo);
  shapes: data kind -> fn(c) -> VideoShape, the videos that source yields (what sampling a
  trained run generates by default)."""
  name: str
  data: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  text: Mapping[str, TextKind] = dataclasses.field(default_factory=dict)
  evals: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  shapes: Mapping[str, Callable] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class VideoShape:
  """Pixel frames of a training video: height x width, `num_chunks` chunks of
  `frames_per_chunk` frames."""
  height: int
  width: int
  frames_per_chunk: int
  num_chunks: int


NO_PROJECT = Project(name="")


def load_project(c) -> Project:
  """The `PROJECT` of the module `config.project` names ('' or absent: none)."""
  name = c.get("project", "") if hasattr(c, "get") else getattr(c, "project", "")
  if not name:
    return NO_PROJECT
  try:
    module = importlib.import_module(name)
  except ImportError as e:
    raise ConfigError(f"config.project={name!r} cannot be imported: {e}") from None
  project = getattr(module, "PROJECT", None)
  if not isinstance(project, Project):
    raise ConfigError(f"config.project={name!r} defines no PROJECT = Project(...)")
  return project


def _pick(table: Mapping[str, Any], key: str, field: str, project: Project, builtin: tuple):
  if key in table:
    return table[key]
  known = sorted(set(builtin) | set(table))
  where = f"project {project.name!r}" if project.name else "no config.project"
  raise ConfigError(f"config.{field}={key!r} is unknown ({where}); known: {known}")


def data_source(c) -> Callable:
  p = load_project(c)
  return _pick(p.data, c.data.kind, "data.kind", p, ("video_folder", "prepared"))


def text_kind(c) -> TextKind:
  p = load_project(c)
  return _pick(p.text, c.text.kind, "text.kind", p, ("precomputed",))


def video_shape(c) -> VideoShape:
  """The videos `config.data` yields (video_folder / prepared: data.height x data.width,
  clip_frames)."""
  d = c.data
  if d.kind in ("video_folder", "prepared"):
    return VideoShape(d.height, d.width, d.frames_per_chunk, d.clip_frames // d.frames_per_chunk)
  p = load_project(c)
  return _pick(p.shapes, d.kind, "data.kind", p, ("video_folder", "prepared"))(c)


def evaluators(c) -> list[Callable]:
  """The config's evaluators, resolved before training starts (a typo fails at step 0)."""
  p = load_project(c)
  return [_pick(p.evals, name, "evals", p, ()) for name in c.get("evals", ())]
