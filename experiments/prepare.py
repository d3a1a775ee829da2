"""Encode a training config's video folder offline: `python -m experiments.prepare
--config=experiments/configs/<name>.py --config.data.video_dir=DIR --out=PREPARED`.

Every clip's chunks go through the config's VAE and every distinct caption through its T5 once;
the shards, their markers and `manifest.json` land in --out (default `data.prepared_dir`).
Train on them with `--config.data.kind=prepared --config.data.prepared_dir=PREPARED`
(docs/finetune.md). Multi-host: start it on every host as training is started (launch/: the
same distributed flags); each process makes its own shards on its own devices. Running the
same command again finishes an interrupted job without redoing finished shards.
"""

from absl import app, flags

from magi_jax import cli
from magi_jax.parallel import distributed

distributed.define_flags()   # --coordinator_address ... --distributed

_CONFIG = cli.config_file_flag(
    "config", "experiments/configs/finetune_lora.py", "training config whose data / vae / text "
    "sections say what to encode")
_OUT = flags.DEFINE_string("out", "", "prepared directory to write (default: "
                           "config.data.prepared_dir)")
_PER_SHARD = flags.DEFINE_integer("videos_per_shard", 8, "videos per shard (the unit a re-run "
                                  "redoes)", lower_bound=1)
_PER_DEVICE = flags.DEFINE_integer("chunks_per_device", 2, "chunks each device encodes per "
                                   "call (memory against speed; the latents do not change)",
                                   lower_bound=1)
_TFDS = flags.DEFINE_string("tfds_dir", "", "encode the clips of a built video_folder TFDS "
                            "dataset (its version directory) instead of data.video_dir")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar with ETA on stderr")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.start()   # before anything touches JAX devices
  from magi_jax import compile_cache
  from magi_jax.train.prepare import prepare_from_config
  c = _CONFIG.value
  compile_cache.enable(c.get("compile_cache_dir", ""))
  prepare_from_config(c, _OUT.value, videos_per_shard=_PER_SHARD.value,
                      chunks_per_device=_PER_DEVICE.value, tfds_dir=_TFDS.value,
                      progress=_PROGRESS.value)


if __name__ == "__main__":
  cli.run(main)
