"""Damaged checkpoints and reused workdirs (magi_jax/train/checkpoint.py, train/resume.py).

One `:smoke` run (6 steps, a checkpoint every 2) is the source; each test damages a copy:
* each kind of damage to the latest checkpoint (truncated array file, flipped bytes, a deleted
  shard, broken metadata, a broken OCDBT manifest, a corrupt data-iterator file) makes
  `load_trained` name the step, the reason and the steps that restore, in one message;
* a resume moves the damaged checkpoint aside (`checkpoints.corrupt/6`), says so in one line,
  retrains from step 4 to the uninterrupted run's state bitwise, and metrics.jsonl /
  TensorBoard hold every step once;
* when no checkpoint restores nothing is moved;
* a workdir of another config is refused before any work, naming the differing fields;
  `config.resume=changed` and run-control fields (total_steps, ...) pass;
* a save that fails with ENOSPC stops the run naming the intact checkpoint, which resumes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest

from experiments.configs import bouncing_tiny
from magi_jax.configs import ConfigError
from magi_jax.train.checkpoint import CheckpointError
from magi_jax.train.resume import check_resume, differences
from magi_jax.train.trainer import load_trained, train

pytestmark = pytest.mark.usefixtures("compile_cache")

STEPS, EVERY = 6, 2


def _config(data_dir):
  c = bouncing_tiny.get_config("smoke")
  c.total_steps, c.checkpoint_every, c.log_every = STEPS, EVERY, 1
  c.data.data_dir = str(data_dir)
  return c


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  base = tmp_path_factory.mktemp("faults")
  c = _config(base / "tfds")
  workdir = base / "run"
  result = train(c, str(workdir), echo=lambda *_: None)
  return dict(base=base, c=c, workdir=workdir, state=jax.device_get(result.state))


def _copy(source, name):
  dst = source["base"] / name
  shutil.copytree(source["workdir"], dst)
  return dst


def _array_files(workdir, step):
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0",
                                 "d", "*"))
  assert files
  return sorted(files, key=os.path.getsize)


def _truncate(w, step):
  f = _array_files(w, step)[-1]
  with open(f, "r+b") as h:
    h.truncate(os.path.getsize(f) // 2)


def _flip(w, step):
  f = _array_files(w, step)[-1]
  with open(f, "r+b") as h:
    h.seek(os.path.getsize(f) // 2)
    b = h.read(64)
    h.seek(os.path.getsize(f) // 2)
    h.write(bytes(x ^ 0xFF for x in b))


def _delete(w, step):
  os.remove(_array_files(w, step)[-1])


def _metadata(w, step):
  with open(os.path.join(w, "checkpoints", str(step), "state", "_METADATA"), "w") as f:
    f.write("{not json")


def _manifest(w, step):
  with open(os.path.join(w, "checkpoints", str(step), "state", "manifest.ocdbt"), "wb") as f:
    f.write(b"\0" * 10)


def _data(w, step):
  (path,) = glob.glob(os.path.join(w, "checkpoints", str(step), "data", "process_*.json"))
  with open(path, "w") as f:
    f.write("garbage")


STATE_DAMAGE = {"truncate": _truncate, "flip": _flip, "delete": _delete, "metadata": _metadata,
                "manifest": _manifest}


def _assert_bitwise(got, want):
  lw, lg = (jax.tree_util.tree_leaves_with_path(t) for t in (want, got))
  assert [p for p, _ in lw] == [p for p, _ in lg]
  for (path, a), (_, b) in zip(lw, lg):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


@pytest.mark.parametrize("kind", sorted(STATE_DAMAGE))
def test_evaluation_names_the_damaged_step_and_the_good_ones(source, kind):
  w = _copy(source, f"eval_{kind}")
  STATE_DAMAGE[kind](w, STEPS)
  with pytest.raises(CheckpointError) as e:
    load_trained(str(w))
  msg = str(e.value)
  assert f"checkpoint step {STEPS} in" in msg and "does not restore (" in msg, msg
  assert "steps that restore: 4, 2 (pass --step=4)" in msg, msg
  assert "\n" not in msg and len(msg) < 800, msg
  _, _, _, step = load_trained(str(w), step=4)
  assert step == 4


@pytest.mark.parametrize("kind", ["flip", "truncate", "data"])
def test_a_resume_moves_the_damaged_checkpoint_aside(source, kind):
  w = _copy(source, f"resume_{kind}")
  (STATE_DAMAGE | {"data": _data})[kind](w, STEPS)
  lines = []
  result = train(source["c"], str(w), echo=lines.append)
  moved = [line for line in lines if line.startswith(f"checkpoint step {STEPS} in")]
  assert len(moved) == 1, lines
  assert "does not restore (" in moved[0] and "resuming from step 4" in moved[0], moved
  assert os.path.isdir(os.path.join(str(w) + "/checkpoints.corrupt", str(STEPS)))
  assert any(line.startswith("resumed from") and line.endswith("(step 4)") for line in lines)
  assert result.step == STEPS
  _assert_bitwise(jax.device_get(result.state), source["state"])
  with open(w / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, STEPS + 1))
  assert _purge_steps(w / "tensorboard") == [1, 5]     # the first run's, then the resume's


def _purge_steps(logdir):
  """Steps of the SessionLog START events of TensorBoard's event files (tensorboardX writes one
  at `purge_step`: TensorBoard then drops that file's earlier points from that step on)."""
  from tensorboardX.proto import event_pb2
  steps = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.*"))):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
        steps.append(ev.step)
  return steps


def test_nothing_moves_when_no_checkpoint_restores(source):
  w = _copy(source, "all_bad")
  for step in (2, 4, 6):
    _truncate(w, step)
  with pytest.raises(CheckpointError, match="no checkpoint in .* restores: step 6: .*; step 4: "
                                            ".*; step 2: .*Nothing was moved"):
    train(source["c"], str(w), echo=lambda *_: None)
  assert sorted(os.listdir(w / "checkpoints")) == ["2", "4", "6", "fingerprints.json",
                                                   "run.json"]
  assert not os.path.exists(str(w) + "/checkpoints.corrupt")


def test_a_workdir_of_another_config_is_refused_before_any_work(source, monkeypatch):
  w = _copy(source, "other_config")
  c = _config(source["base"] / "tfds")
  c.model.overrides = dict(c.model.overrides, hidden_size=96)
  c.optim.lr = 5e-4

  import magi_jax.train.trainer as trainer_module

  def no_work(*a, **k):
    raise AssertionError("the run started work before refusing the workdir")
  monkeypatch.setattr(trainer_module, "evaluators", no_work)
  with pytest.raises(ConfigError) as e:
    train(c, str(w), echo=lambda *_: None)
  msg = str(e.value)
  assert msg.startswith(f"{w} holds a run of a different config: ")
  assert "model.overrides.hidden_size: 64 in the run, 96 now" in msg
  assert "optim.lr: 0.001 in the run, 0.0005 now" in msg
  assert "--config.resume=changed" in msg


def test_run_control_fields_and_resume_changed_pass_the_check(source):
  w = source["workdir"]
  c = _config(source["base"] / "tfds")
  c.total_steps, c.log_every, c.sample.num_steps, c.checkpoint_every = 60, 10, 8, 20
  check_resume(c, str(w))                       # run control only: no error
  c.optim.lr = 5e-4
  with pytest.raises(ConfigError, match="optim.lr"):
    check_resume(c, str(w))
  c.resume = "changed"
  said = []
  check_resume(c, str(w), echo=said.append)
  assert len(said) == 1 and "optim.lr: 0.001 in the run, 0.0005 now" in said[0]
  c.resume = "maybe"
  with pytest.raises(ConfigError, match="config.resume='maybe'"):
    check_resume(c, str(w))


def test_differences_name_fields_only_one_side_has():
  assert differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 1}, "d": (1, 2)}) == [
      ("c", 2, "<absent>"), ("d", "<absent>", [1, 2])]


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(source, monkeypatch,
                                                                     tmp_path):
  """ENOSPC injected where the trainer calls orbax (the 4th step's save): the run stops with
  the reason and the intact checkpoint, which resumes."""
  import errno

  import orbax.checkpoint as ocp
  c = _config(source["base"] / "tfds")
  real = ocp.CheckpointManager.save

  def save(self, step, *a, **k):
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, step, *a, **k)
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  w = tmp_path / "full"
  with pytest.raises(CheckpointError, match=r"saving checkpoint 4 to .* failed \(no space left "
                                            r"on device\): OSError: .*No space left on device; "
                                            r"the newest checkpoint, step 2, is intact"):
    train(c, str(w), echo=lambda *_: None)
  monkeypatch.setattr(ocp.CheckpointManager, "save", real)
  lines = []
  result = train(c, str(w), echo=lines.append)
  assert any(line.startswith("resumed from") and line.endswith("(step 2)") for line in lines)
  _assert_bitwise(jax.device_get(result.state), source["state"])
