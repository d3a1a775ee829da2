"""MAGI-1's training stages (experiments/configs/magi_4p5b_stage{1,2,3}.py): each stage is a new
run that starts from the previous stage's final weights (`init.kind = "run"`).

A folder of moving squares is prepared once (`prepare_from_config`, the stage-1 smoke config),
then stage 1 -> 2 -> 3 train on it in-process (`:smoke`). Checked: each stage's first update has
learning rate 0 (the warm-up starts there), so its step-1 checkpoint holds the weights it
started from, and those are the previous stage's final EMA weights bit for bit (not its raw
ones, not a random init); a rerun of a stage in its own workdir resumes its checkpoints even
with the previous stage's workdir gone; a run of another architecture, a directory that is not
a run, distillation and LoRA on both sides are refused; a LoRA run over a stage has that stage
as its base. The full-size configs hold the report's values (without building the 4.5B DiT).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from magi_jax.configs import ConfigError
from magi_jax.media.write import write_video
from magi_jax.train import build, stages
from magi_jax.train.optim import learning_rate
from magi_jax.train.prepare import prepare_from_config
from magi_jax.train.trainer import load_trained, train
from test_train_video_folder import moving_square

pytestmark = pytest.mark.usefixtures("compile_cache")

quiet = lambda s: None


def stage_config(n: int, arg=None):
  return importlib.import_module(f"experiments.configs.magi_4p5b_stage{n}").get_config(arg)


def smoke(n: int, prepared: str, init_path: str = ""):
  c = stage_config(n, "smoke")
  c.data.prepared_dir = prepared
  if init_path:
    c.init.path = init_path
  c.checkpoint_every = 1           # the step-1 checkpoint holds the start (lr 0 at step 1)
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  d = tmp_path_factory.mktemp("stage_videos")
  colours = {"red": (230, 40, 40), "blue": (60, 90, 255), "green": (40, 220, 60)}
  for k, (name, colour) in enumerate(colours.items()):
    write_video(str(d / f"{name}.mp4"), moving_square(colour, k), fps=24)
  with open(d / "captions.json", "w") as f:
    json.dump({f"{name}.mp4": f"a {name} square moves right" for name in colours}, f)
  c = stage_config(1, "smoke")
  c.data.video_dir = str(d)
  out = str(tmp_path_factory.mktemp("stage_prepared") / "data")
  prepare_from_config(c, out, videos_per_shard=2, echo=quiet, progress=False)
  return out


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
  base = tmp_path_factory.mktemp("stages")
  out = {}
  previous = ""
  for n in (1, 2, 3):
    c = smoke(n, prepared, previous)
    workdir = str(base / f"stage{n}")
    lines = []
    result = train(c, workdir, echo=lines.append)
    out[n] = dict(config=c, workdir=workdir, result=result, lines=lines)
    previous = workdir
  return out


def dit_weights(model):
  return jax.tree.leaves(nnx.state(model.dit, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_each_stage_starts_from_the_previous_stages_final_ema_weights(runs):
  for n in (2, 3):
    prev, run = runs[n - 1], runs[n]
    c = run["config"]
    schedule, _ = build.optimizer(c)
    assert float(schedule(0)) == 0.0     # step 1 updates by 0: its checkpoint is the start
    start = dit_weights(load_trained(run["workdir"], step=1, use_ema=False)[1])
    final_ema = dit_weights(prev["result"].model)          # the trained model: EMA weights
    final_raw = dit_weights(load_trained(prev["workdir"], use_ema=False)[1])
    assert any(not np.array_equal(x, y) for x, y in zip(final_ema, final_raw))
    assert_same(start, final_ema)
    assert f"init: DiT weights (EMA) of the run {prev['workdir']} at step " \
           f"{prev['config'].total_steps}" in run["lines"], run["lines"]
    # A new run: its own step count, and it trained on from there.
    r = run["result"]
    assert r.step == c.total_steps and np.isfinite(float(r.last_metrics["loss"]))
    end = dit_weights(load_trained(run["workdir"], use_ema=False)[1])
    assert any(not np.array_equal(x, y) for x, y in zip(start, end))
  # Stage 1 started from random weights: nothing to carry.
  assert not any(line.startswith("init:") for line in runs[1]["lines"])


def test_rerun_of_a_stage_resumes_its_own_checkpoints(runs, tmp_path):
  """Stage 2 again in its workdir (a copy), 1 more step, with stage 1's workdir moved away: it
  resumes from its step 2 and never reads init.path."""
  run, stage1 = runs[2], runs[1]["workdir"]
  workdir = str(tmp_path / "stage2")
  shutil.copytree(run["workdir"], workdir)
  c = ml_collections.ConfigDict(run["config"].to_dict())
  c.total_steps = run["config"].total_steps + 1      # run control: may change on a resume
  os.rename(stage1, stage1 + ".away")
  try:
    lines = []
    result = train(c, workdir, echo=lines.append)
  finally:
    os.rename(stage1 + ".away", stage1)
  assert result.step == c.total_steps
  assert any("holds checkpoints of its own: resuming them" in l for l in lines), lines
  assert any(l.startswith("resumed from ") and l.endswith(f"(step {c.total_steps - 1})")
             for l in lines), lines
  assert not any(l.startswith("init:") for l in lines), lines


def test_mismatches_are_refused(runs, prepared, tmp_path):
  stage1 = runs[1]["workdir"]
  c = smoke(2, prepared, stage1)
  c.model.overrides = dict(c.model.overrides, num_layers=2)
  with pytest.raises(ConfigError, match=r"another architecture: num_layers is 2 here, 1 in the "
                                        r"run"):
    train(c, str(tmp_path / "a"), echo=quiet)
  c = smoke(2, prepared, str(tmp_path))
  with pytest.raises(ConfigError, match=r"init\.path=.* is not a training run directory"):
    train(c, str(tmp_path / "b"), echo=quiet)
  c = smoke(2, prepared, stage1)
  c.distill.teacher = "init"
  with pytest.raises(ConfigError, match=r"distill\.teacher=.*to distil a previous run"):
    train(c, str(tmp_path / "c"), echo=quiet)
  c = smoke(2, prepared, stage1)
  c.lora.rank = 2
  prev = ml_collections.ConfigDict(runs[1]["config"].to_dict())
  prev.lora.rank = 4
  with pytest.raises(ConfigError, match=r"lora\.rank=2 .* itself a LoRA run"):
    stages.check_lora(c, prev)


def test_lora_run_over_a_stage_has_that_stage_as_its_base(runs, prepared):
  c = smoke(2, prepared, runs[1]["workdir"])
  c.lora.rank, c.lora.alpha = 2, 2.0
  model = build.build_model(c, None)
  assert_same(dit_weights(model), dit_weights(runs[1]["result"].model))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_full_stage_configs_hold_the_reports_values(n):
  c = stage_config(n)
  size, frames = {1: ((352, 640), 192), 2: ((480, 832), 192), 3: ((720, 1280), 384)}[n]
  assert (c.model.preset, c.model.precision, c.model.remat) == ("4.5B_base", "bf16", True)
  o = c.optim
  assert (o.lr, o.b1, o.b2, o.weight_decay, o.warmup_steps) == (1e-4, 0.9, 0.95, 0.1, 1000)
  lr = learning_rate(o.lr, o.warmup_steps, c.total_steps, o.schedule, o.end_lr)
  assert float(lr(o.warmup_steps)) == pytest.approx(1e-4)
  assert float(lr(c.total_steps)) == pytest.approx(1e-4 if n < 3 else 1e-5)
  assert o.schedule == ("constant" if n < 3 else "cosine")
  d = c.data
  assert (d.height, d.width) == size and d.height % 16 == 0 and d.width % 16 == 0
  h, w = size
  assert tuple(map(tuple, d.buckets))[:2] == ((h, w), (w, h))
  for bh, bw in d.buckets:
    assert bh % 16 == 0 and bw % 16 == 0 and abs(bh * bw / (h * w) - 1) < 0.05
  assert sum(bh == bw for bh, bw in d.buckets) == 1
  assert (d.clip_frames, d.stride, d.frames_per_chunk, c.objective.chunk_width) == (
      frames, frames, 24, 6)
  assert d.bin_chunks == frames // 24                  # a whole clip fits one row
  assert (d.image_ratio, d.val_fraction, c.validation.every) == (4.0, 0.01, 1000)
  assert (d.kind, c.text.kind, c.vae.kind) == ("prepared", "precomputed", "official")
  assert d.prepared_dir == f"prepared/magi_stage{n}"
  assert build.model_config(c).caption_max_length == c.text.max_length   # T5 rows fit the DiT
  if n == 1:
    assert c.init.kind == "random"
  else:
    assert (c.init.kind, c.init.path, c.init.use_ema) == (
        "run", os.path.join("runs", f"magi_4p5b_stage{n - 1}"), True)
    s = stage_config(n, "smoke")
    assert (s.init.kind, s.init.path) == ("run", os.path.join("runs",
                                                              f"magi_4p5b_stage{n - 1}_smoke"))
