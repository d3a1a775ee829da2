"""MAGI-1 4.5B training, stage 3 of 3: 720p clips of up to 16 s, starting from stage 2's
weights (magi_4p5b_stage2.py; AdamW 0.9 / 0.95, weight decay 0.1, lr 1e-4 after 1,000 warm-up
steps, then decayed to 1e-5; images : videos 4 : 1).

Commands (after stage 2; the official T5 and VAE are downloaded separately):
  python -m experiments.prepare --config=experiments/configs/magi_4p5b_stage3.py \\
    --config.data.video_dir=my_videos --config.text.t5_path=ckpt/t5 --config.vae.path=ckpt/vae
  python -m experiments.train --config=experiments/configs/magi_4p5b_stage3.py \\
    --config.mesh.context=8
(`--config.init.path=DIR` if stage 2 ran in another workdir than runs/magi_4p5b_stage2). A row
is 345,600 tokens (16 chunks of 45x80x6 patches), so its attention is split over the mesh's
context axis (`model.backend=auto` takes ring attention there); size the mesh for your devices
(`python -m magi_jax.aot --job=train --preset=4.5B_base --height=720 --width=1280 --chunks=16
...` compiles the step for a TPU slice and reports its memory).

Expected result: "init: DiT weights (EMA) of the run runs/magi_4p5b_stage2 at step 20000", then
a run like stage 2's whose learning rate falls from 1e-4 to 1e-5 over its steps. The final
model is runs/magi_4p5b_stage3 (sample it with `python -m experiments.sample
--config.checkpoint=runs/magi_4p5b_stage3`). Not run at scale here; `:smoke` is the tiny version
(tests/test_stages.py).

Choices where the report is silent:
* The decay: the report lowers the rate "on plateaus" of the loss down to 1e-5, a rule driven by
  the run's own curve. A fixed cosine from 1e-4 (after the warm-up) to 1e-5 at the last step
  stands for it here: reproducible, resumable to the same values, and it ends at the report's
  floor. For a plateau rule, stop the run, and continue it with a lower --config.optim.lr
  (--config.resume=changed).
* 720x1280 (buckets 720x1280, 1280x720, 960x960); <= 16 s: clips of 16 chunks of 24 frames (384
  frames, stride 384) in rows of 16 chunks; 16 rows per step (each 8x a stage-1 row), 10,000
  steps, EMA 0.9999.

`:smoke`: 3 steps from runs/magi_4p5b_stage2_smoke with the cosine decay (pass
--config.data.prepared_dir, and --config.init.path when stage 2's smoke run is elsewhere).
"""

from experiments.configs.train_common import magi_4p5b_training, stage_smoke


def get_config(arg=None):
  c = magi_4p5b_training()
  c.data.height, c.data.width = 720, 1280
  c.data.buckets = ((720, 1280), (1280, 720), (960, 960))
  c.data.clip_frames = c.data.stride = 384        # 16 s: 16 chunks of 24 frames
  c.data.bin_chunks = 16
  c.data.batch_size = 16
  c.data.prepared_dir = "prepared/magi_stage3"
  c.total_steps = 10_000
  c.optim.schedule = "cosine"                     # stands for the report's decay on plateaus
  c.optim.end_lr = 1e-5
  c.init.kind = "run"
  c.init.path = "runs/magi_4p5b_stage2"           # stage 2's default workdir
  if arg == "smoke":
    c = stage_smoke(c, total_steps=3)
    c.init.path = "runs/magi_4p5b_stage2_smoke"
    return c
  if arg:
    raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
  return c
