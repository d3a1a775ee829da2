"""MAGI-1 4.5B training, stage 2 of 3: 480p clips of up to 8 s, starting from stage 1's
weights (magi_4p5b_stage1.py; the same recipe: AdamW 0.9 / 0.95, weight decay 0.1, lr 1e-4
after 1,000 warm-up steps, constant; images : videos 4 : 1).

Commands (after stage 1; the official T5 and VAE are downloaded separately):
  python -m experiments.prepare --config=experiments/configs/magi_4p5b_stage2.py \\
    --config.data.video_dir=my_videos --config.text.t5_path=ckpt/t5 --config.vae.path=ckpt/vae
  python -m experiments.train --config=experiments/configs/magi_4p5b_stage2.py
(`--config.init.path=DIR` if stage 1 ran in another workdir than runs/magi_4p5b_stage1).

Expected result: the first log line after the set-up reads "init: DiT weights (EMA) of the run
runs/magi_4p5b_stage1 at step 40000": a new run (step 0, fresh AdamW moments, its own
warm-up) from stage 1's final EMA weights (`--config.init.use_ema=False`: its raw weights). A
rerun resumes runs/magi_4p5b_stage2's own checkpoints, never stage 1's. prepared/magi_stage2/
and runs/magi_4p5b_stage2/ as in stage 1. Not run at scale here; `:smoke` is the tiny version
(tests/test_stages.py checks that it starts from stage 1's weights exactly).

Choices where the report is silent: 480x832 (the official 480p size; buckets 480x832, 832x480,
624x624), clips of 8 chunks (192 frames) in rows of 8 chunks (74,880 tokens), 64 rows per step,
20,000 steps, EMA 0.9999.

`:smoke`: 2 steps from runs/magi_4p5b_stage1_smoke (pass --config.data.prepared_dir, and
--config.init.path when stage 1's smoke run is elsewhere).
"""

from experiments.configs.train_common import magi_4p5b_training, stage_smoke


def get_config(arg=None):
  c = magi_4p5b_training()
  c.data.height, c.data.width = 480, 832
  c.data.buckets = ((480, 832), (832, 480), (624, 624))
  c.data.clip_frames = c.data.stride = 192        # 8 s: 8 chunks of 24 frames
  c.data.bin_chunks = 8
  c.data.batch_size = 64
  c.data.prepared_dir = "prepared/magi_stage2"
  c.total_steps = 20_000
  c.init.kind = "run"
  c.init.path = "runs/magi_4p5b_stage1"           # stage 1's default workdir
  if arg == "smoke":
    c = stage_smoke(c, total_steps=2)
    c.init.path = "runs/magi_4p5b_stage1_smoke"
    return c
  if arg:
    raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
  return c
