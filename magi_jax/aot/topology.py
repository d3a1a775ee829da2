"""TPU topologies by name (`v5e:2x2`, `v5p:2x2x1`, ...) for compiling without the hardware.

`get_topology(name)` returns the devices of a slice from libtpu's topology description
(`jax.experimental.topologies.get_topology_desc`): the TPU compiler then plans programs for
them on a CPU-only host. The name is libtpu's: chip kind, a colon, chips per dimension.

HBM per device is what the TPU compiler itself reports as "available HBM" when it refuses a
program (libtpu 0.0.42.1, measured for every kind below); per chip the HBM is the data-sheet
figure. v4 and tpu7x topologies come with two devices per chip (one per TensorCore), each
with half the chip's HBM.

Slices smaller than one host (fewer than 2 chips along x or y, e.g. `v5e:1x1`) are described
as a single host holding the whole slice (`chips_per_host_bounds` = the slice's shape), which
libtpu needs for them. libtpu allows one process at a time unless
ALLOW_MULTIPLE_LIBTPU_LOAD is set; it is set here (compiling takes no device), so planning runs
next to other JAX processes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re

from magi_jax.aot.errors import AOTError

INSTALL_HINT = 'pip install -e ".[aot]"'


@dataclasses.dataclass(frozen=True)
class ChipKind:
  name: str                    # libtpu's topology prefix
  chip_hbm_gib: float          # HBM per chip (data sheet)
  devices_per_chip: int        # devices libtpu's topology gives per chip
  usable_gib: float            # per device, the compiler's "available HBM"
  dims: int                    # torus dimensions in the topology name


CHIPS = {c.name: c for c in (
    ChipKind("v4", 32.0, 2, 15.25, 3),
    ChipKind("v5e", 16.0, 1, 15.75, 2),
    ChipKind("v5p", 95.0, 1, 95.74, 3),
    ChipKind("v6e", 32.0, 1, 31.25, 2),
    ChipKind("tpu7x", 192.0, 2, 94.75, 3),
)}

_NAME = re.compile(r"^([a-z0-9]+):(\d+(?:x\d+)*)$")


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  chip: ChipKind
  shape: tuple[int, ...]       # chips per dimension
  devices: tuple               # libtpu's device descriptions, in id order

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def parse_topology(name: str) -> tuple[ChipKind, tuple[int, ...]]:
  """`"v5p:2x2x1"` -> (the v5p ChipKind, (2, 2, 1)); AOTError for names the table lacks.
  Two-dimensional kinds (v5e, v6e) also take a trailing x1."""
  m = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
  if m is None:
    raise AOTError(f"--topology={name!r}: expected KIND:AxB[xC] such as v5e:2x2 or v5p:2x2x1 "
                   f"(kinds: {', '.join(CHIPS)})")
  kind, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if kind not in CHIPS:
    raise AOTError(f"--topology={name!r}: unknown chip kind {kind!r}; known: {', '.join(CHIPS)}")
  chip = CHIPS[kind]
  if len(dims) == chip.dims + 1 and dims[-1] == 1:     # v5e:2x2x1 is v5e:2x2
    dims = dims[:-1]
  if len(dims) != chip.dims or min(dims) < 1:
    raise AOTError(f"--topology={name!r}: {kind} slices have {chip.dims} positive dimensions "
                   f"({'x'.join(['N'] * chip.dims)})")
  return chip, dims


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def require_libtpu() -> None:
  if not libtpu_installed():
    raise AOTError(f"compiling for TPU topologies needs libtpu, which is not installed: "
                   f"{INSTALL_HINT}")


def host_bounds(dims: tuple[int, ...]) -> tuple[int, int, int] | None:
  """chips_per_host_bounds for slices smaller than a host; None = libtpu's default."""
  if dims[0] >= 2 and dims[1] >= 2:
    return None
  return (dims[0], dims[1], dims[2] if len(dims) > 2 else 1)


@functools.cache
def get_topology(name: str) -> Topology:
  """The devices of slice `name` (cached per name). AOTError for unknown names, shapes libtpu
  rejects, or libtpu missing."""
  chip, dims = parse_topology(name)
  require_libtpu()
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  kw = {}
  bounds = host_bounds(dims)
  if bounds is not None:
    kw["chips_per_host_bounds"] = bounds
  canonical = f"{chip.name}:{'x'.join(map(str, dims))}"
  try:
    desc = topologies.get_topology_desc(topology_name=canonical, platform="tpu", **kw)
  except Exception as e:      # libtpu reports bad shapes as runtime errors of several types
    raise AOTError(f"--topology={name!r}: libtpu cannot describe this slice: {e}") from None
  devices = tuple(sorted(desc.devices, key=lambda d: d.id))
  return Topology(canonical, chip, dims, devices)


def local_topology(usable_gib: float, kind: str = "") -> Topology:
  """This machine's own devices as a topology (the compiler of the runtime that will run the
  job: TPU, GPU or CPU), with `usable_gib` per device (what the runtime lets JAX allocate)."""
  import jax
  devices = tuple(sorted(jax.local_devices(), key=lambda d: d.id))
  kind = kind or devices[0].device_kind
  chip = ChipKind(f"local {kind}", usable_gib, 1, usable_gib, 1)
  return Topology(f"local:{kind}", chip, (len(devices),), devices)
