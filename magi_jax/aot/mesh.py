"""`--mesh=data:1,fsdp:4,context:1,tensor:1` -> the project's device mesh over a topology.

Axes the flag leaves out are 1; one axis may be -1 (the devices the others leave). The mesh
itself is `magi_jax.parallel.mesh.make_mesh`, the trainer's own, laid over the topology's
devices. Defaults when the flag is empty:

* train: every device on 'fsdp' (parameters, optimizer state and the batch sharded: ZeRO-3);
* sample: every device on 'tensor'. The sampler runs one video (batch 1, or 2 for the two
  batched guidance passes of cfg 3), so the batch axes have nothing to split; 'tensor' splits
  the weights by heads and MLP columns and the KV cache by kv groups (dims a mesh axis does not
  divide stay replicated, as everywhere in the project).
"""

from __future__ import annotations

import jax

from magi_jax.aot.errors import AOTError
from magi_jax.parallel.mesh import AXES, MeshConfig, MeshError, make_mesh, mesh_shape

DEFAULT_AXIS = {"train": "fsdp", "distill": "fsdp", "sample": "tensor"}


def parse_mesh(text: str | None, job: str) -> MeshConfig:
  """The flag's axis sizes as a MeshConfig (missing axes 1; empty -> the job's default)."""
  if not text:
    sizes = dict.fromkeys(AXES, 1)
    sizes[DEFAULT_AXIS[job]] = -1
    return MeshConfig(**sizes)
  sizes = dict.fromkeys(AXES, 1)
  seen = set()
  for part in text.split(","):
    name, sep, value = part.strip().partition(":")
    if not sep or name not in AXES:
      raise AOTError(f"--mesh={text!r}: each entry is AXIS:SIZE with AXIS one of "
                     f"{', '.join(AXES)}; got {part.strip()!r}")
    if name in seen:
      raise AOTError(f"--mesh={text!r}: axis {name!r} is given twice")
    seen.add(name)
    try:
      sizes[name] = int(value)
    except ValueError:
      raise AOTError(f"--mesh={text!r}: size of {name!r} must be an integer, got "
                     f"{value!r}") from None
  return MeshConfig(**sizes)


def describe_sizes(sizes: dict[str, int]) -> str:
  return ",".join(f"{a}:{sizes[a]}" for a in AXES)


def build_mesh(text: str | None, job: str, devices) -> tuple[jax.sharding.Mesh, str]:
  """(mesh, "data:1,fsdp:4,context:1,tensor:1"); AOTError when the sizes do not multiply to
  the device count (checked before any device placement)."""
  cfg = parse_mesh(text, job)
  try:
    sizes = mesh_shape(cfg, len(devices))
    mesh = make_mesh(cfg, devices)
  except MeshError as e:
    raise AOTError(f"--mesh={text or '(default)'}: {e} (the topology has {len(devices)} "
                   "devices)") from None
  return mesh, describe_sizes(sizes)
