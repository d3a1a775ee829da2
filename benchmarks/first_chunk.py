"""Time to the first chunk of `experiments.sample`: a cold run that jits each sampler step on
first use (the baseline), a cold run that compiles them ahead in the background
(`--config.compile_ahead`, magi_jax/diffusion/ahead.py), and runs with a warm persistent
compilation cache (magi_jax/compile_cache.py); each in a fresh process.

  python benchmarks/first_chunk.py                    # tiny preset, random weights, CPU
  python benchmarks/first_chunk.py --args=--config.num_frames=48 --runs=3

Run 1: a fresh cache directory, compile_ahead=False. Run 2: another fresh cache directory,
compile_ahead=True; runs 3.. load from run 2's cache. Per run: the process's wall time, and
the command's own figures from its last line (`first chunk after X s`: from the start of
generation to the first decoded chunk; total generation time), then the ratios to run 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "experiments/configs/tiny.py", "sampling config")
flags.DEFINE_list("args", [], "extra --config.* arguments")
flags.DEFINE_integer("runs", 3, "runs: 1 cold jit, 2 cold ahead, then warm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"chunks in ([\d.]+) s \(first chunk after ([\d.]+) s\)")


def one_run(cache: str, out: str, ahead: bool) -> tuple[float, float, float]:
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "experiments.sample", f"--config={FLAGS.config}",
         f"--config.compile_cache_dir={cache}", f"--config.output={out}",
         "--config.progress=False", f"--config.compile_ahead={ahead}", *FLAGS.args]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
  m = LINE.search(proc.stdout)
  if not m:
    raise SystemExit(f"no timing line in the output:\n{proc.stdout[-2000:]}")
  return wall, float(m.group(2)), float(m.group(1))


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    rows = [one_run(os.path.join(tmp, "cache_jit"), os.path.join(tmp, "run0.mp4"), False)]
    cache = os.path.join(tmp, "cache")
    rows += [one_run(cache, os.path.join(tmp, f"run{i}.mp4"), True)
             for i in range(1, FLAGS.runs)]
    files = sum(len(f) for _, _, f in os.walk(cache))
  print(f"{FLAGS.config} {' '.join(FLAGS.args)}: cache entries {files}")
  print(f"{'run':>5} {'kind':>10} {'process s':>10} {'first chunk s':>14} {'generate s':>11}  "
        "ratios to run 1")
  kinds = ["cold jit", "cold ahead"] + ["warm"] * max(0, FLAGS.runs - 2)
  for i, (wall, first, total) in enumerate(rows):
    ratio = "" if i == 0 else (f"  {wall / rows[0][0]:.2f} {first / rows[0][1]:.2f} "
                               f"{total / rows[0][2]:.2f}")
    print(f"{i + 1:>5} {kinds[i]:>10} {wall:>10.1f} {first:>14.1f} {total:>11.1f}{ratio}")


if __name__ == "__main__":
  app.run(main)
