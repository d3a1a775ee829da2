"""Train or fine-tune: `python -m experiments.train --config=experiments/configs/<name>.py
--workdir=DIR`.

A thin absl entry point over `magi_jax.train.trainer.train`; running it again with the same
workdir resumes from the latest checkpoint. The config files' docstrings give each command
and its expected result.
"""

import os

from absl import app, flags, logging

from magi_jax import cli
from magi_jax.parallel import distributed

distributed.define_flags()   # --coordinator_address ... --distributed

_CONFIG = cli.config_file_flag(
    "config", "experiments/configs/bouncing_tiny.py", "training config file (append :smoke "
    "for a few-step run)")
_WORKDIR = flags.DEFINE_string("workdir", "", "run directory: checkpoints, TensorBoard "
                               "events, samples (default: runs/<config name>)")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  arg = config_path.split(":")[1] if ":" in config_path else ""
  return os.path.join("runs", name + (f"_{arg}" if arg else ""))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.start()   # before anything touches JAX devices
  from magi_jax.configs import ConfigError
  from magi_jax.train.checkpoint import CheckpointError
  from magi_jax.train.trainer import TrainingError, train
  logging.set_verbosity(logging.WARNING)     # orbax logs every save at INFO
  from magi_jax import compile_cache
  c = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  print(f"workdir: {workdir}")
  compile_cache.enable(c.get("compile_cache_dir", ""))
  try:
    train(c, workdir)
  except (ConfigError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  except TrainingError as e:
    raise SystemExit(f"training stopped: {e}") from None
  except CheckpointError as e:
    raise SystemExit(f"checkpoint error: {e}") from None


if __name__ == "__main__":
  cli.run(main)
