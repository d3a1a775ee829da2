"""Sampling with the official MAGI-1 4.5B base model (cfg 3, 64 steps, 720x720).

Command (after converting the official weights, see the README "Official weights"):
  python -m experiments.sample --config=experiments/configs/magi_4p5b_base.py \
    --config.dit_checkpoint=ckpt/magi_4.5B_base_orbax --config.vae_checkpoint=ckpt/vae \
    --config.t5_checkpoint=ckpt/t5/t5-v1_1-xxl --config.special_tokens=special_tokens.npz \
    --config.prompt="..." [--config.mode=i2v --config.image=img.jpg]

Expected result: "wrote sample.mp4: 96 frames" for T2V at the preset's size (I2V: 120
frames, V2V with a 32-frame prefix: 109), written chunk by chunk while sampling. Needs an
accelerator; missing checkpoints fail before any model work with the field to set.
"""

from experiments.configs.sample_common import sample_config


def get_config():
  return sample_config("4.5B_base")
