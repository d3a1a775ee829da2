"""A distilled student against its teacher on the bouncing demo, side by side in one process.

  python benchmarks/distill_student.py --teacher=runs/bouncing_tiny \\
      --student=runs/bouncing_distill --student_steps=8,16

The teacher samples with its own config (the demo: 16 steps x 3 guidance passes, window 2);
the student with one pass (cfg_number 1) at each of `--student_steps`. Each model runs the
demo evaluation (`magi_jax/proj/bouncing/evaluation.py`) on the same held-out episodes and
seeds: text control, continuation ball-centre error, bright-pixel ratio, pixel MSE, and the
sampler's cost (network evaluations and wall time per generated chunk, first call left out).
Prints a markdown table with every figure as a ratio to the teacher, and the speed-up next to
the network-evaluation ratio. Measured figures: README.md's distillation section and
experiments/configs/bouncing_distill.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """At start-up only: importing the module (the tests import `table`) defines no flags."""
  flags.DEFINE_string("teacher", "runs/bouncing_tiny", "the base run (the teacher)")
  flags.DEFINE_string("student", "runs/bouncing_distill", "the distillation run")
  flags.DEFINE_list("student_steps", ["8", "16"], "student step counts")
  flags.DEFINE_integer("num_continuations", 32, "held-out continuation episodes")
  flags.DEFINE_integer("num_text", 32, "caption-only videos for text control")

# (label, report getter, format); ratios are model / teacher.
FIGURES = (
    ("text control", lambda r: r["text_control_accuracy"], "{:.0%}"),
    ("centre error px", lambda r: r["continuation"]["centre_error_model"], "{:.2f}"),
    ("bright ratio", lambda r: r["continuation"]["bright_ratio_model"], "{:.2f}"),
    ("pixel MSE", lambda r: r["continuation"]["mse_model"], "{:.4f}"),
    ("NFE / chunk", lambda r: r["network_evaluations_per_chunk"], "{:d}"),
    ("ms / chunk", lambda r: r["seconds_per_chunk"] * 1e3, "{:.0f}"),
)


def table(rows: list[tuple[str, dict]]) -> str:
  """Markdown: one row per model, each figure with its ratio to the first row (the teacher)."""
  base = rows[0][1]
  head = ["model"] + [f for f, _, _ in FIGURES] + ["speed-up (NFE ratio)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in rows:
    cells = [name]
    for _, get, fmt in FIGURES:
      v, b = get(r), get(base)
      cells.append(fmt.format(v) + ("" if r is base else f" ({v / b:.2f}x)" if b else ""))
    speed = base["seconds_per_chunk"] / r["seconds_per_chunk"]
    nfe = base["network_evaluations_per_chunk"] / r["network_evaluations_per_chunk"]
    cells.append(f"{speed:.1f}x ({nfe:.1f}x)")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from magi_jax.proj.bouncing.evaluation import evaluate, format_report, step_counts
  from magi_jax.train import build
  from magi_jax.train.trainer import load_trained

  try:
    counts = step_counts(FLAGS.student_steps, 8)
  except ValueError as e:
    raise app.UsageError(f"--student_steps: {e}") from None
  kw = dict(num_continuations=FLAGS.num_continuations, num_text=FLAGS.num_text)
  tc, teacher, ttok, tstep = load_trained(FLAGS.teacher)
  sc, student, stok, sstep = load_trained(FLAGS.student)
  if build.distilling(tc) or not build.distilling(sc):
    raise app.UsageError(f"--teacher must be a base run and --student a distillation run "
                         f"({FLAGS.teacher}: distilled={build.distilling(tc)}, {FLAGS.student}: "
                         f"distilled={build.distilling(sc)})")
  rows = []
  r = evaluate(tc, teacher, ttok, **kw)
  print(f"teacher {FLAGS.teacher} (step {tstep}):\n{format_report(r)}")
  rows.append((f"teacher, {r['num_steps']} steps x {r['cfg_number']}", r))
  for n in counts:
    sc.sample.num_steps = n
    r = evaluate(sc, student, stok, **kw)
    print(f"student {FLAGS.student} (step {sstep}), {n} steps:\n{format_report(r)}")
    rows.append((f"student, {n} steps x 1", r))
  print(table(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
