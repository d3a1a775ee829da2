"""A job's programs: each a jitted function of the project and its abstract, sharded inputs.

`build_programs(job)` returns them in order; nothing is lowered or compiled until
`Program.lower()` is called (inside `use_mesh(job.mesh, job.rules)`, see compile.py).

Program families per job (`--programs` selects among them):
  sample  'step' (the sampler step of each steady-state call shape, sample_programs.py),
          't5' (the T5 encoder on one prompt), 'vae' (one tile of the tiled VAE decode)
  train   'step' (the train step, train_programs.py)
  distill 'step' (a distillation run's train step: student, frozen teacher, train_programs.py)
"""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

from magi_jax.aot.abstract import per_device_bytes
from magi_jax.aot.errors import AOTError

FAMILIES = {"sample": ("step", "t5", "vae"), "train": ("step",), "distill": ("step",)}


@dataclasses.dataclass
class Program:
  name: str                    # 'step+refresh+nearly', 't5', 'vae', ...
  fn: Callable                 # a jax.jit-wrapped function
  args: tuple                  # ShapeDtypeStructs with shardings (pytrees of them)
  kwargs: dict = dataclasses.field(default_factory=dict)    # traced keyword inputs
  static: dict = dataclasses.field(default_factory=dict)    # static keyword arguments
  notes: str = ""              # what the shapes are, in words
  trainable_params: int | None = None   # train steps: parameters the step updates

  def lower(self):
    return self.fn.lower(*self.args, **self.kwargs, **self.static)

  def argument_bytes(self) -> int:
    """Per-device bytes of the inputs (the compiler's argument size, computed from the
    shardings; reported when the compiler refuses the program)."""
    return per_device_bytes((self.args, self.kwargs))


def select_families(job_kind: str, programs: str | None) -> tuple[str, ...]:
  """`--programs=step,t5` -> ('step', 't5'); empty -> all of the job's families."""
  known = FAMILIES[job_kind]
  if not programs:
    return known
  names = tuple(p.strip() for p in programs.split(",") if p.strip())
  bad = [p for p in names if p not in known]
  if bad or not names:
    raise AOTError(f"--programs={programs!r}: the {job_kind} job has programs "
                   f"{', '.join(known)}; unknown: {', '.join(bad) or '(none given)'}")
  return tuple(dict.fromkeys(names))


def build_programs(job) -> list[Program]:
  if job.kind == "sample":
    from magi_jax.aot.sample_programs import sample_programs
    return sample_programs(job)
  from magi_jax.aot.train_programs import train_programs
  return train_programs(job)


def describe_inputs(**shapes: Any) -> str:
  """'x (1, 16, 30, 60, 104) float32, ...' for a program's notes."""
  return ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in shapes.items())
