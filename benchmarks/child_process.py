"""What the memory benchmarks share: one measurement per fresh process, and RSS readings.

A parent re-runs its own script with `--child=SPEC` (plus the flags that shape the run); the
child prints one `RESULT {json}` line. Peak RSS (ru_maxrss) is then that measurement's alone.
Children load the step executables from a persistent compilation cache the parent primes, so
compiler memory does not decide the figures.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

MiB = 2 ** 20
_TAG = "RESULT "


def peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def status_mib(field: str) -> float:
  """A `/proc/self/status` memory field (VmRSS, VmHWM, ...) in MiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


def current_mib() -> float:
  return status_mib("VmRSS")


def reset_hwm() -> bool:
  """Resets the kernel's RSS high-water mark (VmHWM) so it covers only what follows."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def use_compile_cache(path: str) -> None:
  """Every compiled executable is written to / read from `path` ("" or "none": off)."""
  if path and path != "none":
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def emit(result: dict) -> None:
  print(_TAG + json.dumps(result), flush=True)


def run_child(script: str, spec, flag_values: dict, cache_dir: str) -> dict:
  """Runs `script --child=spec --cache_dir=... --name=value...`; returns its RESULT."""
  argv = [sys.executable, os.path.abspath(script), f"--child={spec}", f"--cache_dir={cache_dir}"]
  argv += [f"--{name}={value}" for name, value in flag_values.items()]
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  p = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith(_TAG)]
  if p.returncode != 0 or not lines:
    sys.exit(f"child {spec} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
  return json.loads(lines[-1][len(_TAG):])
