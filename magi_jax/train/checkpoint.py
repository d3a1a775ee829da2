"""Checkpoints of a training run: orbax CheckpointManager over (train state, data iterator).

Layout under `<workdir>/checkpoints/<step>/`: `state` (the TrainState pytree: masters,
optimizer, EMA, step, key, non-finite streak) and `data` (the grain iterator's position, one
file per process), plus `<workdir>/checkpoints/run.json`, what the run was (config, model, text
tokenizer) so evaluation and resume can rebuild it. Saves are asynchronous and commit
atomically: a run killed mid-save leaves the previous checkpoint as the latest one, and
restoring it gives the bitwise state of that step (tests/test_train_resume.py).
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from magi_jax.errors import MagiError

RUN_FILE = "run.json"


class CheckpointError(MagiError, RuntimeError):
  """A checkpoint is missing, unreadable or does not match this run."""


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, every: int = 1000,
               async_save: bool = True):
    if keep < 1 or every < 1:
      raise ValueError(f"checkpoint keep ({keep}) and every ({every}) must be >= 1")
    self.directory = os.path.abspath(directory)
    self.every = every
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
    """Saves when `step` is a multiple of `every` (or `force`); returns whether it saved."""
    if not force and step % self.every:
      return False
    if step in self.manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """The state at `step` (default: latest); also moves `data_iterator` to its position."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this run's "
                            f"state: {e}") from e
    return out["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
