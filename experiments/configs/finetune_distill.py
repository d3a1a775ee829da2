"""Distils an official MAGI-1 base checkpoint into a few-step shortcut model on your videos.

Command (a GPU/TPU job; the official 4.5B base weights, T5 and the VAE are downloaded
separately):
  python -m experiments.train --config=experiments/configs/finetune_distill.py \\
    --config.init.path=ckpt/magi/4.5B_base/inference_weight \\
    --config.text.t5_path=ckpt/t5 --config.vae.path=ckpt/vae \\
    --config.data.video_dir=my_videos --workdir=runs/my_distill
(`:lora` trains LoRA adapters on the student instead of every weight.)

The init weights are the teacher (`distill.teacher='init'`, frozen) and the student's start
(the official distilled architecture adds no parameters). The teacher's guidance is the
official base model's sampling guidance (the 4.5B_base preset's runtime: five buckets over
cfg_t_range, previous-chunk scale 1.5 and text scale 7.5 below t = 0.3, 1 and 0 above), so the
student samples with `cfg_number` 1. Step sizes cycle [1/64] x 8, 1/32, 1/16, 1/8 (the
report's).

Expected result: `runs/my_distill/distilled_dit/` holds the student in the official layout
(LoRA merged), loadable as the official distilled checkpoints are
(`python -m experiments.sample --config=experiments/configs/magi.py:4.5B_distill
--config.dit_checkpoint=runs/my_distill/distilled_dit`; a converted orbax checkpoint of it
through `python -m magi_jax.convert`). Not run at scale here (no accelerator or weights): the
tests run this path end to end on tiny random "official" weights
(tests/test_distill_export.py), and the TPU compiler sizes the step (README "Fitting a job").

Variants: `:lora`; `:tiny` / `:tiny_lora` distil a tiny random official checkpoint at
--config.init.path on the bouncing world (used by the tests).
"""

from experiments.configs.train_common import official_video_finetune
from magi_jax.configs import get_preset


def _distill(c, export=True):
  c.init.kind = "official"
  c.distill.teacher = "init"
  c.distill.cycle = (1 / 64,) * 8 + (1 / 32, 1 / 16, 1 / 8)
  rt = get_preset("4.5B_base").runtime       # the official base model's sampling guidance
  c.distill.cfg_t_range = tuple(rt.cfg_t_range)
  c.distill.prev_chunk_scales = tuple(rt.prev_chunk_scales)
  c.distill.text_scales = tuple(rt.text_scales)
  c.distill.export_official = export
  return c


def get_config(arg=None):
  variants = (None, "lora", "tiny", "tiny_lora")
  if arg not in variants:
    raise ValueError(f"unknown config variant {arg!r}; use one of ':lora', ':tiny', "
                     "':tiny_lora' or nothing")
  if arg in ("tiny", "tiny_lora"):
    from experiments.configs.bouncing_tiny import get_config as demo
    d = _distill(demo("smoke"))
    d.distill.cycle = (1 / 8, 1 / 4)       # both targets in 3 steps
    d.total_steps = 3
    d.optim.warmup_steps = 1
    d.optim.lr = 1e-2
    if arg == "tiny_lora":
      d.lora.rank, d.lora.alpha = 4, 4.0
    return d
  c = _distill(official_video_finetune())
  c.optim.lr = 2e-5
  c.total_steps = 4400             # 400 cycles of the 11 step sizes
  if arg == "lora":
    c.lora.rank = 64
    c.lora.alpha = 64.0
    c.optim.lr = 1e-4
  return c
