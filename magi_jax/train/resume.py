"""Whether a workdir's run may be continued by this config (checked before any work).

A workdir whose `checkpoints/run.json` was written by a different config is refused, with the
first differing fields named, before a dataset is generated or a model built: resuming it would
mix two runs. Fields that only steer the run (how long, how often to log, save or sample, where
metrics go) may change on a resume; `config.resume = "changed"` resumes despite any other
difference (the differences are printed).
"""

from __future__ import annotations

import json
import os

from magi_jax.configs import ConfigError
from magi_jax.train.checkpoint import RUN_FILE, Checkpointer

# Top-level config fields (and sections) a resume may change.
RUN_CONTROL = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints",
               "async_checkpoints", "max_consecutive_nans", "tensorboard", "sample_every",
               "sample_at_end", "sample", "evals", "resume", "compile_cache_dir")
RESUME_MODES = ("same", "changed")
# Fields added to the training config after runs were already being made, with the value that
# does what the trainer did before the field existed: a run saved without the field resumes
# with it at that value as the same run.
ADDED_FIELDS = {"data.prepared_dir": "", "data.buckets": [], "data.image_ratio": 0.0,
                "data.val_fraction": 0.0, "validation.every": 0, "validation.batches": 4,
                "init.use_ema": True, "text.special_tokens": "",
                "text.special_token_flags": "hq,duration",
                "objective.levels": "sorted", "objective.stagger": 0.5,
                "objective.own_context": 0.0, "objective.own_context_t": [0.2, 0.5],
                "objective.own_context_from": 0}
SHOWN = 5                  # differing fields named in the message


def flatten(d: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
  """(field, saved value, current value) of every field outside RUN_CONTROL that differs; a
  field only one side has shows as '<absent>' on the other (unless the run lacks a field of
  ADDED_FIELDS that is at its former behaviour's value now)."""
  a, b = flatten(saved), flatten(json.loads(json.dumps(current)))    # tuples -> lists as saved
  out = []
  for key in sorted(set(a) | set(b)):
    if key.split(".")[0] in RUN_CONTROL:
      continue
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if va == "<absent>" and key in ADDED_FIELDS and vb == ADDED_FIELDS[key]:
      continue
    if va != vb:
      out.append((key, va, vb))
  return out


def check_resume(c, workdir: str, echo=print) -> None:
  """Raises ConfigError when `workdir` holds a run of another config (see the module doc)."""
  mode = c.get("resume", "same")
  if mode not in RESUME_MODES:
    raise ConfigError(f"config.resume={mode!r}: choose one of {', '.join(RESUME_MODES)}")
  ckdir = os.path.join(workdir, "checkpoints")
  if not os.path.exists(os.path.join(ckdir, RUN_FILE)):
    return
  saved = Checkpointer.read_run(ckdir).get("config", {})
  diff = differences(saved, c.to_dict())
  if not diff:
    return
  shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in diff[:SHOWN])
  more = f" (and {len(diff) - SHOWN} more)" if len(diff) > SHOWN else ""
  if mode == "changed":
    echo(f"resuming {workdir} with a changed config (config.resume=changed): {shown}{more}")
    return
  raise ConfigError(f"{workdir} holds a run of a different config: {shown}{more}. Resume it "
                    "with its own config, give a new --workdir, or pass --config.resume=changed "
                    "to continue it with these changes")
