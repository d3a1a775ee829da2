"""Evaluate a trained bouncing-shapes run: `python -m experiments.evaluate --workdir=DIR`.

Loads the run's latest checkpoint (EMA weights when the run kept them) and measures, with the
autoregressive MAGI sampler on held-out episodes, the continuation (V2V) errors against
copy-last-frame / constant-velocity / blank baselines and text control (T2V). Prints the
report, writes `<workdir>/eval.json` and a frame strip `<workdir>/eval_strip.png`.
Expected result for the demo: see experiments/configs/bouncing_tiny.py and the README.
"""

import json
import os

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "runs/bouncing_tiny", "training run directory")
_NUM_CONT = flags.DEFINE_integer("num_continuations", 32, "held-out continuation episodes")
_NUM_TEXT = flags.DEFINE_integer("num_text", 32, "caption-only videos for text control")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "evaluate the raw weights, not the EMA")
_TEXT_SCALE = flags.DEFINE_float("text_scale", None, "override the config's guidance scale")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from PIL import Image

  from magi_jax.train.checkpoint import CheckpointError
  from magi_jax.proj.bouncing.evaluation import evaluate, format_report, sample_set
  from magi_jax.train.samples import frame_strip
  from magi_jax.train.trainer import load_trained
  try:
    c, model, tok, step = load_trained(_WORKDIR.value, step=_STEP.value,
                                       use_ema=not _NO_EMA.value)
  except CheckpointError as e:
    raise app.UsageError(str(e)) from None
  if c.data.kind != "bouncing":
    raise app.UsageError("experiments.evaluate measures bouncing_shapes runs; this run trained "
                         f"on {c.data.kind!r}")
  if _TEXT_SCALE.value is not None:
    c.sample.text_scale = _TEXT_SCALE.value
  print(f"evaluating {_WORKDIR.value} at step {step}")
  r = evaluate(c, model, tok, num_continuations=_NUM_CONT.value, num_text=_NUM_TEXT.value)
  print(format_report(r))
  r["step"] = step
  with open(os.path.join(_WORKDIR.value, "eval.json"), "w") as f:
    json.dump(r, f, indent=2)
  videos, _ = sample_set(c, model, tok, num=6)
  Image.fromarray(frame_strip(videos)).save(os.path.join(_WORKDIR.value, "eval_strip.png"))


if __name__ == "__main__":
  app.run(main)
