"""Sampling with the `tiny` preset: random weights (DiT, VAE, byte-level T5), CPU, < 1 minute.

Command:
  python -m experiments.sample --config=experiments/configs/tiny.py

Expected result: a progress bar over the sampler steps, then
"wrote sample_tiny.mp4: 24 frames, 64x64, 3 chunks in ~20 s" (CPU). The video is noise-like
(random weights); the run proves the whole path: text rows, the streaming chunk sampler with
KV cache and guidance, the tiled VAE decode and the streaming mp4 writer. Try
`--config.mode=i2v --config.image=some.png` or `--config.mode=v2v --config.video=clip.mp4`.
"""

from experiments.configs.sample_common import sample_config


def get_config():
  return sample_config("tiny", precision="fp32", output="sample_tiny.mp4", text_cache_dir="")
