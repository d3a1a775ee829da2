"""Preemption and failure: kill -9 and resume is bitwise, SIGTERM saves, NaNs stop cleanly.

The runs are the `:smoke` config of the demo (a 1-layer model on a tiny bouncing world)
through the real command line, so they also cover `experiments.train` end to end.
"""

import json
import os
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import bouncing_tiny
from magi_jax.train.trainer import TrainingError, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 3
KILLS, PER_CHAIN = 10, 3

pytestmark = pytest.mark.usefixtures("compile_cache")


def _cmd(workdir, data_dir):
  return [sys.executable, "-m", "experiments.train",
          "--config=experiments/configs/bouncing_tiny.py:smoke", f"--workdir={workdir}",
          f"--config.total_steps={STEPS}", f"--config.checkpoint_every={EVERY}",
          "--config.log_every=1", f"--config.data.data_dir={data_dir}"]


def _env(compile_cache):
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compile_cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")


def _run_until(cmd, env, marker, sig):
  """Runs cmd, sends `sig` when a stdout line starts with `marker`; returns (rc, output)."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  out = []
  sent = False
  for line in proc.stdout:
    out.append(line)
    if not sent and line.startswith(marker):
      proc.send_signal(sig)
      sent = True
  proc.wait(timeout=300)
  assert sent, "".join(out[-30:])
  return proc.returncode, "".join(out)


def _final_state(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    step = m.latest_step()
    state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return step, state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compile_cache):
  base = tmp_path_factory.mktemp("resume")
  workdir, data_dir = base / "straight", base / "tfds"
  proc = subprocess.run(_cmd(workdir, data_dir), cwd=REPO, env=_env(compile_cache),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f"step {STEPS}/{STEPS}" in proc.stdout
  return base, _final_state(workdir)


def _kill_after(cmd, env, step, delay):
  """Runs cmd and kills it (SIGKILL) `delay` seconds after its log line of `step`, or after its
  first line of output when `step` is None (start-up: data, restore, compile); returns
  (rc, output). rc is 0 when the run finished before the kill came."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  out, timer = [], None
  for line in proc.stdout:
    out.append(line)
    if timer is None and (step is None or line.startswith(f"step {step}/")):
      timer = threading.Timer(delay, proc.kill)
      timer.start()
  proc.wait(timeout=300)
  if timer is not None:
    timer.cancel()
  return proc.returncode, "".join(out)


def _committed(workdir):
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return None
  with ocp.CheckpointManager(path) as m:
    return m.latest_step()


def _assert_final_is(workdir, want):
  got_step, got = _final_state(workdir)
  assert got_step == STEPS
  leaves_w = jax.tree_util.tree_leaves_with_path(want)
  leaves_g = jax.tree_util.tree_leaves_with_path(got)
  assert [p for p, _ in leaves_w] == [p for p, _ in leaves_g]
  for (path, a), (_, b) in zip(leaves_w, leaves_g):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line)["step"] for line in f]
  assert logged == list(range(1, STEPS + 1))          # each step once, after every resume


def test_kill_9_at_ten_random_moments_resumes_bitwise_and_loses_at_most_one_interval(
    uninterrupted, compile_cache):
  """SIGKILL at KILLS moments drawn from a seeded generator (MAGI_FAULT_SEED picks another
  draw): a random delay after the log line of a random step the run has still to do, or after
  its first output line (start-up). Workdirs take PER_CHAIN kills each, so the moments spread
  over the whole run. Sync and async saves alternate. After each kill the newest committed
  checkpoint is at most one interval behind the last logged step (synchronous saves: under
  `EVERY`; an asynchronous save in flight: under 2·EVERY) and the next run resumes from exactly
  it; every workdir, run to the end, holds the uninterrupted run's state bitwise with each step
  logged once."""
  base, (step, want) = uninterrupted
  assert step == STEPS
  seed = int(os.environ.get("MAGI_FAULT_SEED", "0"))
  rng = np.random.default_rng(seed)
  env = _env(compile_cache)
  moments, chain = [], 0

  def finish(workdir, resumed):
    rc, out = _kill_after(_cmd(workdir, base / "tfds"), env, STEPS + 1, 0.0)   # no kill
    assert rc == 0, out[-3000:]
    assert resumed is None or f"resumed from {workdir / 'checkpoints'}/{resumed} " in out, out
    _assert_final_is(workdir, want)

  while len(moments) < KILLS:
    workdir, resumed, kills = base / f"chain_{chain}", None, 0
    chain += 1
    while kills < PER_CHAIN and len(moments) < KILLS:
      async_save = len(moments) % 2 == 1
      first = (resumed or 0) + 1
      at = int(rng.integers(first - 1, STEPS + 1))          # first - 1: at start-up
      at = None if at < first else at
      delay = float(rng.uniform(0.0, 0.5))
      cmd = _cmd(workdir, base / "tfds") + [f"--config.async_checkpoints={async_save}"]
      rc, out = _kill_after(cmd, env, at, delay)
      what = (f"seed {seed}, kill {len(moments) + 1}: {delay * 1000:.0f} ms after "
              f"{'start-up' if at is None else f'step {at}'} ({'a' if async_save else ''}sync "
              f"saves)\n{out[-1500:]}")
      if resumed is not None and "resumed from" in out:
        assert f"resumed from {workdir / 'checkpoints'}/{resumed} " in out, what
      if rc == 0:                                   # the kill came after the run had ended
        _assert_final_is(workdir, want)
        break
      assert rc == -signal.SIGKILL, what
      logged = [int(line.split()[1].split("/")[0]) for line in out.splitlines()
                if line.startswith("step ") and "/" in line.split()[1]]
      saved = _committed(workdir)
      reached = max(logged, default=resumed or 0)
      interval = 2 * EVERY if async_save else EVERY
      assert reached - (saved or 0) < interval, (saved, what)   # at most one interval lost
      assert saved is None or resumed is None or saved >= resumed, what
      moments.append((at, async_save, reached, saved))
      resumed, kills = saved, kills + 1
    else:
      finish(workdir, resumed)
  if seed == 0:        # the default draw covers the moments the suite promises
    assert any(a is None for a, *_ in moments), moments                  # start-up
    assert any(a is not None and 1 < a < STEPS for a, *_ in moments), moments   # mid-run
    assert any(a == STEPS for a, *_ in moments), moments                 # the final save
    assert any(asy for _, asy, *_ in moments), moments                   # an async run



def test_sigterm_saves_the_current_step_and_exits(uninterrupted, compile_cache):
  base, _ = uninterrupted
  workdir = base / "term"
  rc, out = _run_until(_cmd(workdir, base / "tfds"), _env(compile_cache), "step 4/",
                       signal.SIGTERM)
  assert rc == 0, out[-2000:]
  line = [l for l in out.splitlines() if l.startswith("SIGTERM: saved checkpoint")]
  assert line, out[-2000:]
  step = int(line[0].split()[3])
  assert 4 <= step < STEPS
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    assert m.latest_step() == step


def test_repeated_nans_stop_with_the_last_good_checkpoint(tmp_path, monkeypatch):
  """The loop reads metrics only at log and checkpoint steps (here every 2 steps: the log
  interval is longer than the run); the on-device streak reaches 3 at step 5, is read at step
  6, and the run stops there without writing checkpoint 6."""
  import magi_jax.train.trainer as trainer_module
  c = bouncing_tiny.get_config("smoke")
  c.total_steps, c.checkpoint_every, c.max_consecutive_nans = 10, 2, 3
  c.log_every = 100
  c.tensorboard = False
  reads = []
  fetch = trainer_module.fetch_metrics
  monkeypatch.setattr(trainer_module, "fetch_metrics",
                      lambda pending: reads.append(len(pending)) or fetch(pending))
  c.async_checkpoints = False
  from magi_jax.proj.bouncing.training import world_config
  from magi_jax.train import build
  tok = build.tokenizer_for(c)
  world = world_config(c)
  K, T = c.data.bin_chunks, c.data.bin_chunks * world.frames_per_chunk
  ids, mask = tok(["a red ball; the red ball flies"] * (2 * K))
  rng = np.random.default_rng(0)

  def batches():
    for i in range(100):
      # "latents" as the prepared data carries them: (B, T, h, w, C), time first
      x = rng.normal(size=(2, T, world.height, world.width, 3)).astype(np.float32)
      if i >= 2:
        x[0, 0, 0, 0, 0] = np.nan                              # poisoned from step 3 on
      yield {"latents": x, "segment_ids": np.ones((2, K), np.int32),
             "text_tokens": ids.reshape(2, K, -1), "text_mask": mask.reshape(2, K, -1)}

  lines = []
  with pytest.raises(TrainingError, match=r"3 consecutive non-finite steps \(last at step 5; "
                                           r"the run had reached step 6"):
    train(c, str(tmp_path), data=batches(), echo=lines.append)
  assert sum("update skipped" in l for l in lines) == 3
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [(r["step"], r["skipped_steps"]) for r in rows] == [(5, 3)]   # visible in the metrics
  assert reads == [2, 2, 2]                                    # steps 1-2, 3-4, 5-6
  with ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints")) as m:
    steps = m.all_steps()
    s2 = m.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    s4 = m.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  assert sorted(steps) == [2, 4]
  assert int(s2["nan_streak"]) == 0 and int(s4["nan_streak"]) == 2   # checkpointed with the state
  for a, b in zip(jax.tree.leaves(s2["params"]), jax.tree.leaves(s4["params"])):
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)                        # NaN steps changed nothing


def test_a_run_saved_before_a_field_existed_resumes_at_that_fields_former_value():
  from magi_jax.train.resume import ADDED_FIELDS, differences
  old = {"data": {"kind": "bouncing"}, "init": {"kind": "random"}}
  now = {"data": {"kind": "bouncing", "prepared_dir": "", "buckets": (), "image_ratio": 0.0,
                  "val_fraction": 0.0},
         "init": {"kind": "random", "use_ema": True},
         "validation": {"every": 0, "batches": 4}}
  assert differences(old, now) == []
  now["data"]["image_ratio"] = 4.0                 # a new field set to something else: differs
  assert differences(old, now) == [("data.image_ratio", "<absent>", 4.0)]
  assert set(ADDED_FIELDS) >= {"data.prepared_dir", "init.use_ema", "validation.every"}
