"""Runs tests on 8 CPU devices.

XLA's host device count is fixed when JAX starts, and the rest of the suite runs on one
device. A test decorated with `eight_devices` runs as it is when the process already has 8
devices. Otherwise the first such test of a module runs the whole module once in a child
pytest with `--xla_force_host_platform_device_count=8` set before JAX starts, and every test
of the module then reports its own outcome from that run (one JAX start-up per module).
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import subprocess
import sys
import tempfile
import warnings
import xml.etree.ElementTree as ET

import jax
import pytest

NUM_DEVICES = 8
FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RUNS: dict[str, dict] = {}
CRASH_RETRIES = 1
# The child gets the environment the session was collected in, not what earlier tests left
# in os.environ (loading libtpu for the TPU compile tests sets TPU_LIBRARY_PATH and
# ALLOW_MULTIPLE_LIBTPU_LOAD): a CPU-only run should not see them.
_SESSION_ENV = dict(os.environ)
_FATAL = re.compile(r"^(F\d{4} |.*(Termination timeout|Check failed|Fatal Python error))")


def _run_module(path: str) -> dict:
  flags = " ".join([os.environ.get("XLA_FLAGS", ""), FLAG]).strip()
  env = dict(_SESSION_ENV, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  with tempfile.TemporaryDirectory() as tmp:
    report = os.path.join(tmp, "report.xml")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}", path], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    results = {}
    if os.path.exists(report):
      for case in ET.parse(report).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        results[case.get("name")] = ("failed",
                                     (bad.get("message") or "") + "\n" + (bad.text or "")) \
            if bad is not None else ("skipped", skipped.get("message")) if skipped is not None \
            else ("passed", "")
  # A fatal XLA error prints its reason once, before a long thread dump: keep those lines.
  fatal = [line for line in proc.stderr.splitlines() if _FATAL.match(line)]
  return {"results": results, "returncode": proc.returncode,
          "log": proc.stdout[-4000:] + "\n".join(fatal[:20]) + "\n" + proc.stderr[-2000:]}


def _killed_by_signal(returncode: int) -> bool:
  return returncode < 0 or returncode > 128


def _run_module_with_retries(path: str) -> dict:
  """`_run_module`, again (CRASH_RETRIES more times at most) when the child died by a signal
  before writing its report. XLA:CPU's simulated 8-device runs abort now and then (SIGABRT, no
  message; tests/test_sampler_mesh.py says where); a crash is announced with a warning, and a
  test that fails, or a child that crashes every time, still fails."""
  runs = []
  for _ in range(1 + CRASH_RETRIES):
    runs.append(_run_module(path))
    if not (_killed_by_signal(runs[-1]["returncode"]) and not runs[-1]["results"]):
      break
  if len(runs) > 1:
    warnings.warn(f"the {NUM_DEVICES}-device child of {os.path.basename(path)} died by a signal "
                  f"{sum(not r['results'] for r in runs)} time(s) (return codes "
                  f"{[r['returncode'] for r in runs]}); reran the module", stacklevel=2)
  return runs[-1]


def eight_devices(test=None, *, skip_if_xla_aborts: bool = False):
  """Runs `test` on 8 devices (see the module docstring). skip_if_xla_aborts: when the child
  died by a signal on every attempt, the test is skipped with that reason instead of failing
  (tests/test_sampler_mesh.py only: XLA:CPU's abort there is known and not ours to fix); a
  wrong result still fails."""
  if test is None:
    return functools.partial(eight_devices, skip_if_xla_aborts=skip_if_xla_aborts)
  path = os.path.abspath(inspect.getsourcefile(test))

  @functools.wraps(test)
  def run(*args, request, **kwargs):
    if jax.device_count() >= NUM_DEVICES:
      return test(*args, **kwargs)
    if path not in _RUNS:
      _RUNS[path] = _run_module_with_retries(path)
    run_info = _RUNS[path]
    outcome = run_info["results"].get(request.node.name)
    if outcome is None and skip_if_xla_aborts and _killed_by_signal(run_info["returncode"]):
      pytest.skip(f"XLA:CPU aborted the {NUM_DEVICES}-device child on all {1 + CRASH_RETRIES} "
                  f"attempts (return code {run_info['returncode']}); see "
                  f"{os.path.basename(path)}'s docstring")
    if outcome is None:
      pytest.fail(f"the {NUM_DEVICES}-device run of {os.path.basename(path)} did not report "
                  f"{request.node.name}:\n{run_info['log']}")
    status, message = outcome
    if status == "skipped":
      pytest.skip(message)
    assert status == "passed", f"on {NUM_DEVICES} devices: {message}"

  sig = inspect.signature(test)
  params = [p for p in sig.parameters.values() if p.name != "request"]
  params.append(inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY))
  run.__signature__ = sig.replace(parameters=params)
  return run
