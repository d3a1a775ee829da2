"""Multi-host start-up: flag / environment resolution (pure) and a real 2-process CPU run."""

import json
import os
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from absl import flags

from conftest import XLA_OPT_FLAG
from magi_jax.parallel import distributed
from magi_jax.parallel.distributed import Plan, resolve_plan

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "multiprocess_worker.py")

ADDR = "10.0.0.1:1234"


def full(**kw):
  s = {"coordinator_address": ADDR, "num_processes": 4, "process_id": 1}
  s.update(kw)
  return s


# ---------------------------------------------------------------------------------------------
# (a) resolution: flags, environment, JAX's detection, errors (no JAX start-up)

def resolve(settings=None, env=None, cluster=None, **kw):
  """resolve_plan with `cluster` as what JAX's detection reports (never the real probe)."""
  return resolve_plan(settings, {} if env is None else env, cluster=lambda: cluster, **kw)


def test_nothing_set_is_single_process():
  plan = resolve({}, {})
  assert plan.action == "none" and not plan.multi_process and plan.warning is None
  assert resolve({"distributed": "auto"}, {}).action == "none"


def test_explicit_flags():
  plan = resolve(full(local_device_ids="0,1"), {})
  assert plan == Plan("explicit", "flags", ADDR, 4, 1, (0, 1))
  assert plan.multi_process


def test_environment():
  env = {"MAGI_COORDINATOR_ADDRESS": "host-a:8476", "MAGI_NUM_PROCESSES": "2",
         "MAGI_PROCESS_ID": "0"}
  plan = resolve({}, env)
  assert (plan.action, plan.source) == ("explicit", "environment")
  assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("host-a:8476", 2, 0)
  assert plan.local_device_ids is None


def test_flag_overrides_environment_field_by_field():
  env = {"MAGI_COORDINATOR_ADDRESS": "host-a:8476", "MAGI_NUM_PROCESSES": "2",
         "MAGI_PROCESS_ID": "0", "MAGI_LOCAL_DEVICE_IDS": "3"}
  plan = resolve({"process_id": 1}, env)
  assert (plan.process_id, plan.num_processes, plan.local_device_ids) == (1, 2, (3,))
  assert plan.source == "environment + flags"


def test_ipv6_address():
  assert resolve(full(coordinator_address="[::1]:1234"), {}).coordinator_address == \
      "[::1]:1234"


@pytest.mark.parametrize("settings, env, match", [
    ({"coordinator_address": ADDR}, {}, r"--num_processes \(or MAGI_NUM_PROCESSES\) is required"),
    ({"coordinator_address": ADDR, "num_processes": 2}, {}, r"--process_id .* is required"),
    ({"num_processes": 2, "process_id": 0}, {}, r"--coordinator_address .* is required"),
    ({"process_id": 0}, {}, r"--coordinator_address"),
    ({}, {"MAGI_NUM_PROCESSES": "2", "MAGI_PROCESS_ID": "0"},
     r"--coordinator_address \(or MAGI_COORDINATOR_ADDRESS\) is required when "
     r"MAGI_NUM_PROCESSES, MAGI_PROCESS_ID"),
    (full(process_id=4), {}, r"--process_id=4 must be in \[0, 4\)"),
    (full(process_id=-1), {}, r"--process_id=-1 must be in"),
    (full(num_processes=0, process_id=0), {}, r"--num_processes must be >= 1"),
    (full(coordinator_address="10.0.0.1"), {}, r"--coordinator_address must be host:port"),
    (full(coordinator_address=":1234"), {}, r"--coordinator_address must be host:port"),
    (full(coordinator_address="h:99999"), {}, r"--coordinator_address needs a port"),
    (full(coordinator_address="h:port"), {}, r"--coordinator_address needs a port"),
    ({}, {"MAGI_COORDINATOR_ADDRESS": ADDR, "MAGI_NUM_PROCESSES": "two",
          "MAGI_PROCESS_ID": "0"}, r"MAGI_NUM_PROCESSES must be an integer"),
    ({}, {"MAGI_COORDINATOR_ADDRESS": ADDR, "MAGI_NUM_PROCESSES": "2",
          "MAGI_PROCESS_ID": "2"}, r"MAGI_PROCESS_ID=2 must be in \[0, 2\) "
                                   r"\(MAGI_NUM_PROCESSES=2\)"),
    (full(local_device_ids="0,,1"), {}, r"--local_device_ids must be a comma list"),
    (full(local_device_ids="0,-1"), {}, r"--local_device_ids must hold non-negative"),
    (full(local_device_ids="0,0"), {}, r"--local_device_ids repeats"),
    (full(local_device_ids="a"), {}, r"--local_device_ids must be an integer"),
    ({"local_device_ids": "0"}, {}, r"--local_device_ids needs a multi-process start-up"),
    (full(distributed="off"), {}, r"--distributed=off conflicts with --coordinator_address"),
    ({"distributed": "maybe"}, {}, r"--distributed must be one of auto\|on\|off"),
])
def test_errors_name_the_setting(settings, env, match):
  with pytest.raises(ValueError, match=match):
    resolve(settings, env)


def test_off_ignores_environment_and_clusters():
  env = {"MAGI_COORDINATOR_ADDRESS": ADDR, "MAGI_NUM_PROCESSES": "2", "MAGI_PROCESS_ID": "0"}
  plan = resolve({"distributed": "off"}, env, cluster=TPU_POD)
  assert plan.action == "none" and plan.source == "--distributed=off"


def test_jax_is_asked_only_when_nothing_explicit_decides():
  def probe():
    raise AssertionError("JAX's detection consulted")
  assert resolve_plan({"distributed": "off"}, {}, cluster=probe).action == "none"
  assert resolve_plan(full(), {}, cluster=probe).action == "explicit"
  with pytest.raises(AssertionError, match="consulted"):
    resolve_plan({}, {}, cluster=probe)


def test_on_without_anything_defers_to_jax_detection():
  plan = resolve({"distributed": "on"}, {})
  assert plan.action == "auto_detect" and plan.cluster_method is None


SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "node[01-02]",
              "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
SLURM = distributed.Cluster("SlurmCluster", "slurm", 2)
TPU_POD = distributed.Cluster("GkeTpuCluster", "gketpu", 4)


def test_slurm_step():
  plan = resolve({}, SLURM_STEP, SLURM)
  assert (plan.action, plan.cluster_method, plan.local_device_ids) == ("auto_detect", "slurm",
                                                                        None)
  assert plan.source == "JAX cluster detection (SlurmCluster)" and plan.multi_process
  # One task per node: every GPU of the node, not JAX's [SLURM_LOCALID].
  env = dict(SLURM_STEP, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8")
  assert resolve({}, env, SLURM).local_device_ids == tuple(range(8))
  env = dict(SLURM_STEP, SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_GPUS_ON_NODE="4")
  assert resolve({}, env, SLURM).local_device_ids == (0, 1, 2, 3)
  env = dict(SLURM_STEP, SLURM_NTASKS_PER_NODE="1")
  assert "only local device 0" in resolve({}, env, SLURM).warning
  # Explicit --local_device_ids win.
  env = dict(SLURM_STEP, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8")
  assert resolve({"local_device_ids": "0,1"}, env, SLURM).local_device_ids == (0, 1)
  # Explicit settings win over the detected cluster.
  assert resolve(full(), SLURM_STEP, SLURM).action == "explicit"


def test_slurm_single_task_or_outside_srun_is_single_process():
  one = distributed.Cluster("SlurmCluster", "slurm", 1)
  plan = resolve({}, dict(SLURM_STEP, SLURM_NTASKS="1"), one)
  assert plan.action == "none" and "one process" in plan.source
  assert resolve({"distributed": "on"}, SLURM_STEP, one).action == "auto_detect"
  batch = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2"}     # JAX recognises no srun step here
  plan = resolve({}, batch, None)
  assert plan.action == "none" and "not inside an srun step" in plan.warning


def test_tpu_mpi_and_unreadable_clusters():
  plan = resolve({}, {}, TPU_POD)
  assert (plan.action, plan.cluster_method, plan.num_processes) == ("auto_detect", "gketpu", 4)
  # A single-host TPU VM (JAX reads one worker from the metadata) is a single process.
  single = distributed.Cluster("GceTpuCluster", "gcetpu", 1)
  assert resolve({}, {}, single).action == "none"
  assert resolve({"distributed": "on"}, {}, single).cluster_method == "gcetpu"
  assert resolve({}, {}, distributed.Cluster("OmpiCluster", "ompi", 1)).action == "none"
  assert resolve({}, {}, distributed.Cluster("OmpiCluster", "ompi", 2)).multi_process
  # JAX recognises the environment but cannot count its processes: single process with a
  # warning under "auto"; "on" lets jax.distributed.initialize raise its own error.
  broken = distributed.Cluster("K8sCluster", None, None, "RuntimeError: no controller")
  plan = resolve({}, {}, broken)
  assert plan.action == "none" and "K8sCluster" in plan.warning and "no controller" in plan.warning
  plan = resolve({"distributed": "on"}, {}, broken)
  assert plan.action == "auto_detect" and plan.cluster_method is None


_CLUSTER_ENV = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "KUBERNETES_")


@pytest.fixture
def bare_environ(monkeypatch):
  """os.environ without any cluster variable (JAX's detection reads the process environment)."""
  for k in list(os.environ):
    if k.startswith(_CLUSTER_ENV):
      monkeypatch.delenv(k)
  return monkeypatch


def test_jax_cluster_is_jax_detection(bare_environ):
  assert distributed.jax_cluster() is None
  for k, v in SLURM_STEP.items():
    bare_environ.setenv(k, v)
  assert distributed.jax_cluster() == SLURM
  for k in SLURM_STEP:
    bare_environ.delenv(k)
  bare_environ.setenv("SLURM_JOB_ID", "77")              # a batch shell, outside srun
  bare_environ.setenv("SLURM_NTASKS", "2")
  assert distributed.jax_cluster() is None
  bare_environ.delenv("SLURM_JOB_ID")
  bare_environ.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
  bare_environ.setenv("OMPI_COMM_WORLD_SIZE", "2")
  assert distributed.jax_cluster() == distributed.Cluster("OmpiCluster", "ompi", 2)


def test_jax_cluster_platforms_and_errors(bare_environ):
  from jax._src.clusters import ClusterEnv
  # A private copy of JAX's registry: the kinds defined here vanish after the test.
  bare_environ.setattr(ClusterEnv, "_cluster_types", [])

  class FakeTpu(ClusterEnv):
    name = "faketpu"
    is_env_present = classmethod(lambda cls: True)
    get_process_count = classmethod(lambda cls: 4)

  assert distributed.jax_cluster({}) == distributed.Cluster("FakeTpu", "faketpu", 4)
  assert distributed.jax_cluster({"JAX_PLATFORMS": "tpu,cpu"}).num_processes == 4
  assert distributed.jax_cluster({"JAX_PLATFORMS": "cpu"}) is None      # joins no TPU pod

  class Broken(ClusterEnv):
    name = "broken"
    is_env_present = classmethod(lambda cls: True)

    @classmethod
    def get_process_count(cls):
      raise RuntimeError("no job")

  found = distributed.jax_cluster({"JAX_PLATFORMS": "cpu"})
  assert (found.kind, found.num_processes, found.error) == ("Broken", None,
                                                           "RuntimeError: no job")


def test_importing_the_module_defines_no_flags():
  names = list(distributed.FIELDS) + ["distributed"]
  code = ("import sys; from absl import flags; from magi_jax.parallel import distributed; "
          f"names = {names!r}; print(sum(n in flags.FLAGS for n in names)); "
          "import experiments.train; print(sum(n in flags.FLAGS for n in names)); "
          "distributed.define_flags(); print('again ok')")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=_clean_env(), timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["0", "5", "again", "ok"]


def test_define_flags_and_settings_from():
  assert distributed.settings_from({"process_id": 3})["process_id"] == 3
  ns = types.SimpleNamespace(coordinator_address=ADDR, num_processes=2, process_id=0,
                             distributed="on")
  s = distributed.settings_from(ns)
  assert s["coordinator_address"] == ADDR and s["local_device_ids"] is None
  assert s["distributed"] == "on"
  # No flags defined: every setting unset (the environment alone decides).
  assert set(distributed.settings_from(flags.FlagValues()).values()) == {None}
  fv = flags.FlagValues()
  distributed.define_flags(fv)
  distributed.define_flags(fv)                       # idempotent
  s = distributed.settings_from(fv)                  # unparsed: the defaults
  assert s == dict.fromkeys(distributed.FIELDS) | {"distributed": "auto"}
  fv(["prog", "--num_processes=2", "--distributed=off", "--local_device_ids=0,1"])
  s = distributed.settings_from(fv)
  assert (s["num_processes"], s["distributed"], s["process_id"]) == (2, "off", None)
  assert s["local_device_ids"] == "0,1"
  # A flag of the same name defined elsewhere is kept.
  fv = flags.FlagValues()
  flags.DEFINE_integer("num_processes", 8, "", flag_values=fv)
  distributed.define_flags(fv)
  assert distributed.settings_from(fv)["num_processes"] == 8 and "process_id" in fv


def test_initialize_with_and_without_the_flags(monkeypatch):
  monkeypatch.setattr(distributed, "_INFO", None)
  monkeypatch.setattr(distributed, "jax_cluster", lambda environ=None: None)
  for k in distributed.ENV_VARS.values():
    monkeypatch.delenv(k, raising=False)
  info = distributed.initialize(flags.FlagValues())      # no flags: environment only
  assert (info["process_count"], info["source"]) == (1, "single process")
  monkeypatch.setattr(distributed, "_INFO", None)
  fv = flags.FlagValues()
  distributed.define_flags(fv)
  fv(["prog", "--distributed=off"])
  assert distributed.initialize(fv)["source"] == "--distributed=off"


def test_cpu_collectives_enabled():
  import jax
  old = jax.config.jax_cpu_collectives_implementation
  try:
    jax.config.update("jax_cpu_collectives_implementation", None)
    distributed._enable_cpu_collectives(jax)
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
    jax.config.update("jax_cpu_collectives_implementation", "mpi")
    distributed._enable_cpu_collectives(jax)      # an explicit choice is kept
    assert jax.config.jax_cpu_collectives_implementation == "mpi"
  finally:
    jax.config.update("jax_cpu_collectives_implementation", old)


# ---------------------------------------------------------------------------------------------
# (b) real processes on localhost

_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "MAGI_", "JAX_COORDINATOR")


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  env.update(extra)
  env["XLA_FLAGS"] = f"{XLA_OPT_FLAG} {env['XLA_FLAGS']}"     # as the suite runs
  return env


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(envs, mode, tmp_path, timeout=120.0):
  """Starts one worker per env, waits for all (killing every one on failure or timeout) and
  returns their RESULT dicts in order."""
  procs, logs = [], []
  try:
    for i, env in enumerate(envs):
      log = open(tmp_path / f"worker{i}.log", "w+")
      logs.append(log)
      procs.append(subprocess.Popen([sys.executable, WORKER, mode], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  results = []
  for i, (p, text) in enumerate(zip(procs, texts)):
    assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{text[-4000:]}"
    lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
    assert len(lines) == 1, f"worker {i} printed no RESULT line:\n{text[-4000:]}"
    results.append(json.loads(lines[0][len("RESULT "):]))
  return results


def test_two_processes_global_sum(tmp_path):
  port = _free_port()
  envs = [_clean_env(MAGI_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MAGI_NUM_PROCESSES="2",
                     MAGI_PROCESS_ID=str(i)) for i in range(2)]
  r0, r1 = _run_workers(envs, "global_sum", tmp_path)
  for i, r in enumerate((r0, r1)):
    assert r["process_index"] == i
    assert r["process_count"] == 2
    assert r["local_device_count"] == 4 and r["global_device_count"] == 8
    assert r["addressable_shards"] == 4 and r["global_shape"] == [24, 2]
    assert r["source"] == "environment"
    assert r["sum"] == r["expected_sum"] == float(sum(range(48)))
  assert r0["sum"] == r1["sum"]
  assert r0["column_sums"] == r1["column_sums"] == [552.0, 576.0]


def test_single_machine_is_a_no_op(tmp_path):
  (r,) = _run_workers([_clean_env()], "global_sum", tmp_path)
  assert (r["process_count"], r["global_device_count"], r["source"]) == (1, 4, "single process")
  assert r["sum"] == r["expected_sum"]


def test_two_processes_train_like_one_process_of_eight(tmp_path):
  """2 processes x 4 CPU devices (JAX CPU collectives) = 1 process x 8 devices, for 3 train
  steps of the demo model on a fsdp x context x tensor mesh with ring attention."""
  port = _free_port()
  two = str(tmp_path / "two")
  envs = [_clean_env(MAGI_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MAGI_NUM_PROCESSES="2",
                     MAGI_PROCESS_ID=str(i), MAGI_TEST_WORKDIR=two) for i in range(2)]
  r0, r1 = _run_workers(envs, "train", tmp_path, timeout=400.0)
  (one,) = _run_workers([_clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8",
                                    MAGI_TEST_WORKDIR=str(tmp_path / "one"))], "train",
                        tmp_path, timeout=400.0)
  assert r0["process_count"] == 2 and one["process_count"] == 1
  assert r0["global_device_count"] == one["global_device_count"] == 8
  assert r1["losses"] is None                       # only process 0 writes metrics
  assert len(r0["losses"]) == 3
  np.testing.assert_allclose(r0["losses"], one["losses"], rtol=2e-5, atol=1e-7)
  # Both processes hold the same global parameters, equal to the one-process run's up to
  # summation order (Adam turns that noise in near-zero gradients into up to a few percent of
  # an entry's lr-sized update: see tests/test_mesh_train.py).
  assert r0["param_sums"] == r1["param_sums"]
  np.testing.assert_allclose(r0["param_norms"], one["param_norms"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(r0["param_sums"], one["param_sums"], rtol=1e-4, atol=1e-3)
