"""Which runtime this is: the accelerator, its memory, the host's memory.

`detect()` reads JAX's devices: the platform, the device kind (`TPU v5 lite`, `Tesla T4`,
`NVIDIA L4`, `NVIDIA A100-SXM4-40GB`, `cpu`, ...), and the memory one device lets JAX allocate:
the allocator's own limit (`memory_stats()["bytes_limit"]`; on a GPU that is the share JAX
preallocates, 75% of the card unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise), else the
kind's known figure (KNOWN), else the host's available memory on a CPU. The host's memory is
/proc/meminfo's MemAvailable. `label` names the usual Colab runtimes: the free TPU v5e-1 and
T4, L4, A100.
"""

from __future__ import annotations

import dataclasses
import os

GIB = 2 ** 30

# Device memory JAX can use, by device kind (lower-case substring), GiB: for runtimes whose
# allocator reports no limit. TPU figures are the TPU compiler's "available HBM" (aot/topology).
KNOWN = (
    ("v5 lite", "TPU v5e", 15.75), ("v5e", "TPU v5e", 15.75), ("v6 lite", "TPU v6e", 31.25),
    ("v6e", "TPU v6e", 31.25), ("v5p", "TPU v5p", 95.74), ("v4", "TPU v4", 15.25),
    ("t4", "NVIDIA T4", 14.75), ("l4", "NVIDIA L4", 22.0),
    ("a100-sxm4-80", "NVIDIA A100 80GB", 79.0), ("a100 80", "NVIDIA A100 80GB", 79.0),
    ("a100", "NVIDIA A100 40GB", 39.4), ("h100", "NVIDIA H100", 79.0),
    ("h200", "NVIDIA H200", 139.0), ("v100", "NVIDIA V100", 15.75),
)


@dataclasses.dataclass(frozen=True)
class Runtime:
  platform: str                # 'tpu' | 'gpu' | 'cpu'
  device_kind: str             # JAX's device_kind
  num_devices: int
  device_gib: float            # per device, what JAX may allocate
  host_gib: float              # host memory available now
  label: str                   # "TPU v5e x1", "NVIDIA T4 x1", "CPU"
  memory_source: str           # where device_gib comes from

  def describe(self) -> str:
    where = "" if self.platform == "cpu" else f", {self.device_gib:.2f} GiB per device"
    return (f"{self.label} ({self.device_kind}{where} [{self.memory_source}], host "
            f"{self.host_gib:.1f} GiB available)")


def host_available_gib(meminfo: str = "/proc/meminfo") -> float:
  """MemAvailable in GiB (the physical pages / sysconf where /proc/meminfo is missing)."""
  try:
    with open(meminfo) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024 / GIB
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / GIB


def known_kind(device_kind: str) -> tuple[str, float] | None:
  kind = device_kind.lower()
  for key, name, gib in KNOWN:
    if key in kind:
      return name, gib
  return None


def runtime_of(platform: str, device_kind: str, num_devices: int, bytes_limit: int | None,
               host_gib: float) -> Runtime:
  """The Runtime of these readings (pure: what `detect` computes from the devices)."""
  platform = platform.lower()
  if platform == "cuda" or platform == "rocm":
    platform = "gpu"
  known = known_kind(device_kind) if platform != "cpu" else None
  if platform == "cpu":
    gib, source, name = host_gib, "host memory", "CPU"
  elif bytes_limit:
    gib, source = bytes_limit / GIB, "allocator limit"
    name = known[0] if known else device_kind
  elif known:
    name, gib = known
    source = "known figure for this kind"
  else:
    raise ValueError(f"device kind {device_kind!r} reports no memory limit and is not in "
                     "magi_jax.device_plan.detect.KNOWN; give the plan device_gib=")
  label = name if platform == "cpu" else f"{name} x{num_devices}"
  return Runtime(platform, device_kind, num_devices, float(gib), float(host_gib), label, source)


def detect() -> Runtime:
  import jax
  devices = jax.local_devices()
  d = devices[0]
  limit = None
  try:
    stats = d.memory_stats() or {}
    limit = stats.get("bytes_limit")
  except Exception:          # backends without memory stats (CPU) raise or return None
    limit = None
  return runtime_of(d.platform, d.device_kind, len(devices), limit, host_available_gib())
