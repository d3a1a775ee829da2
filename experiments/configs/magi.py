"""Sampling with a released MAGI-1 model; the argument picks it:

  4.5B_distill   shortcut-distilled, cfg 1, 16 steps, 720x720 (the default)
  4.5B_base      base, cfg 3, 64 steps, 720x720
  24B_distill    shortcut-distilled, cfg 1, 16 steps, 720x1280
  24B_base       base, cfg 3, 64 steps, 720x1280

Command (after converting the official weights, see the README "Official weights"):
  python -m experiments.sample --config=experiments/configs/magi.py:24B_distill \
    --config.dit_checkpoint=ckpt/magi_24B_distill_orbax --config.vae_checkpoint=ckpt/vae \
    --config.t5_checkpoint=ckpt/t5/t5-v1_1-xxl --config.special_tokens=special_tokens.npz \
    --config.prompt="..." [--config.mode=i2v --config.image=img.jpg]

Expected result: "wrote sample.mp4: 96 frames" for T2V at the preset's size (I2V: 120
frames, V2V with a 32-frame prefix: 109), written chunk by chunk while sampling. Needs an
accelerator; missing checkpoints fail before any model work with the field to set.
"""

from experiments.configs.sample_common import sample_config

MODELS = ("4.5B_distill", "4.5B_base", "24B_distill", "24B_base")


def get_config(arg: str | None = None):
  model = arg or "4.5B_distill"
  if model not in MODELS:
    raise ValueError(f"experiments/configs/magi.py:{model}: the model must be one of {MODELS}")
  return sample_config(model)
