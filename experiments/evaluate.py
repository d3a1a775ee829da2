"""Evaluate a trained bouncing-shapes run: `python -m experiments.evaluate --workdir=DIR`.

Loads the run's latest checkpoint (EMA weights when the run kept them) and measures, with the
autoregressive MAGI sampler on held-out episodes, the continuation (V2V) errors against
copy-last-frame / constant-velocity / blank baselines and text control (T2V), and the sampler's
cost (network evaluations and wall time per chunk). A distilled run samples with one guidance
pass (cfg_number 1); `--num_steps=8,16` evaluates it at each step count in turn. Prints the
reports, writes `<workdir>/eval.json` (one report per step count, keyed "<n>_steps";
`eval_seed<N>.json` for `--eval_seed=N`, another block of held-out episodes) and a frame strip
`<workdir>/eval_strip.png` (the first step count). `--rollout_chunks=8` also continues
`--num_rollouts` single-object episodes to 8 chunks (twice the demo's training length) with the
first step count and prints the drift table per generated chunk (centre error vs the baselines,
share of episodes still showing one object of the right colour), stored under "rollout" in the
JSON. `--text_scale`, `--prev_scale`, `--window_size` and `--kv_chunks` (the chunks each chunk
attends to) override the run's sampler settings for calibration (`--output` keeps such a report
apart).
Expected result for the demo: see experiments/configs/bouncing_tiny.py and
bouncing_distill.py, and the README.
"""

import json
import os

from absl import app, flags, logging

from magi_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", "runs/bouncing_tiny", "training run directory")
_NUM_CONT = flags.DEFINE_integer("num_continuations", 32, "held-out continuation episodes")
_NUM_TEXT = flags.DEFINE_integer("num_text", 32, "caption-only videos for text control")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "evaluate the raw weights, not the EMA")
_TEXT_SCALE = flags.DEFINE_float("text_scale", None, "override the config's guidance scale")
_PREV_SCALE = flags.DEFINE_float("prev_scale", None, "override the config's guidance on the "
                                 "previous chunks (sample.prev_scale)")
_WINDOW = flags.DEFINE_integer("window_size", None, "override the chunks denoised at once "
                               "(sample.window_size; 1: each chunk finished before the next)",
                               lower_bound=1)
_KV_CHUNKS = flags.DEFINE_integer("kv_chunks", None, "override the chunks each chunk attends to, "
                                  "itself included (sample.kv_chunks; 0 = all earlier)",
                                  lower_bound=0)
_OUTPUT = flags.DEFINE_string("output", "", "the JSON report (default <workdir>/eval.json, "
                              "eval_seed<N>.json for --eval_seed=N)")
_EVAL_SEED = flags.DEFINE_integer("eval_seed", 0, "block of held-out episodes to evaluate on "
                                   "(blocks never overlap each other or the training episodes; "
                                   "0 is the one the demo was tuned on)", lower_bound=0)
_NUM_STEPS = flags.DEFINE_list("num_steps", [], "sampler step counts to evaluate, e.g. 8,16 "
                               "(default: the config's sample.num_steps)")
_ROLLOUT_CHUNKS = flags.DEFINE_integer("rollout_chunks", 0, "continue held-out episodes to this "
                                       "many chunks and report the drift per chunk (0: off)",
                                       lower_bound=0)
_NUM_ROLLOUTS = flags.DEFINE_integer("num_rollouts", 32, "single-object episodes of the long "
                                     "rollout", lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from PIL import Image

  from magi_jax.train.checkpoint import CheckpointError
  from magi_jax.proj.bouncing.evaluation import (evaluate, format_report, format_rollout,
                                                 rollout, sample_set, step_counts)
  from magi_jax.train.samples import frame_strip
  from magi_jax.train.trainer import load_trained
  try:
    c, model, tok, step = load_trained(_WORKDIR.value, step=_STEP.value,
                                       use_ema=not _NO_EMA.value)
  except CheckpointError as e:
    raise SystemExit(f"checkpoint error: {e}") from None
  if c.data.kind != "bouncing":
    raise app.UsageError("experiments.evaluate measures bouncing_shapes runs; this run trained "
                         f"on {c.data.kind!r}")
  for field, flag in (("text_scale", _TEXT_SCALE), ("prev_scale", _PREV_SCALE),
                      ("window_size", _WINDOW), ("kv_chunks", _KV_CHUNKS)):
    if flag.value is not None:
      setattr(c.sample, field, flag.value)
  try:
    counts = step_counts(_NUM_STEPS.value, c.sample.num_steps)
  except ValueError as e:
    raise app.UsageError(f"--num_steps: {e}") from None
  if 0 < _ROLLOUT_CHUNKS.value <= c.sample.prefix_chunks:
    raise app.UsageError(f"--rollout_chunks={_ROLLOUT_CHUNKS.value} generates nothing after the "
                         f"run's {c.sample.prefix_chunks} clean prefix chunk(s)")
  print(f"evaluating {_WORKDIR.value} at step {step}")
  reports = {}
  for n in counts:
    c.sample.num_steps = n
    r = evaluate(c, model, tok, num_continuations=_NUM_CONT.value, num_text=_NUM_TEXT.value,
                 block=_EVAL_SEED.value)
    print(f"--- {n} sampler steps ---")
    print(format_report(r))
    reports[f"{n}_steps"] = r
  if _ROLLOUT_CHUNKS.value:
    c.sample.num_steps = counts[0]
    reports["rollout"] = rollout(c, model, tok, num_episodes=_NUM_ROLLOUTS.value,
                                 chunks=_ROLLOUT_CHUNKS.value, block=_EVAL_SEED.value)
    print(f"--- long rollout, {counts[0]} sampler steps ---")
    print(format_rollout(reports["rollout"]))
  name = "eval.json" if _EVAL_SEED.value == 0 else f"eval_seed{_EVAL_SEED.value}.json"
  with open(_OUTPUT.value or os.path.join(_WORKDIR.value, name), "w") as f:
    json.dump({"step": step, **reports}, f, indent=2)
  c.sample.num_steps = counts[0]
  videos, _ = sample_set(c, model, tok, num=6)
  Image.fromarray(frame_strip(videos)).save(os.path.join(_WORKDIR.value, "eval_strip.png"))

if __name__ == "__main__":
  cli.run(main)
