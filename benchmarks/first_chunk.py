"""Time to the first chunk of `experiments.sample`, a cold run against one with a warm
persistent compilation cache (magi_jax/compile_cache.py), each in a fresh process.

  python benchmarks/first_chunk.py                    # tiny preset, random weights, CPU
  python benchmarks/first_chunk.py --args=--config.num_frames=48 --runs=3

A fresh cache directory; run 1 compiles and fills it, runs 2.. load from it. Per run: the
process's wall time, and the command's own figures from its last line (`first chunk after X
s`: from the start of generation to the first decoded chunk; total generation time). Then each
warm run's figures as a ratio to the cold run.
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
flags.DEFINE_integer("runs", 2, "runs; the first is cold")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"chunks in ([\d.]+) s \(first chunk after ([\d.]+) s\)")


def one_run(cache: str, out: str) -> tuple[float, float, float]:
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "experiments.sample", f"--config={FLAGS.config}",
         f"--config.compile_cache_dir={cache}", f"--config.output={out}",
         "--config.progress=False", *FLAGS.args]
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
    cache = os.path.join(tmp, "cache")
    rows = [one_run(cache, os.path.join(tmp, f"run{i}.mp4")) for i in range(FLAGS.runs)]
    files = sum(len(f) for _, _, f in os.walk(cache))
  print(f"{FLAGS.config} {' '.join(FLAGS.args)}: cache entries {files}")
  print(f"{'run':>5} {'process s':>10} {'first chunk s':>14} {'generate s':>11}  ratios to run 1")
  for i, (wall, first, total) in enumerate(rows):
    ratio = "" if i == 0 else (f"  {wall / rows[0][0]:.2f} {first / rows[0][1]:.2f} "
                               f"{total / rows[0][2]:.2f}")
    print(f"{i + 1:>5} {wall:>10.1f} {first:>14.1f} {total:>11.1f}{ratio}")


if __name__ == "__main__":
  app.run(main)
