"""Sample a video: `python -m experiments.sample --config=experiments/configs/<preset>.py`.

Writes the video to `--config.output` (default sample.mp4) and prints
`wrote <output>: <frames> frames, <W>x<H>, <chunks> chunks`. See experiments/configs/tiny.py
(runs anywhere, random weights) and the official-model configs; `--config.checkpoint=runs/NAME`
samples a training run instead (magi_jax/generate/trained.py). The config becomes a request
in `magi_jax.generate.build_from_config`; everything is validated before any weights load,
and a bad field fails as a usage error naming the `--config.<field>`.
"""

from absl import app, logging

from magi_jax import cli
from magi_jax.errors import MagiError
from magi_jax.parallel import distributed

distributed.define_flags()   # --coordinator_address ... --distributed

_CONFIG = cli.config_file_flag("config", "experiments/configs/tiny.py",
                                          "sampling config file")


def main(argv):
  del argv
  distributed.start(announce=False)   # before anything touches JAX devices
  from magi_jax.generate import build_from_config, generate
  from magi_jax.generate.trained import is_run_dir, sample_run

  from magi_jax import compile_cache

  c = _CONFIG.value
  compile_cache.enable(c.compile_cache_dir)
  try:
    if is_run_dir(c.checkpoint):
      sample_run(c)
      return
    comp, req, flags, opts = build_from_config(c)
    logging.info("sampling %s with %s", req.mode, c.preset)
    generate(comp, req, flags=flags, options=opts, progress=c.progress)
  except MagiError as e:          # bad input: a usage error, not a traceback
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  cli.run(main)
