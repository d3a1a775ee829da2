"""Distils the README demo's trained base model into a few-step shortcut student.

Command, after the demo's base run (`--config=experiments/configs/bouncing_tiny.py`):
  python -m experiments.train --config=experiments/configs/bouncing_distill.py \
      --workdir=runs/bouncing_distill
The student has the teacher's architecture (this config starts from bouncing_tiny's) plus the
step-size embedding, and samples without guidance passes (cfg_number 1) at 8 steps.

Expected result: not measured yet. The distillation run and the student-vs-teacher figures
(text control, continuation centre error, bright-pixel ratio, wall time per chunk at 8 and 16
steps against the teacher's 16 steps x 3 passes) are the next slice of this work.

The teacher's guidance is the one the demo samples with: 4 on the previous chunks, text 3
for caption-only videos and 1 for continuations (`v2v_text_scales`).

`:smoke` distils the 2-step teacher of `bouncing_tiny.py:smoke` (`--config.distill.teacher`)
for 4 steps over the cycle (1/8, 1/4): both targets, the teacher's and the self-consistency
one, in CI.
"""

from experiments.configs import bouncing_tiny


def get_config(arg=None):
  c = bouncing_tiny.get_config("smoke" if arg == "smoke" else None)
  c.distill.teacher = "runs/bouncing_tiny"
  c.distill.cycle = (1 / 64,) * 8 + (1 / 32, 1 / 16, 1 / 8)
  c.distill.prev_chunk_scales = (c.sample.prev_scale,)
  c.distill.text_scales = (c.sample.text_scale,)
  c.distill.v2v_text_scales = (c.sample.v2v_text_scale,)
  c.total_steps = 1100               # 100 cycles of 11 step sizes
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.optim.end_lr = 2e-5
  c.sample.num_steps = 8
  if arg == "smoke":
    c.distill.teacher = "runs/bouncing_tiny_smoke"   # a bouncing_tiny.py:smoke workdir
    c.distill.cycle = (1 / 8, 1 / 4)
    c.total_steps = 4
    c.optim.warmup_steps = 1
    c.sample.num_steps = 4
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
  return c
