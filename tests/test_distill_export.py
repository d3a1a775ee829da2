"""Distilling an official base checkpoint (`finetune_distill.py:tiny` / `:tiny_lora`) and the
official-layout export of the student (`distilled_dit/`).

* On tiny random "official" weights: the init checkpoint is the frozen teacher (bitwise) and
  the student's start; the student trains; `distilled_dit/` has exactly the official key set
  and shapes (the distilled architecture adds no parameters), strict-loads as a distilled DiT
  and reproduces the trained student's velocity at its step size; LoRA students are exported
  merged.
* On the official fixtures: a student exported from the fixture weights runs the official
  distilled sampling loop (`dit_sample_cfg1`) within the parity tolerances, so the export is
  the layout the official distilled sampler reads.
"""

from __future__ import annotations

import json
import os
import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES
from experiments.configs import finetune_distill
from magi_jax.convert.load import random_module
from magi_jax.formats.safetensors_io import SafetensorsFile, save_safetensors
from magi_jax.models import Precision, VideoDiT
from magi_jax.official.dit import load_official_dit, save_official_dit
from magi_jax.official.forward import official_forward
from magi_jax.official.parity import dit_sample, fixtures
from magi_jax.train import build
from magi_jax.train.lora import lora_config, merge_lora
from magi_jax.train.objective import TrainModel
from magi_jax.train.trainer import export_distilled, train

pytestmark = pytest.mark.usefixtures("compile_cache")

F32 = jnp.float32
STEP_SIZE = 1 / 8          # the step size the velocity checks run the student at


def _velocity(dit, x, t, y, mask, kv_range, *, chunk_width, step_size):
  return official_forward(dit, x, t, y, mask, kv_range, chunk_width=chunk_width,
                          step_size=step_size, backend="reference").velocity


velocity = nnx.jit(_velocity, static_argnames=("chunk_width", "step_size"))


def _inputs(mcfg, chunk_width, seed=0):
  """Two block-causal chunks of an 8x8 video of the model's channels."""
  r = np.random.default_rng(seed)
  H = W = 2 * mcfg.patch_size
  per_chunk = (chunk_width // mcfg.t_patch_size) * (H // mcfg.patch_size) * (W // mcfg.patch_size)
  L, C = mcfg.caption_max_length, mcfg.caption_channels
  x = r.standard_normal((1, mcfg.in_channels, 2 * chunk_width, H, W)).astype(np.float32)
  t = r.uniform(0.05, 0.95, (1, 2)).astype(np.float32)
  y = r.standard_normal((2, 1, L, C)).astype(np.float32)
  mask = (np.arange(L)[None, :] < np.asarray([3, L])[:, None]).astype(np.int32)[:, None, :]
  kv_range = np.asarray([[0, per_chunk], [0, 2 * per_chunk]], np.int32)
  return x, t, y, mask, kv_range


def _params(dit):
  flt = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(dit, flt))}


def _official_tensors(directory):
  """Every tensor of an official checkpoint directory (one file, or shards and their index)."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
  else:
    names = ["model.safetensors"]
  out = {}
  for name in names:
    sf = SafetensorsFile(os.path.join(directory, name))
    out.update({k: sf.get(k) for k in sf.keys()})
  return out


def _official_keys(directory):
  return {k: tuple(v.shape) for k, v in _official_tensors(directory).items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny random base checkpoint in the official layout, of the `:tiny` architecture."""
  base = tmp_path_factory.mktemp("distill_official")
  mcfg = build.model_config(finetune_distill.get_config("tiny"))
  dit = random_module(lambda: VideoDiT(mcfg, precision=Precision.fp32(), rngs=nnx.Rngs(0)), 0)
  path = str(base / "official")
  save_official_dit(dit, path)
  return dict(path=path, base=base, mcfg=mcfg)


def _run(checkpoint, variant):
  c = finetune_distill.get_config(variant)
  c.init.path = checkpoint["path"]
  c.data.data_dir = str(checkpoint["base"] / "tfds")
  c.tensorboard = False
  workdir = str(checkpoint["base"] / variant)
  lines = []
  result = train(c, workdir, echo=lines.append)
  return dict(c=c, workdir=workdir, result=result, lines=lines)


@pytest.fixture(scope="module")
def full(checkpoint):
  return _run(checkpoint, "tiny")


@pytest.fixture(scope="module")
def lora(checkpoint):
  return _run(checkpoint, "tiny_lora")


def test_the_config_distils_its_init_weights(full):
  c, result = full["c"], full["result"]
  assert c.init.kind == "official" and c.distill.teacher == "init" and c.distill.export_official
  assert result.step == c.total_steps and not result.stopped_by_signal
  assert np.isfinite(float(result.last_metrics["loss"]))
  assert result.model.dit.distill and not result.model.teacher.dit.distill


def test_the_teacher_is_the_checkpoint_and_the_student_moved(full, checkpoint):
  ckpt = _params(load_official_dit(checkpoint["path"], checkpoint["mcfg"],
                                   precision=Precision.fp32()))
  teacher, student = (_params(m) for m in (full["result"].model.teacher.dit,
                                           full["result"].model.dit))
  assert set(teacher) == set(student) == set(ckpt)
  for p in ckpt:
    np.testing.assert_array_equal(teacher[p], ckpt[p], err_msg=str(p))
  moved = [p for p in ckpt if not np.array_equal(student[p], ckpt[p])]
  assert len(moved) > len(ckpt) // 2, moved


def test_the_export_has_the_official_key_set_and_reproduces_the_student(full, checkpoint):
  out = os.path.join(full["workdir"], "distilled_dit")
  assert any("distilled_dit" in line for line in full["lines"])
  # The base checkpoint's keys and shapes: the official distilled checkpoints have the same.
  assert _official_keys(out) == _official_keys(checkpoint["path"])
  mcfg, cw = checkpoint["mcfg"], full["c"].objective.chunk_width
  loaded = load_official_dit(out, mcfg, precision=Precision.fp32(), distill=True)
  assert loaded.distill
  want, got = _params(full["result"].model.dit), _params(loaded)
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
  inputs = _inputs(mcfg, cw)
  v_student = np.asarray(velocity(full["result"].model.dit, *inputs, chunk_width=cw,
                                  step_size=STEP_SIZE))
  v_loaded = np.asarray(velocity(loaded, *inputs, chunk_width=cw, step_size=STEP_SIZE))
  chex.assert_shape(v_loaded, inputs[0].shape)
  np.testing.assert_array_equal(v_loaded, v_student)
  # The step size is an input of the exported model: another size, another velocity.
  v_other = np.asarray(velocity(loaded, *inputs, chunk_width=cw, step_size=1 / 16))
  assert np.abs(v_other - v_loaded).max() > 1e-6


def test_a_lora_student_is_exported_merged(lora, checkpoint):
  result = lora["result"]
  assert lora_config(result.model.dit) is not None
  out = os.path.join(lora["workdir"], "distilled_dit")
  assert _official_keys(out) == _official_keys(checkpoint["path"])
  mcfg, cw = checkpoint["mcfg"], lora["c"].objective.chunk_width
  loaded = load_official_dit(out, mcfg, precision=Precision.fp32(), distill=True)
  inputs = _inputs(mcfg, cw, seed=1)
  want = np.asarray(velocity(result.model.dit, *inputs, chunk_width=cw, step_size=STEP_SIZE))
  got = np.asarray(velocity(loaded, *inputs, chunk_width=cw, step_size=STEP_SIZE))
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=0)
  merged = _params(merge_lora(result.model.dit))
  for p, v in _params(loaded).items():
    np.testing.assert_array_equal(v, merged[p], err_msg=str(p))


def test_an_exported_student_runs_the_official_distilled_sampler(tmp_path):
  """The fixture weights as a student, exported, then the official cfg1 sampling loop."""
  cfg = dit_sample._config(FIXTURES, "cfg1")
  base = load_official_dit(fixtures.dit_weights(FIXTURES), cfg.model, precision=Precision.fp32())
  student = build.distilled_copy(base, 0)
  out = export_distilled(TrainModel(student), str(tmp_path / "run"), echo=lambda _: None)
  exported = _official_tensors(out)
  want = fixtures.dit_weights(FIXTURES)
  assert set(exported) == set(want)
  assert all(exported[k].shape == want[k].shape for k in want)
  # A fixture directory whose weights are the export: the parity run reads them from there.
  d = tmp_path / "fixtures"
  d.mkdir()
  for name in ("dit_config.json", "dit_sample_cfg1.safetensors"):
    shutil.copy(os.path.join(FIXTURES, name), d / name)
  save_safetensors(exported, str(d / "dit_weights.safetensors"))
  results = dit_sample.run_cfg1(str(d))
  assert results and all(r.ok for r in results), "\n".join(r.line() for r in results)
