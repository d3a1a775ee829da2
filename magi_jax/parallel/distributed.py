"""Multi-host start-up: one `jax.distributed.initialize` call before anything touches devices.

Every absl entry point that starts JAX calls `define_flags()` at module level (nothing here
defines a flag at import) and `initialize()` first thing in `main`; without the flags,
`initialize` reads the environment only. Where the settings come from, first match wins:

1. flags: `--coordinator_address=host:port --num_processes=N --process_id=I`
   (`--local_device_ids=0,1` optionally restricts the devices this process drives);
2. environment: `MAGI_COORDINATOR_ADDRESS`, `MAGI_NUM_PROCESSES`, `MAGI_PROCESS_ID`
   (`MAGI_LOCAL_DEVICE_IDS`); a flag overrides the variable of the same field;
3. a cluster JAX configures itself from: `jax.distributed.initialize()` called with no
   coordinator, process count or id;
4. nothing: a single process, and `initialize` is a no-op.

What is JAX's and what is ours:

* JAX's: recognising a cluster and reading its coordinator, process count and id (SLURM steps,
  Open MPI, Cloud TPU VMs and pods from the VM metadata or `TPU_WORKER_HOSTNAMES` /
  `TPU_PROCESS_ADDRESSES`, multi-slice `MEGASCALE_*`, Kubernetes jobs). `jax_cluster()` asks
  JAX's own cluster registry which environment it would use, and `initialize` then lets
  `jax.distributed.initialize` fill everything in from it.
* Ours: the MAGI_* variables and the flags, validated before JAX starts with errors that
  name the flag or variable (JAX gets them with its detection deactivated); whether a
  multi-process start-up is wanted at all (`resolve_plan`: a cluster JAX recognises but that
  reports one process, e.g. a one-task SLURM step or a single-host TPU VM, runs as a plain
  single process; a `JAX_PLATFORMS` without 'tpu' joins no TPU pod; a cluster whose process
  count JAX cannot read runs single-process with a warning, unless `--distributed=on`); every
  GPU of the node for a one-task-per-node SLURM step, where JAX would pin each task to GPU
  `SLURM_LOCALID`; and the CPU backend's cross-process collectives (gloo).

`--distributed=off` skips all of this; `--distributed=on` always calls
`jax.distributed.initialize`, which raises when it finds no cluster.

`resolve_plan` is pure (settings + environment + a cluster probe -> `Plan`), so it can be
tested without starting JAX.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from absl import flags, logging

FIELDS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
ENV_VARS = {
    "coordinator_address": "MAGI_COORDINATOR_ADDRESS",
    "num_processes": "MAGI_NUM_PROCESSES",
    "process_id": "MAGI_PROCESS_ID",
    "local_device_ids": "MAGI_LOCAL_DEVICE_IDS",
}
MODES = ("auto", "on", "off")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --coordinator_address, --num_processes, --process_id, --local_device_ids and
  --distributed on `flag_values` (absl's global flags by default). Call it at module level of
  an absl entry point that calls `initialize()`; a second call, or a flag of that name already
  defined, leaves the existing flag alone."""
  def define(name, fn, *args, **kw):
    if name not in flag_values:
      fn(name, *args, flag_values=flag_values, **kw)

  define("coordinator_address", flags.DEFINE_string, None,
         "multi-host: host:port of process 0's coordinator service (default: "
         "MAGI_COORDINATOR_ADDRESS, else what JAX detects on SLURM / TPU pods)")
  define("num_processes", flags.DEFINE_integer, None,
         "multi-host: total number of processes (default: MAGI_NUM_PROCESSES)")
  define("process_id", flags.DEFINE_integer, None,
         "multi-host: this process's index in [0, num_processes) (default: MAGI_PROCESS_ID)")
  define("local_device_ids", flags.DEFINE_string, None,
         "multi-host: comma list of the local device ids this process drives, e.g. 0,1 "
         "(default: all local devices)")
  define("distributed", flags.DEFINE_enum, "auto", list(MODES),
         "multi-host start-up: auto (flags, then MAGI_* variables, then a cluster JAX detects "
         "with more than one process, else single process), on (always call "
         "jax.distributed.initialize), off (never)")


@dataclasses.dataclass(frozen=True)
class Cluster:
  """A cluster environment JAX's auto-detection recognises (one of its `ClusterEnv` kinds).

  kind: JAX's class name, for messages ("SlurmCluster").
  method: its `cluster_detection_method` name ("slurm"); None where JAX gives it none.
  num_processes: the process count JAX reads from it; None when reading it failed (`error`).
  """
  kind: str
  method: str | None
  num_processes: int | None
  error: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` will do.

  action: "none" (single process, no call), "explicit" (call with the given address, process
    count and id; JAX's cluster detection deactivated) or "auto_detect" (call and let JAX fill
    in what is unset from the cluster it detects).
  source: where the settings came from, for the log line.
  cluster_method: for "auto_detect", the `cluster_detection_method` to hand JAX (the
    environment `jax_cluster()` found); None lets JAX pick.
  warning: something the caller should log.
  """
  action: str
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  cluster_method: str | None = None
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


def jax_cluster(environ: Mapping[str, str] | None = None) -> Cluster | None:
  """The cluster environment `jax.distributed.initialize()` would configure itself from, with
  the process count JAX reads from it, or None.

  JAX's own tests decide (its `ClusterEnv` registry, in its order; opt-in kinds such as mpi4py
  skipped, as JAX skips them). They read the process environment (and, on a Cloud TPU VM, the
  VM metadata) whatever `environ` says; `environ` only supplies JAX_PLATFORMS: a value
  without 'tpu' (JAX_PLATFORMS=cpu on a TPU VM) ignores the TPU kinds. Never starts JAX.
  """
  environ = os.environ if environ is None else environ
  try:
    from jax._src.clusters import ClusterEnv   # private: jax.distributed offers no probe
  except ImportError:                           # a JAX without it: nothing is detected
    return None
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  skip_tpu = bool(platforms) and "tpu" not in platforms
  for env in getattr(ClusterEnv, "_cluster_types", ()):
    method = getattr(env, "name", "") or None
    if getattr(env, "opt_in_only_method", False) or (skip_tpu and "tpu" in (method or "")):
      continue
    try:
      if not env.is_env_present():
        continue
      return Cluster(env.__name__, method, int(env.get_process_count()))
    except Exception as e:   # noqa: BLE001 - reported by the plan; JAX raises it under "on"
      return Cluster(env.__name__, method, None, f"{type(e).__name__}: {e}")
  return None


def resolve_plan(settings: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None,
                 cluster: Callable[[], Cluster | None] | None = None) -> Plan:
  """The start-up to perform, from flag values, environment variables and JAX's detection.

  settings: field -> flag value (None / '' = unset) for FIELDS and "distributed".
  environ: the environment (os.environ by default).
  cluster: returns the cluster JAX detects (`jax_cluster`, the default); called only when no
    explicit setting decides and the mode is not "off".
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

  found = (cluster or (lambda: jax_cluster(environ)))()
  if found is not None and found.num_processes is None and mode == "auto":
    return Plan("none", "single process",
                warning=f"JAX detects a {found.kind} environment but cannot read its process "
                        f"count ({found.error}): running as a single process (--distributed=on "
                        "makes this an error; or pass --coordinator_address / --num_processes "
                        "/ --process_id)")
  if found is not None and (found.num_processes != 1 or mode == "on"):
    warning = None
    if found.method == "slurm" and local is None and _slurm_tasks_per_node(environ) == 1:
      # JAX pins each SLURM task to device [SLURM_LOCALID] (one task per GPU); with one task
      # per node that would leave a single GPU per node. Hand it the node's GPUs instead.
      gpus = environ.get("SLURM_GPUS_ON_NODE", "")
      if gpus.isdigit() and int(gpus) > 0:
        local = tuple(range(int(gpus)))
      else:
        warning = ("SLURM with one task per node and no SLURM_GPUS_ON_NODE: JAX will drive "
                   "only local device 0 of each node; pass --local_device_ids or the explicit "
                   "--coordinator_address / --num_processes / --process_id")
    return Plan("auto_detect", f"JAX cluster detection ({found.kind})",
                num_processes=found.num_processes, local_device_ids=local,
                cluster_method=found.method, warning=warning)
  if mode == "on":
    return Plan("auto_detect", "JAX cluster detection (--distributed=on)", local_device_ids=local)
  if local is not None:
    raise ValueError(f"{name('local_device_ids')} needs a multi-process start-up: set "
                     f"{either('coordinator_address')}, {either('num_processes')} and "
                     f"{either('process_id')}, or run under SLURM / on a TPU pod")
  if found is not None:
    return Plan("none", f"single process ({found.kind} with one process)")
  warning = None
  if "SLURM_JOB_ID" in environ and (environ.get("SLURM_NTASKS") or "1") not in ("", "1"):
    warning = ("SLURM allocation with several tasks but not inside an srun step: running "
               "as a single process (launch with srun, or pass the explicit flags)")
  return Plan("none", "single process", warning=warning)


def settings_from(flag_values: Any = None) -> dict[str, Any]:
  """FIELDS + "distributed" from absl FlagValues, a mapping or an object with attributes;
  None: absl's global flags (their defaults when not parsed yet). A flag that was never
  defined (no `define_flags` call) reads as None: unset."""
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


def start(announce: bool = True) -> dict[str, Any]:
  """`initialize()` for an absl entry point's `main`: a bad setting becomes `app.UsageError`
  (one line, exit 2, through magi_jax.cli), and a multi-process start says which process this
  is and which devices it drives."""
  from absl import app
  try:
    info = initialize()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if announce and info["process_count"] > 1:
    print(f"process {info['process_index']} of {info['process_count']} ({info['source']}): "
          f"{info['local_device_count']} of {info['global_device_count']} devices")
  return info


def initialize(flag_values: Any = None) -> dict[str, Any]:
  """Starts the multi-process runtime once (see the module docstring) and returns
  {process_index, process_count, local_device_count, global_device_count, platform, source}.

  flag_values: as `settings_from` (None: absl's global flags, which may lack this module's
  flags: then the environment alone decides). Call it before anything touches JAX devices
  (jax.devices(), a jitted call, device_put); later calls return the first call's dict.
  """
  global _INFO
  if _INFO is not None:
    return dict(_INFO)
  plan = resolve_plan(settings_from(flag_values), os.environ)
  if plan.warning:
    logging.warning("distributed: %s", plan.warning)

  import jax
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
      jax.distributed.initialize(local_device_ids=local,
                                 cluster_detection_method=plan.cluster_method)

  _INFO = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "local_device_count": jax.local_device_count(),
      "global_device_count": jax.device_count(),
      "platform": jax.default_backend(),
      "source": plan.source,
  }
  logging.info("distributed: %s", _INFO)
  return dict(_INFO)
