"""Checkpoints of a training run: orbax CheckpointManager over (train state, data iterator).

Layout under `<workdir>/checkpoints/<step>/`: `state` (the TrainState pytree: masters,
optimizer, EMA, step, key, non-finite streak) and `data` (the grain iterator's position, one
file per process), plus `<workdir>/checkpoints/run.json`, what the run was (config, model, text
tokenizer) so evaluation and resume can rebuild it, and `fingerprints.json` (each saved
state's per-leaf sums). Saves commit atomically: a run killed mid-save leaves the previous
checkpoint as the latest one, and restoring it gives the bitwise state of that step
(tests/test_train_resume.py).

Recovery (tests/test_checkpoint_faults.py):
* `restore_newest_intact`: a resume tries the steps newest first; one that does not restore
  (truncated, corrupt or missing files, a broken metadata file, values whose fingerprint is not
  the saved one) is reported in one line and moved aside to `<workdir>/checkpoints.corrupt/
  <step>` (never deleted); when none restores, nothing moves and the error lists every step's
  reason.
* How much a crash can cost: with synchronous saves (`async_save=False`, the trainer's default)
  the save of step k has committed when `save` returns, so a crash at any moment loses at most
  `every` steps. Asynchronous saves write while the next steps run; orbax waits for a save
  before it starts the next, so a crash loses at most 2·every - 1 steps. `committed_step()` is
  the newest finished save (the trainer's log lines print it).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import shutil
import sys
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from magi_jax.errors import MagiError

RUN_FILE = "run.json"
CORRUPT_SUFFIX = ".corrupt"      # <checkpoints>.corrupt/<step>: checkpoints that did not restore
FINGERPRINTS = "fingerprints.json"   # per step: each float leaf's sum and sum of squares
FINGERPRINT_RTOL = 1e-4          # a restore on another mesh may reduce in another order


class CheckpointError(MagiError, RuntimeError):
  """A checkpoint is missing, unreadable or does not match this run."""


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, every: int = 1000,
               async_save: bool = False):
    if keep < 1 or every < 1:
      raise ValueError(f"checkpoint keep ({keep}) and every ({every}) must be >= 1")
    self.directory = os.path.abspath(directory)
    self.every = every
    self.in_flight: int | None = None       # the step of an asynchronous save not yet waited for
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save,
                                             create=True))

  # ------------------------------------------------------------------ run description
  def write_run(self, info: dict) -> None:
    if jax.process_index() != 0:
      return
    path = os.path.join(self.directory, RUN_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
    os.replace(tmp, path)

  @staticmethod
  def read_run(directory: str) -> dict:
    path = os.path.join(directory, RUN_FILE)
    if not os.path.exists(path):
      raise CheckpointError(f"{path}: no run description; is {directory} a training "
                            "checkpoint directory (<workdir>/checkpoints)?")
    with open(path) as f:
      try:
        return json.load(f)
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt run description ({e})") from e

  # ------------------------------------------------------------------ save / restore
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Saves when `step` is a multiple of `every` (or `force`); returns whether it saved.
    The state's fingerprint goes to `FINGERPRINTS` (restores compare against it)."""
    if not force and step % self.every:
      return False
    if step in self.manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except OSError as e:
      self._save_failed(step, e)
    if saved:
      self.in_flight = step
      self._write_fingerprint(step, fingerprint(state))
    return saved

  def _save_failed(self, step: int, e: OSError):
    """A save that could not be written (a full disk, a lost mount): the run stops with the
    reason and the newest committed checkpoint, which the failed save did not touch."""
    space = " (no space left on device)" if e.errno == errno.ENOSPC else ""
    good = [s for s in self.manager.all_steps() if s != step]
    last = (f"the newest checkpoint, step {max(good)}, is intact and the rerun resumes from it"
            if good else "there is no earlier checkpoint")
    raise CheckpointError(f"saving checkpoint {step} to {self.directory} failed{space}: "
                          f"{failure_reason(e)}; {last}") from e

  def committed_step(self) -> int | None:
    """The newest step whose save has finished (an asynchronous one still writing excluded)."""
    steps = sorted(self.manager.all_steps())
    if self.in_flight is not None and self.manager.is_saving_in_progress():
      steps = [s for s in steps if s != self.in_flight]
    return steps[-1] if steps else None

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """The state at `step` (default: latest); also moves `data_iterator` to its position.
    A step that does not restore raises one CheckpointError naming it, the reason and the
    steps that do restore (for `--step`)."""
    steps = self.manager.all_steps()
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in steps:
      raise CheckpointError(f"no checkpoint step {step} in {self.directory}; it holds steps "
                            f"{sorted(steps)}")
    try:
      return self._restore_step(step, abstract_state, data_iterator)
    except Exception as e:            # noqa: BLE001 - orbax / TensorStore / grain read errors
      good = self.steps_that_restore(abstract_state, skip=(step,))
      offer = (f"steps that restore: {', '.join(map(str, good))} (pass --step={good[0]})"
               if good else "no step of this run restores")
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not restore "
                            f"({failure_reason(e)}); {offer}") from None

  def restore_newest_intact(self, abstract_state, data_iterator=None, echo=print):
    """(state, step) of the newest checkpoint that restores, or (None, None) when there is none.

    Newer steps that fail are reported in one line each and moved aside (`CORRUPT_SUFFIX`);
    when every step fails nothing moves and a CheckpointError lists the steps and reasons."""
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self._restore_step(step, abstract_state, data_iterator)
      except Exception as e:          # noqa: BLE001 - any failure to read is this step's fault
        failed.append((step, failure_reason(e)))
        continue
      for bad, reason in failed:
        where = self.move_aside(bad)
        echo(f"checkpoint step {bad} in {self.directory} does not restore ({reason}); moved it "
             f"to {where}; resuming from step {step}")
      return state, step
    if failed:
      raise CheckpointError(f"no checkpoint in {self.directory} restores: " + "; ".join(
          f"step {s}: {r}" for s, r in failed) + ". Nothing was moved; start a new --workdir "
          "or move the checkpoints away")
    return None, None

  def steps_that_restore(self, abstract_state, skip=()) -> list[int]:
    """The steps (newest first, `skip` left out) whose state restores into `abstract_state`."""
    good = []
    for step in sorted(set(self.manager.all_steps()) - set(skip), reverse=True):
      try:
        self._restore_step(step, abstract_state, None)
      except Exception:               # noqa: BLE001
        continue
      good.append(step)
    return good

  def _restore_step(self, step, abstract_state, data_iterator):
    """Restores `step` (quietly) and checks the values against the saved fingerprint."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    with quiet_read_failures():
      state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    want = self._fingerprints().get(str(step))
    if want is not None:
      bad = fingerprint_mismatch(fingerprint(state), want)
      if bad:
        raise CheckpointError(f"the values of {bad} differ from those saved (fingerprint): "
                              "corrupt data")
    return state

  # ------------------------------------------------------------------ fingerprints
  def _fingerprint_path(self) -> str:
    return os.path.join(self.directory, FINGERPRINTS)

  def _fingerprints(self) -> dict:
    try:
      with open(self._fingerprint_path()) as f:
        return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
      return {}                       # none saved (an older run) or torn: no check

  def _write_fingerprint(self, step: int, fp: dict) -> None:
    if jax.process_index() != 0:
      return
    keep = {str(s) for s in self.manager.all_steps()} | {str(step)}
    table = {k: v for k, v in self._fingerprints().items() if k in keep}
    table[str(step)] = fp
    tmp = self._fingerprint_path() + ".tmp"
    with open(tmp, "w") as f:
      json.dump(table, f)
    os.replace(tmp, self._fingerprint_path())

  def move_aside(self, step: int) -> str:
    """Moves checkpoint `step` to <checkpoints>.corrupt/<step> (a numbered name when taken).
    In a multi-host run process 0 moves it (the checkpoint directory is shared) and every
    process waits for it before reading the directory again."""
    src = os.path.join(self.directory, str(step))
    root = self.directory + CORRUPT_SUFFIX
    dst, n = os.path.join(root, str(step)), 1
    while os.path.exists(dst):
      dst, n = os.path.join(root, f"{step}.{n}"), n + 1
    if jax.process_index() == 0:
      os.makedirs(root, exist_ok=True)
      shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"magi_jax checkpoint {step} moved aside")
    self.manager.reload()
    return dst

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except OSError as e:              # an asynchronous save that could not be written
      step, self.in_flight = self.in_flight, None
      self._save_failed(step, e)
    self.in_flight = None

  def close(self) -> None:
    self.manager.close()


def fingerprint(state) -> dict[str, list[float]]:
  """Each floating-point leaf's (sum, sum of squares) in f32, by its path: a cheap check that
  restored values are the saved ones (flipped bytes in a compressed shard can decode without
  an error). One jitted reduction; the arrays stay where they are."""
  leaves = [(jax.tree_util.keystr(p), x) for p, x in
            jax.tree_util.tree_flatten_with_path(state)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return {}
  sums = np.asarray(_sums(tuple(x for _, x in leaves)))
  return {name: [float(a), float(b)] for (name, _), (a, b) in zip(leaves, sums)}


@jax.jit
def _sums(xs):
  return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)),
                               jnp.sum(jnp.square(x.astype(jnp.float32)))]) for x in xs])


def fingerprint_mismatch(got: dict, want: dict) -> str | None:
  """The first leaf whose fingerprint differs beyond FINGERPRINT_RTOL (or is missing)."""
  for name, w in want.items():
    g = got.get(name)
    if g is None:
      return name
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    scale = np.maximum(np.abs(w), np.abs(g)) + 1e-6
    if not (np.all(np.isfinite(g)) == np.all(np.isfinite(w))
            and np.all(np.abs(g - w) <= FINGERPRINT_RTOL * scale)):
      return name
  return None


def failure_reason(e: BaseException, limit: int = 240) -> str:
  """One line: the innermost cause's type and the first line of its message, shortened (orbax
  wraps TensorStore's reason, e.g. 'Truncated Zstd-compressed stream', in long messages)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip().splitlines()
  line = f"{type(e).__name__}: {text[0] if text else ''}".strip()
  return line if len(line) <= limit else line[:limit - 3] + "..."


@contextlib.contextmanager
def quiet_read_failures():
  """While a damaged checkpoint is read: orbax's abandoned read tasks log every failure again
  from its event loop (asyncio's logger, unraisable-exception and thread hooks); the one-line
  report is ours."""
  log = logging.getLogger("asyncio")
  level, unraisable, thread_hook = log.level, sys.unraisablehook, threading.excepthook
  log.setLevel(logging.CRITICAL)
  sys.unraisablehook = lambda *_: None
  threading.excepthook = lambda *_: None
  try:
    yield
  finally:
    gc.collect()                      # the abandoned futures report when collected: now
    log.setLevel(level)
    sys.unraisablehook, threading.excepthook = unraisable, thread_hook
