"""python -m magi_jax.convert --src=DIR --dst=DIR [--model=dit|vae] [--config=PRESET|JSON]
  [--to=orbax|official]

official -> orbax (default): reads an official MAGI-1 DiT checkpoint directory
(`inference_weight*`: model.safetensors or shards + index, optionally .zst), strictly, with
fp8 weights dequantized, and writes a converted orbax checkpoint with its config.
orbax -> official (`--to=official`): writes the official safetensors layout back
(sharded above --shard_gb), e.g. to run the official code on weights trained here.
`--model=vae` does the same for the VAE directory (`config.json` +
`diffusion_pytorch_model.safetensors`; no --config needed). `--model=t5` reads a Hugging Face T5
directory (config.json + safetensors, single or sharded; the encoder's tensors only) and
writes orbax plus the tokenizer files, or back to the Hugging Face layout.
"""

from __future__ import annotations

import os

from absl import app, flags

from magi_jax import cli
from magi_jax.configs import ConfigError, PRESETS, get_preset, load_magi_config

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "source checkpoint directory", required=True)
flags.DEFINE_string("dst", None, "destination directory", required=True)
flags.DEFINE_string("config", None, f"preset ({', '.join(PRESETS)}) or an official *_config.json; "
                    "required when --src is an official checkpoint")
flags.DEFINE_enum("model", "dit", ["dit", "vae", "t5"], "which network the checkpoint holds")
flags.DEFINE_enum("to", "orbax", ["orbax", "official"], "output format")
flags.DEFINE_enum("precision", "bf16", ["bf16", "fp32"],
                  "parameter precision of the converted model")
flags.DEFINE_float("shard_gb", 5.0, "shard size for --to=official")


def _config(spec: str):
  if spec in PRESETS:
    return get_preset(spec)
  if os.path.exists(spec):
    return load_magi_config(spec)
  raise ConfigError(f"--config={spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")


def main(argv):
  del argv
  from magi_jax.official.dit import load_official_dit, save_official_dit
  from magi_jax.convert.orbax_io import is_converted, load_converted, save_converted
  from magi_jax.models import Precision

  if FLAGS.model == "t5":
    import jax.numpy as jnp
    from magi_jax.convert.orbax_io import load_converted_t5, save_converted_t5
    from magi_jax.official.t5 import load_t5, save_t5
    if FLAGS.to == "orbax":
      dtype = jnp.float32 if FLAGS.precision == "fp32" else jnp.bfloat16
      save_converted_t5(load_t5(FLAGS.src, dtype=dtype), FLAGS.dst, tokenizer_dir=FLAGS.src)
    else:
      save_t5(load_converted_t5(FLAGS.src), FLAGS.dst,
              max_shard_bytes=int(FLAGS.shard_gb * 2 ** 30))
    print(f"wrote {FLAGS.dst} (T5 encoder, {FLAGS.to})")
    return

  if FLAGS.model == "vae":
    from magi_jax.convert.orbax_io import load_converted_vae, save_converted_vae
    from magi_jax.official.vae import load_official_vae, save_official_vae
    if FLAGS.to == "orbax":
      vae = load_official_vae(FLAGS.src, precision=Precision.named(FLAGS.precision))
      save_converted_vae(vae, FLAGS.dst, precision=FLAGS.precision)
    else:
      save_official_vae(load_converted_vae(FLAGS.src, precision=FLAGS.precision), FLAGS.dst)
    print(f"wrote {FLAGS.dst} (VAE, {FLAGS.to})")
    return

  if FLAGS.to == "orbax":
    if not FLAGS.config:
      raise app.UsageError("--config is required to read an official checkpoint")
    cfg = _config(FLAGS.config)
    model = load_official_dit(FLAGS.src, cfg.model, precision=Precision.named(FLAGS.precision),
                              distill=cfg.engine.distill, progress=True)
    save_converted(model, cfg, FLAGS.dst, precision=FLAGS.precision)
    print(f"wrote {FLAGS.dst} ({FLAGS.precision}, distill={cfg.engine.distill})")
  else:
    if not is_converted(FLAGS.src):
      raise app.UsageError(f"--src={FLAGS.src} is not a converted magi_jax checkpoint")
    model, cfg = load_converted(FLAGS.src, precision=FLAGS.precision)
    save_official_dit(model, FLAGS.dst, max_shard_bytes=int(FLAGS.shard_gb * 2 ** 30),
                      progress=True)
    print(f"wrote the official layout to {FLAGS.dst}")


if __name__ == "__main__":
  cli.run(main)
