"""LoRA fine-tuning of an official MAGI-1 DiT checkpoint on your own videos (docs/finetune.md).

Commands (a GPU/TPU job; the official 4.5B weights, VAE and T5 are downloaded separately):
  python -m experiments.prepare --config=experiments/configs/finetune_lora.py \\
    --config.data.video_dir=my_videos --config.vae.path=ckpt/vae \\
    --config.text.t5_path=ckpt/t5 --out=prepared/my_videos
  python -m experiments.train --config=experiments/configs/finetune_lora.py \\
    --config.data.prepared_dir=prepared/my_videos \\
    --config.init.path=ckpt/magi/4.5B_base/inference_weight \\
    --config.text.t5_path=ckpt/t5 --config.vae.path=ckpt/vae \
    --config.text.special_tokens=special_tokens.npz --workdir=runs/my_lora

The first encodes every clip's chunks with the VAE and every caption with T5 once
(experiments.prepare); training then reads those shards (data.kind='prepared') and runs
neither. `--config.data.kind=video_folder --config.data.video_dir=my_videos` trains from the
folder instead, encoding each chunk inside the step.

Expected result: only the adapters train (the optimizer state holds adapter-shaped moments
only); `runs/my_lora/lora.safetensors` holds them, and with `--config.lora.export_merged=True`
`runs/my_lora/merged_dit/` is the merged model in the official layout (loadable by
`python -m experiments.sample --config.dit_checkpoint=...`). Sample the run itself with
`--config.checkpoint=runs/my_lora`, or the adapters on the base weights with
`--config.lora=runs/my_lora/lora.safetensors` (`lora_scale` to weaken them).

Variants:
  `:rehearsal` the same recipe on tiny shapes (32x32 clips of 2 chunks of 8 frames, a 2-layer
    DiT, the tiny VAE, the repository's tiny T5 at tests/fixtures/text/t5_tiny) for the random
    official weights of `python -m experiments.random_official`: docs/finetune.md rehearses
    every command on it in about a minute, and CI runs that rehearsal
    (tests/test_finetune_recipe.py).
  `:tiny` trains adapters on a tiny random official checkpoint at --config.init.path with the
    bouncing world (tests/test_train_lora.py).
"""

from experiments.configs.train_common import official_video_finetune

T5_TINY = "tests/fixtures/text/t5_tiny"     # d_model 64, a real T5 tokenizer


def get_config(arg=None):
  c = official_video_finetune()
  c.data.kind = "prepared"          # the shards of experiments.prepare
  c.mesh.data, c.mesh.fsdp = 1, -1   # the frozen base split over every device (docs/finetune.md)
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
  if arg == "rehearsal":
    c.model.preset = "tiny"
    c.model.overrides = dict(num_layers=2, caption_channels=64, caption_max_length=16)
    c.model.precision, c.model.remat = "fp32", False
    c.vae.precision = "fp32"
    c.text.t5_path, c.text.max_length = T5_TINY, 16
    d = c.data
    d.height = d.width = 32
    d.clip_frames, d.stride, d.frames_per_chunk = 16, 16, 8
    d.batch_size, d.bin_chunks, d.pack_window = 2, 2, 4
    c.objective.chunk_width = 2
    c.lora.rank, c.lora.alpha = 4, 4.0
    c.total_steps, c.checkpoint_every, c.log_every = 4, 4, 1
    c.optim.warmup_steps, c.optim.lr = 1, 1e-3
    c.tensorboard = False
    c.sample.num_steps = 4
    return c
  if arg:
    raise ValueError(f"unknown config variant {arg!r}; use ':rehearsal', ':tiny' or nothing")
  return c
