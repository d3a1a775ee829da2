"""MAGI-1 4.5B training, stage 1 of 3: 360p clips of up to 8 s (the report's recipe,
TRAINING.md: 360p <= 8 s -> 480p <= 8 s -> 720p <= 16 s, AdamW 0.9 / 0.95, weight decay 0.1,
lr 1e-4 after 1,000 warm-up steps, constant; images : videos 4 : 1).

Commands (a multi-host GPU/TPU job; the official T5 and VAE are downloaded separately; captioned
png / jpg images in the folder are the image part of the mix):
  python -m experiments.prepare --config=experiments/configs/magi_4p5b_stage1.py \\
    --config.data.video_dir=my_videos --config.text.t5_path=ckpt/t5 --config.vae.path=ckpt/vae
  python -m experiments.train --config=experiments/configs/magi_4p5b_stage1.py
then magi_4p5b_stage2.py and magi_4p5b_stage3.py (each starts from the previous stage's
workdir). Rerunning a command resumes its stage.

Expected result: prepared/magi_stage1/ holds the latents and T5 rows (1% of the videos held
out); runs/magi_4p5b_stage1/ a checkpoint and a validation loss per noise level every 1,000
steps (validation.jsonl, TensorBoard val/*) and loss.png. Not run at scale here (no
accelerator, data or weights); `:smoke` runs the same path on tiny shapes
(tests/test_stages.py: preparing a folder and the three stages, 27 s on a 2-core CPU,
measured 2026-12-04).

Choices where the report is silent:
* 360p is 352x640 (both sides multiples of 16, the VAE's 8x times the 2x2 patches; 368 is as
  far from 360); buckets at that pixel budget: landscape 352x640, portrait 640x352, square
  480x480. Each video is stretched to the bucket nearest its aspect ratio.
* <= 8 s: clips of 8 chunks of 24 frames (192 frames, stride 192), packed into rows of 8
  chunks as random sub-clips of 1..8 chunks (42,240 tokens per row).
* init: random weights; `--config.init.kind=official --config.init.path=ckpt/magi/4.5B_base/
  inference_weight` starts from the released base model instead.
* 64 rows per step (it must divide by the data x fsdp devices), 40,000 steps, an EMA of the
  weights at 0.9999 (the next stage starts from it): the report states none of them.

`:smoke`: 2 steps of a 1-layer tiny DiT on 32x32 latents of a random tiny VAE and rows of the
tiny T5 fixture; one prepared folder serves the three smoke stages:
  python -m experiments.prepare --config=experiments/configs/magi_4p5b_stage1.py:smoke \\
    --config.data.video_dir=DIR --config.data.prepared_dir=/tmp/prep
  python -m experiments.train --config=experiments/configs/magi_4p5b_stage1.py:smoke \\
    --config.data.prepared_dir=/tmp/prep
then stage2.py:smoke and stage3.py:smoke with the same prepared_dir (runs/magi_4p5b_stage*_smoke).
"""

from experiments.configs.train_common import magi_4p5b_training, stage_smoke


def get_config(arg=None):
  c = magi_4p5b_training()
  c.data.height, c.data.width = 352, 640
  c.data.buckets = ((352, 640), (640, 352), (480, 480))
  c.data.clip_frames = c.data.stride = 192        # 8 s: 8 chunks of 24 frames
  c.data.bin_chunks = 8
  c.data.batch_size = 64
  c.data.prepared_dir = "prepared/magi_stage1"
  c.total_steps = 40_000
  c.init.kind = "random"
  if arg == "smoke":
    return stage_smoke(c, total_steps=2)
  if arg:
    raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
  return c
