"""Write random weights in the official layouts for a training config, to rehearse a recipe
without downloads: `python -m experiments.random_official --config=<training config> --dst=DIR`.

Writes DIR/dit (the config's DiT architecture, official sharded safetensors: what
`init.kind='official'` / `init.path` reads) and DIR/vae (the tiny VAE, 16 channels, 8x space,
4x time, official `config.json` + `diffusion_pytorch_model.safetensors`: what
`vae.kind='official'` / `vae.path` reads). The weights are random: the commands run, the videos
are noise. docs/finetune.md rehearses the fine-tuning recipe on them (and CI runs it).
"""

import os

from absl import app, flags

from magi_jax import cli

_CONFIG = cli.config_file_flag("config", "experiments/configs/finetune_lora.py:rehearsal",
                               "training config whose model architecture the DiT gets")
_DST = flags.DEFINE_string("dst", None, "directory to write (dit/ and vae/ inside)",
                           required=True)
_SEED = flags.DEFINE_integer("seed", 0, "random seed")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from flax import nnx
  from magi_jax.convert.load import TINY_VAE, random_module
  from magi_jax.models import Precision, VideoDiT
  from magi_jax.models.vae import ViTVAE
  from magi_jax.official.dit import save_official_dit
  from magi_jax.official.vae import save_official_vae
  from magi_jax.train.build import model_config
  c = _CONFIG.value
  mcfg = model_config(c)
  seed = _SEED.value
  dit = random_module(lambda: VideoDiT(mcfg, precision=Precision.fp32(), rngs=nnx.Rngs(seed)),
                      seed)
  save_official_dit(dit, os.path.join(_DST.value, "dit"))
  vae = random_module(lambda: ViTVAE(TINY_VAE, precision=Precision.fp32(),
                                     rngs=nnx.Rngs(seed)), seed + 1)
  save_official_vae(vae, os.path.join(_DST.value, "vae"))
  print(f"wrote {_DST.value}/dit (DiT, {mcfg.num_layers} layers x {mcfg.hidden_size}) and "
        f"{_DST.value}/vae (tiny VAE), random weights in the official layouts")


if __name__ == "__main__":
  cli.run(main)
