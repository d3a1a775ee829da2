"""DiT streaming smoke run on the tiny preset: random weights, CPU, a few seconds.

Command:
  python -m experiments.dit_smoke --config=experiments/configs/dit_smoke.py

Expected result: one line per chunk, then "streamed == full forward: max |diff| ~1e-6 (PASS)"
and a KV-cache size that stays the same for every chunk after the kv window fills.
Any field can be overridden, e.g. `--config.num_chunks=8 --config.backend=flash`.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.preset = "tiny"            # a magi_jax.configs preset name
  c.num_chunks = 6             # chunks in the video
  c.latent_h = 8               # latent height (video height / 8)
  c.latent_w = 8
  c.kv_window = 3              # chunks each chunk attends to (itself + 2 earlier)
  c.backend = "auto"           # attention backend (auto: by platform and mesh)
  c.precision = "fp32"         # fp32 | bf16
  c.seed = 0
  c.tolerance = 1e-4           # streamed vs full forward, fp32
  return c
