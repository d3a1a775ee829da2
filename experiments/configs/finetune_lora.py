"""LoRA fine-tuning of an official MAGI-1 DiT checkpoint on your own videos.

Command (a GPU/TPU job; the official 4.5B weights and T5 are downloaded separately):
  python -m experiments.train --config=experiments/configs/finetune_lora.py \\
    --config.init.path=ckpt/magi/4.5B_base/inference_weight \\
    --config.text.t5_path=ckpt/t5 --config.vae.path=ckpt/vae \\
    --config.data.video_dir=my_videos --workdir=runs/my_lora

Expected result: only the adapters train (the optimizer state holds adapter-shaped moments
only); `runs/my_lora/lora.safetensors` holds them, and with `--config.lora.export_merged=True`
`runs/my_lora/merged_dit/` is the merged model in the official layout (loadable by
`python -m experiments.sample --config.dit_checkpoint=...`). Sample the run itself with
`--config.checkpoint=runs/my_lora`, or the adapters on the base weights with
`--config.lora=runs/my_lora/lora.safetensors` (`lora_scale` to weaken them). The tests run
this path on tiny random "official" weights (tests/test_train_lora.py).

Variants: `:tiny` trains adapters on a tiny random official checkpoint at --config.init.path
with the bouncing world (used by the tests).
"""

from experiments.configs.train_common import official_video_finetune


def get_config(arg=None):
  c = official_video_finetune()
  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.optim.lr = 1e-4
  c.total_steps = 2000
  if arg == "tiny":
    from experiments.configs.bouncing_tiny import get_config as demo
    d = demo("smoke")
    d.init.kind = "official"
    d.lora.rank, d.lora.alpha = 4, 4.0
    d.lora.export_merged = True
    d.total_steps = 3
    d.optim.lr = 1e-2
    return d
  if arg:
    raise ValueError(f"unknown config variant {arg!r}; use ':tiny' or nothing")
  return c
