"""The device mesh: axes ('data', 'fsdp', 'context', 'tensor'), sizes from the config.

* data: pure data parallelism (parameters replicated), the axis that may span slices (DCN);
* fsdp: data parallelism with parameters and optimizer state sharded (ZeRO-3);
* context: the token sequence of one video split across devices (ring / Ulysses attention);
* tensor: attention heads and MLP columns split across devices (Megatron).

A size of -1 takes the devices the other axes leave. `dcn_data > 1` builds a multi-slice
(hybrid) mesh: the data axis is `dcn_data` slices over the data-centre network times the
in-slice data size over ICI; the other axes never cross slices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils

from magi_jax.errors import MagiError

AXES = ("data", "fsdp", "context", "tensor")
AUTO = (jax.sharding.AxisType.Auto,) * len(AXES)


class MeshError(MagiError, ValueError):
  """A mesh config that does not fit the devices."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  context: int = 1
  tensor: int = 1
  dcn_data: int = 1

  @classmethod
  def from_config(cls, c) -> MeshConfig:
    """From a ConfigDict / dict with any of the fields (missing ones take the defaults)."""
    c = c.to_dict() if hasattr(c, "to_dict") else dict(c or {})
    unknown = sorted(set(c) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise MeshError(f"config.mesh: unknown field(s) {unknown}; known: data, fsdp, context, "
                      "tensor, dcn_data")
    return cls(**{k: int(v) for k, v in c.items()})


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Axis sizes with -1 resolved; their product is `num_devices`."""
  sizes = {a: getattr(cfg, a) for a in AXES}
  bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
  if bad:
    raise MeshError(f"mesh sizes must be positive or -1 (auto), got {bad}")
  auto = [a for a, s in sizes.items() if s == -1]
  if len(auto) > 1:
    raise MeshError(f"at most one mesh axis may be -1 (auto), got {auto}")
  if cfg.dcn_data < 1:
    raise MeshError(f"mesh.dcn_data must be >= 1, got {cfg.dcn_data}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if auto:
    if num_devices % fixed:
      raise MeshError(f"{num_devices} devices do not divide by the fixed mesh axes "
                      f"{ {a: s for a, s in sizes.items() if s != -1} } (product {fixed})")
    sizes[auto[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(f"mesh {sizes} has {math.prod(sizes.values())} devices, but there are "
                    f"{num_devices}; set one axis to -1 to take the rest")
  if sizes["data"] % cfg.dcn_data:
    raise MeshError(f"mesh.data ({sizes['data']}) must be a multiple of mesh.dcn_data "
                    f"({cfg.dcn_data}): each slice holds data/dcn_data of the data axis")
  return sizes


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'context', 'tensor') mesh over `devices` (default: every device of
  every process), its axes Auto: shardings are propagated by the compiler from the
  constraints (`rules.constrain`) and the parameters' placements."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  if cfg.dcn_data > 1:
    ici = (sizes["data"] // cfg.dcn_data,) + shape[1:]
    dcn = (cfg.dcn_data, 1, 1, 1)
    # Slices are TPU slices (devices carry slice_index); elsewhere each process is one.
    by_process = not hasattr(devices[0], "slice_index")
    granules = (len({d.process_index for d in devices}) if by_process
                else len({d.slice_index for d in devices}))
    if granules != cfg.dcn_data:
      raise MeshError(f"mesh.dcn_data={cfg.dcn_data} but the devices form {granules} "
                      f"{'processes' if by_process else 'slices'}")
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices,
                                               process_is_granule=by_process)
    # jax.make_mesh refuses devices of several slices; the hybrid order is built above.
    return jax.sharding.Mesh(arr, AXES, axis_types=AUTO)
  try:
    # Topology-aware order on TPU / GPU (the given order for CPU devices), these devices only.
    return jax.make_mesh(shape, AXES, axis_types=AUTO, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # No placement for this device set (a TPU subset, devices of several slices): any order
    # works, as for CPU devices; keep the given one.
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=AUTO)


def describe(mesh: jax.sharding.Mesh) -> str:
  return " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
