"""The built-in demo: a tiny MAGI model learns the bouncing-shapes world on a CPU.

Command (README main job; about 12 minutes on a 2-core CPU, no downloads):
  python -m experiments.train --config=experiments/configs/bouncing_tiny.py
then
  python -m experiments.evaluate --workdir=runs/bouncing_tiny

Expected result: the loss falls from ~1 to ~0.05; runs/bouncing_tiny/samples/ holds mp4/GIF
samples (truth | continuation side by side, and caption-only videos) and a PNG frame strip;
the evaluation prints continuation errors below copy-last-frame, a bright-pixel ratio within
50% of the truth and text control >= 90% (figures in the README).

`:smoke` runs 6 steps of a 1-layer model with a checkpoint every 2 steps (CI uses it).

The world and model (chosen so the targets hold in the time budget):
* world: 24x24 frames, one ball or square of one of four colours, gravity, elastic walls;
  16 frames = 4 chunks of 4 frames;
* pixel space (no VAE; a documented demo choice): "latents" are RGB in [-1, 1];
* model: the MAGI DiT architecture (block-causal chunks, per-chunk adaLN gates, parallel
  self + cross attention, learned 3D RoPE), 4 layers, width 128, 4x4 pixel patches, one frame
  per token; it predicts the clean sample (converted to a velocity for the sampler), which
  leaves a clean background where velocity prediction at this size leaves residual noise;
* text: a word-level encoder trained with the model (demo choice; real data uses T5 rows).
"""

from experiments.configs.train_common import train_config


def get_config(arg=None):
  c = train_config()
  c.total_steps = 3000
  c.log_every = 100
  c.checkpoint_every = 500
  c.ema_decay = 0.999

  c.model.overrides = dict(num_layers=4, hidden_size=128, ffn_hidden_size=512,
                           num_attention_heads=4, num_query_groups=2, kv_channels=32,
                           patch_size=4, t_patch_size=1, in_channels=3, out_channels=3)
  c.model.prediction = "clean"
  c.text.width = 64
  c.text.max_length = 16

  c.data.world = dict(height=24, width=24, num_frames=16, frames_per_chunk=4,
                      min_objects=1, max_objects=1)
  c.data.train_episodes = 2000
  c.data.test_episodes = 64
  c.data.batch_size = 8
  c.data.bin_chunks = 4
  c.data.min_chunks = 1
  c.objective.chunk_width = 4
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.end_lr = 1e-4

  c.sample.num_videos = 6
  c.sample.num_steps = 16
  c.sample.window_size = 2
  c.sample.text_scale = 3.0
  c.sample.prefix_chunks = 1

  if arg == "smoke":
    c.total_steps = 6
    c.log_every = 2
    c.checkpoint_every = 2
    c.ema_decay = 0.99
    c.model.overrides = dict(c.model.overrides, num_layers=1, hidden_size=64, ffn_hidden_size=128,
                             num_attention_heads=2, num_query_groups=1)
    c.data.world = dict(c.data.world, num_frames=8)
    c.data.train_episodes = 16
    c.data.test_episodes = 4
    c.data.batch_size = 2
    c.data.bin_chunks = 2
    c.data.pack_window = 4
    c.optim.warmup_steps = 2
    c.sample_at_end = False
    c.sample.num_videos = 2
    c.sample.num_steps = 4
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
  return c
