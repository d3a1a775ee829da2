"""A run that starts from a previous run's weights (`config.init.kind = "run"`): MAGI-1's
training stages (360p -> 480p -> 720p, experiments/configs/magi_4p5b_stage*.py) each begin
where the previous stage ended.

The new run takes the DiT weights (and the trained text encoder, when both runs have one) of
the latest checkpoint in `config.init.path`, the EMA weights with `init.use_ema` when that run
kept an EMA, and nothing else: its optimizer state, step counter, schedule and data position
start afresh from the new config. A workdir that already holds checkpoints resumes them
instead (`has_checkpoint`): resuming a stage continues that stage.

Refused (ConfigError, before any weights are read): an `init.path` that is not a run directory
or holds no checkpoint, a run of another architecture (any ModelConfig field, the prediction
target, the trained text encoder's settings), a distillation run on either side (distil a run
with `distill.teacher=<its workdir>` instead), and LoRA on both sides (see `check_lora`).

LoRA: a previous LoRA run's adapters are merged into its base weights (the model it trained).
A LoRA run started from a previous full run trains adapters over that run's weights; its
checkpoints hold the adapters only, so every build of it (a resume, evaluation, sampling)
re-reads the base from `init.path`, which must stay in place, and its `lora.safetensors`
applies to those weights, not to the official base (`lora.export_merged` writes the whole model).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import ml_collections
from flax import nnx

from magi_jax.configs import ConfigError
from magi_jax.train.checkpoint import RUN_FILE, Checkpointer

TEXT_FIELDS = ("kind", "width", "layers", "heads", "max_length")   # a trained text encoder's


def starts_from_run(c) -> bool:
  return c.init.kind == "run"


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint of its own (its run then resumes from it)."""
  ckdir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckdir):
    return False
  ckpt = Checkpointer(ckdir)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()


def check_start(c, workdir: str, echo=print) -> bool:
  """Whether this run starts from the weights of the run at `config.init.path` now: init.kind
  'run' and no checkpoint of its own in `workdir` (a workdir with checkpoints resumes them,
  said in one line). The refusals of the module doc come here, before any work."""
  if not starts_from_run(c):
    return False
  fresh = not has_checkpoint(workdir)
  if fresh or c.lora.rank:              # a LoRA run reads its base at every start
    prev = previous_config(c)
    check_lora(c, prev)
    check_architecture(c, prev)
  if not fresh:
    role = ("is read for the frozen LoRA base only" if c.lora.rank else
            "starts a new run only")
    echo(f"{workdir} holds checkpoints of its own: resuming them (config.init.path="
         f"{c.init.path!r} {role})")
  return fresh


def previous_config(c) -> ml_collections.ConfigDict:
  """The config of the run at `config.init.path` (its checkpoints/run.json)."""
  where = c.init.path
  if not where:
    raise ConfigError("config.init.kind='run' needs config.init.path: the workdir of the run "
                      "whose weights start this one")
  ckdir = os.path.join(where, "checkpoints")
  if not os.path.isfile(os.path.join(ckdir, RUN_FILE)):
    raise ConfigError(f"config.init.path={where!r} is not a training run directory (no "
                      f"checkpoints/{RUN_FILE}); init.kind='run' starts from a previous run's "
                      "workdir (init.kind='official' / 'converted' read weight directories)")
  if not any(name.isdigit() for name in os.listdir(ckdir)):
    raise ConfigError(f"config.init.path={where!r} holds no checkpoint yet (the run saved none)")
  return ml_collections.ConfigDict(Checkpointer.read_run(ckdir)["config"])


def check_lora(c, prev) -> None:
  """LoRA on both sides is refused: the previous adapters would be merged into the base and
  this run's adapters would hold only the change from that, a file that applies to no base
  on disk, when the intent is usually to continue the same adapters (resume that run with a
  larger total_steps instead, or train this run without LoRA)."""
  if c.lora.rank and prev.lora.rank:
    raise ConfigError(f"config.lora.rank={c.lora.rank} with config.init.path={c.init.path!r}, "
                      f"itself a LoRA run (lora.rank={prev.lora.rank}): new adapters over merged "
                      "ones would hold only the change from them. Continue that run's adapters "
                      "by resuming it (a larger total_steps), or start a full run (lora.rank=0) "
                      "from it")


def check_not_distilling(c) -> None:
  from magi_jax.train.build import distilling
  if distilling(c):
    raise ConfigError(f"config.init.kind='run' with config.distill.teacher="
                      f"{c.distill.teacher!r}: to distil a previous run set "
                      f"config.distill.teacher={c.init.path!r} (and init.kind='random'); the "
                      "student starts from its teacher")


def check_architecture(c, prev) -> None:
  """The previous run has this config's architecture (each differing field named)."""
  from magi_jax.train.build import distilling, model_config
  where = c.init.path
  check_not_distilling(c)
  if distilling(prev):
    raise ConfigError(f"config.init.path={where!r} is a distillation run (a shortcut student); "
                      "init.kind='run' starts a base run from a base run")
  mine, theirs = dataclasses.asdict(model_config(c)), dataclasses.asdict(model_config(prev))
  diff = [(k, mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]]
  if c.model.prediction != prev.model.prediction:
    diff.append(("prediction (config.model.prediction)", c.model.prediction,
                 prev.model.prediction))
  if _has_text(c) and _has_text(prev):
    diff += [(f"text.{k}", c.text[k], prev.text[k]) for k in TEXT_FIELDS
             if c.text[k] != prev.text[k]]
  if diff:
    shown = "; ".join(f"{k} is {a!r} here, {b!r} in the run" for k, a, b in diff)
    raise ConfigError(f"config.init.path={where!r} is a run of another architecture: {shown}. A "
                      "run continues a previous run's weights only with its architecture "
                      "(config.model.preset / model.overrides, text.*)")


def _has_text(c) -> bool:
  return c.text.kind != "precomputed"


def previous_weights(c, echo=print):
  """(DiT Param state, text-encoder Param state or None) of the latest checkpoint of the run at
  `config.init.path`: EMA weights with `init.use_ema` when it kept an EMA, LoRA adapters
  merged; the text encoder only when both runs train one. Checked first (see the module doc)."""
  from magi_jax.train.trainer import load_trained
  prev = previous_config(c)
  check_lora(c, prev)
  check_architecture(c, prev)
  use_ema = bool(c.init.get("use_ema", True))
  _, model, _, step = load_trained(c.init.path, use_ema=use_ema)
  dit = model.dit
  if prev.lora.rank:
    from magi_jax.train.lora import merge_lora
    dit = merge_lora(dit)
  text = None
  if model.text_encoder is not None and _has_text(c):
    text = nnx.state(model.text_encoder, nnx.Param)
  which = "EMA" if use_ema and prev.ema_decay > 0 else "raw"
  parts = "DiT" + (" and text encoder" if text is not None else "")
  if _has_text(c) and text is None:
    parts += f" (the text encoder starts from random: {c.init.path} has none)"
  echo(f"init: {parts} weights ({which}) of the run {c.init.path} at step {step}")
  return nnx.state(dit, nnx.Param), text


def assign(module, weights, *, cast: bool) -> None:
  """`weights` into `module`'s parameters; `cast` rounds them to the module's own dtypes
  (frozen weights compute as stored), else they keep theirs (float32 masters of a trained run,
  which the trainer casts per step)."""
  target = nnx.state(module, nnx.Param)
  have, got = dict(nnx.to_flat_state(target)), dict(nnx.to_flat_state(weights))
  odd = sorted(map(str, set(have) ^ set(got)))
  odd += [str(k) for k in sorted(set(have) & set(got), key=str)
          if have[k].get_value().shape != got[k].get_value().shape]
  if odd:
    raise ConfigError(f"the parameters of the run at config.init.path do not match this "
                      f"{type(module).__name__}'s (paths {odd[:5]})")
  for path, var in have.items():
    w = got[path].get_value()
    var.set_value(jnp.asarray(w, var.get_value().dtype) if cast else jnp.asarray(w))
  nnx.update(module, target)


def start_from_run(c, model, echo=print) -> None:
  """A new full-training run's start: the previous run's weights into `model` (TrainModel).
  (A LoRA run's base is loaded by `build.build_model` at every build.)"""
  dit, text = previous_weights(c, echo)
  assign(model.dit, dit, cast=False)
  if text is not None and model.text_encoder is not None:
    assign(model.text_encoder, text, cast=False)
