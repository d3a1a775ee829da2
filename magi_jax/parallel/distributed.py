"""Multi-host start-up: one `jax.distributed.initialize` call before anything touches devices.

Every absl entry point that imports this module gets the flags below and calls
`initialize()` first thing in `main`. Where the settings come from, first match wins:

1. flags: `--coordinator_address=host:port --num_processes=N --process_id=I`
   (`--local_device_ids=0,1` optionally restricts the devices this process drives);
2. environment: `MAGI_COORDINATOR_ADDRESS`, `MAGI_NUM_PROCESSES`, `MAGI_PROCESS_ID`
   (`MAGI_LOCAL_DEVICE_IDS`); a flag overrides the variable of the same field;
3. a cluster JAX can configure itself, only when one is detected: a SLURM step with more than
   one task (inside `srun`), an Open MPI job with more than one rank, a TPU pod / multi-slice
   (`TPU_WORKER_HOSTNAMES`, `TPU_PROCESS_ADDRESSES`, `MEGASCALE_*`), or a Cloud TPU VM (TPU
   chips on the PCI bus: JAX reads the worker list from the VM metadata);
4. nothing: a single process, and `initialize` is a no-op.

`--distributed=off` skips all of this; `--distributed=on` requires a multi-process start-up
and lets JAX's auto-detection raise when it finds no cluster.

The argument resolution is `resolve_plan` (pure: settings + environment -> `Plan`), so it can
be tested without starting JAX.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from absl import flags, logging

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "multi-host: host:port of process 0's coordinator service "
    "(default: MAGI_COORDINATOR_ADDRESS, else auto-detected on SLURM / TPU pods)")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "multi-host: total number of processes (default: MAGI_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "multi-host: this process's index in [0, num_processes) (default: "
    "MAGI_PROCESS_ID)")
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids", None, "multi-host: comma list of the local device ids this process "
    "drives, e.g. 0,1 (default: all local devices)")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"], "multi-host start-up: auto (flags, then "
    "MAGI_* variables, then a detected SLURM / TPU-pod cluster, else single process), on "
    "(always call jax.distributed.initialize), off (never)")

FIELDS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
ENV_VARS = {
    "coordinator_address": "MAGI_COORDINATOR_ADDRESS",
    "num_processes": "MAGI_NUM_PROCESSES",
    "process_id": "MAGI_PROCESS_ID",
    "local_device_ids": "MAGI_LOCAL_DEVICE_IDS",
}
MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` will do.

  action: "none" (single process, no call), "explicit" (call with the given address, process
    count and id; JAX's cluster detection deactivated) or "auto_detect" (call and let JAX fill
    in what is unset from the detected cluster).
  source: where the settings came from, for the log line.
  fallback_ok: an "auto_detect" plan chosen from hardware alone (a Cloud TPU VM without pod
    variables): if JAX's detection finds nothing, continue as a single process.
  warning: something the caller should log.
  """
  action: str
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  fallback_ok: bool = False
  warning: str | None = None

  @property
  def multi_process(self) -> bool:
    return self.action != "none" and self.num_processes != 1


def _flag(field: str) -> str:
  return f"--{field}"


def _name(field: str, from_flag: bool) -> str:
  return _flag(field) if from_flag else ENV_VARS[field]


def _parse_int(value: Any, name: str) -> int:
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if isinstance(value, int):
    return value
  try:
    return int(str(value).strip())
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def parse_device_ids(value: Any, name: str = "--local_device_ids") -> tuple[int, ...]:
  """'0,1,3' (or a sequence of ints) -> (0, 1, 3); ValueError naming `name` otherwise."""
  if isinstance(value, str):
    parts = [p.strip() for p in value.split(",")]
  else:
    parts = list(value)
  if not parts or any(p == "" for p in parts):
    raise ValueError(f"{name} must be a comma list of device ids such as 0,1; got {value!r}")
  ids = tuple(_parse_int(p, name) for p in parts)
  if any(i < 0 for i in ids):
    raise ValueError(f"{name} must hold non-negative device ids; got {value!r}")
  if len(set(ids)) != len(ids):
    raise ValueError(f"{name} repeats a device id: {value!r}")
  return ids


def validate_address(address: str, name: str = "--coordinator_address") -> str:
  """'host:port' with a port in 1..65535 ('[::1]:1234' for IPv6); ValueError otherwise."""
  address = str(address).strip()
  host, sep, port = address.rpartition(":")
  if not sep or not host or host in ("[", "[]"):
    raise ValueError(f"{name} must be host:port (e.g. 10.0.0.1:1234), got {address!r}")
  if not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ValueError(f"{name} needs a port in 1..65535, got {address!r}")
  return address


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> int | None:
  """Tasks per node when every node runs the same number, else None.

  SLURM_NTASKS_PER_NODE ('1') when --ntasks-per-node was given, else the step's
  SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ('1(x2)', '2,1')."""
  for var in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    value = environ.get(var)
    if not value:
      continue
    counts = {m.group(1) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", value)}
    return int(counts.pop()) if len(counts) == 1 else None
  return None


def detect_cluster(environ: Mapping[str, str], tpu_vm: bool = False) -> str | None:
  """Name of a multi-process environment JAX can configure itself from, or None.

  Only environments that really run several processes count: a SLURM step with one task
  would make every process a coordinator of a one-process job, which is the same as not
  initializing at all.
  """
  if "SLURM_JOB_ID" in environ:
    ntasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1"
    in_step = all(v in environ for v in ("SLURM_STEP_NODELIST", "SLURM_PROCID",
                                         "SLURM_LOCALID"))
    if ntasks.isdigit() and int(ntasks) > 1 and in_step:
      return "SLURM"
  world = environ.get("OMPI_COMM_WORLD_SIZE", "")
  if "OMPI_MCA_orte_hnp_uri" in environ and world.isdigit() and int(world) > 1:
    return "Open MPI"
  for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    hosts = [h for h in environ.get(var, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return f"TPU pod ({var})"
  slices = environ.get("MEGASCALE_NUM_SLICES", "")
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS") or (slices.isdigit() and int(slices) > 1):
    return "multi-slice TPU (MEGASCALE_*)"
  if tpu_vm:
    return "Cloud TPU VM"
  return None


def resolve_plan(settings: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None,
                 tpu_vm: bool = False) -> Plan:
  """The start-up to perform, from flag values, environment variables and detection.

  settings: field -> flag value (None / '' = unset) for FIELDS and "distributed".
  environ: the environment (os.environ by default).
  tpu_vm: whether TPU chips are attached to this machine (`tpu_chips_present()`).
  Raises ValueError naming the flag (or variable) for a partial or inconsistent setting.
  """
  settings = dict(settings or {})
  environ = os.environ if environ is None else environ
  mode = settings.get("distributed") or "auto"
  if mode not in MODES:
    raise ValueError(f"--distributed must be one of {'|'.join(MODES)}, got {mode!r}")

  given = {f: settings[f] for f in FIELDS if settings.get(f) not in (None, "")}
  if mode == "off":
    if given:
      raise ValueError(f"--distributed=off conflicts with {', '.join(_flag(f) for f in given)}")
    return Plan("none", "--distributed=off")

  values: dict[str, Any] = {}
  from_flag: dict[str, bool] = {}
  for f in FIELDS:
    if f in given:
      values[f], from_flag[f] = given[f], True
    elif environ.get(ENV_VARS[f], "").strip():
      values[f], from_flag[f] = environ[ENV_VARS[f]].strip(), False

  def name(f):
    return _name(f, from_flag.get(f, True))

  def either(f):
    return f"{_flag(f)} (or {ENV_VARS[f]})"

  local = None
  if "local_device_ids" in values:
    local = parse_device_ids(values["local_device_ids"], name("local_device_ids"))

  core = [f for f in FIELDS[:3] if f in values]
  if core:
    missing = [f for f in FIELDS[:3] if f not in values]
    if missing:
      have = ", ".join(name(f) for f in core)
      raise ValueError(f"{either(missing[0])} is required when {have} is set: give "
                       "--coordinator_address, --num_processes and --process_id together")
    address = validate_address(values["coordinator_address"], name("coordinator_address"))
    num = _parse_int(values["num_processes"], name("num_processes"))
    pid = _parse_int(values["process_id"], name("process_id"))
    if num < 1:
      raise ValueError(f"{name('num_processes')} must be >= 1, got {num}")
    if not 0 <= pid < num:
      raise ValueError(f"{name('process_id')}={pid} must be in [0, {num}) "
                       f"({name('num_processes')}={num})")
    sources = sorted({"flags" if from_flag[f] else "environment" for f in core})
    return Plan("explicit", " + ".join(sources), address, num, pid, local)

  cluster = detect_cluster(environ, tpu_vm)
  warning = None
  if cluster == "SLURM" and local is None and _slurm_tasks_per_node(environ) == 1:
    # JAX pins each SLURM task to device [SLURM_LOCALID] (one task per GPU); with one task
    # per node that would leave a single GPU per node. Hand it the node's GPUs instead.
    gpus = environ.get("SLURM_GPUS_ON_NODE", "")
    if gpus.isdigit() and int(gpus) > 0:
      local = tuple(range(int(gpus)))
    else:
      warning = ("SLURM with one task per node and no SLURM_GPUS_ON_NODE: JAX will drive "
                 "only local device 0 of each node; pass --local_device_ids or the explicit "
                 "--coordinator_address / --num_processes / --process_id")
  if cluster is not None:
    return Plan("auto_detect", cluster, local_device_ids=local,
                fallback_ok=(cluster == "Cloud TPU VM" and mode == "auto"), warning=warning)
  if mode == "on":
    return Plan("auto_detect", "JAX auto-detection (--distributed=on)", local_device_ids=local)
  if local is not None:
    raise ValueError(f"{name('local_device_ids')} needs a multi-process start-up: set "
                     f"{either('coordinator_address')}, {either('num_processes')} and "
                     f"{either('process_id')}, or run under SLURM / on a TPU pod")
  if "SLURM_JOB_ID" in environ and (environ.get("SLURM_NTASKS") or "1") not in ("", "1"):
    warning = ("SLURM allocation with several tasks but not inside an srun step: running "
               "as a single process (launch with srun, or pass the explicit flags)")
  return Plan("none", "single process", warning=warning)


def tpu_chips_present() -> bool:
  """Whether TPU chips are on this machine's PCI bus (reads /sys only; never starts JAX)."""
  try:
    from jax._src import hardware_utils   # private, hence the guard
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:   # noqa: BLE001 - a probe; a failure means "no TPU seen"
    return False


def settings_from(flag_values: Any = None) -> dict[str, Any]:
  """FIELDS + "distributed" from absl FlagValues, a mapping or an object with attributes;
  None: the parsed absl flags (their defaults when not parsed yet)."""
  if flag_values is None:
    flag_values = flags.FLAGS
  out = {}
  for f in FIELDS + ("distributed",):
    if isinstance(flag_values, flags.FlagValues):
      if f not in flag_values:
        out[f] = None
      elif flag_values.is_parsed():
        out[f] = flag_values[f].value
      else:
        out[f] = flag_values[f].default
    elif isinstance(flag_values, Mapping):
      out[f] = flag_values.get(f)
    else:
      out[f] = getattr(flag_values, f, None)
  return out


_INFO: dict[str, Any] | None = None


def _enable_cpu_collectives(jax) -> None:
  """Cross-process collectives of the CPU backend (JAX's default is gloo since 0.4.3x; a
  None setting would leave multi-process CPU computations without collectives)."""
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(flag_values: Any = None) -> dict[str, Any]:
  """Starts the multi-process runtime once (see the module docstring) and returns
  {process_index, process_count, local_device_count, global_device_count, platform, source}.

  Call it before anything touches JAX devices (jax.devices(), a jitted call, device_put);
  later calls return the first call's dict.
  """
  global _INFO
  if _INFO is not None:
    return dict(_INFO)
  settings = settings_from(flag_values)
  # A run that asks for other platforms only (JAX_PLATFORMS=cpu on a TPU VM) joins no pod.
  platforms = os.environ.get("JAX_PLATFORMS", "")
  tpu_vm = False
  if ((settings.get("distributed") or "auto") != "off"
      and (not platforms or "tpu" in platforms.split(","))):
    tpu_vm = tpu_chips_present()
  plan = resolve_plan(settings, os.environ, tpu_vm=tpu_vm)
  if plan.warning:
    logging.warning("distributed: %s", plan.warning)

  import jax
  source = plan.source
  if plan.action != "none" and not jax.distributed.is_initialized():
    _enable_cpu_collectives(jax)
    local = list(plan.local_device_ids) if plan.local_device_ids is not None else None
    if plan.action == "explicit":
      # 'deactivate': use exactly these settings. Without it JAX fills unset fields from a
      # detected cluster, e.g. local_device_ids=[SLURM_LOCALID], one GPU per node.
      jax.distributed.initialize(
          coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
          process_id=plan.process_id, local_device_ids=local,
          cluster_detection_method="deactivate")
    else:
      try:
        jax.distributed.initialize(local_device_ids=local)
      except Exception as e:   # noqa: BLE001 - only for the hardware-only TPU guess
        if not plan.fallback_ok or jax.distributed.is_initialized():
          raise
        logging.warning("distributed: %s without a pod configuration (%s: %s); running as a "
                        "single process", plan.source, type(e).__name__, e)
        source = f"{plan.source}, single process"

  _INFO = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "local_device_count": jax.local_device_count(),
      "global_device_count": jax.device_count(),
      "platform": jax.default_backend(),
      "source": source,
  }
  logging.info("distributed: %s", _INFO)
  return dict(_INFO)
