"""Shortcut + guidance distillation (magi_jax/train/distill.py): the teacher's three guidance
passes on packed rows against direct DiT calls, the sampler's bucket rule, the loss of both
branches against a hand-built computation, and a distillation run of the demo end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from magi_jax.attention import ChunkMask
from magi_jax.configs import tiny_config
from magi_jax.convert.load import random_module
from magi_jax.diffusion import flow, schedule, shortcut
from magi_jax.diffusion.conditioning import ConditioningConfig, sample_conditioning
from magi_jax.diffusion.segments import packed_frame_positions, packed_kv_ranges
from magi_jax.models.dit import VideoDiT
from magi_jax.text.rows import NULL_CAPTION_VALID
from magi_jax.train.build import distilled_copy
from magi_jax.train.distill import (DistillConfigError, DistillObjective, Guidance,
                                    alone_segments, chunk_guidance_scales, distill_loss,
                                    rows_for, teacher_guided_velocity)
from magi_jax.train.objective import Objective, TrainModel

CHUNK_WIDTH = 2
L, CC = 8, 32
SEG = np.array([[1, 1, 1, 2], [1, 1, 2, 0]], np.int32)


def _dit(seed=0):
  cfg = tiny_config(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2,
                    num_query_groups=1, kv_channels=32, caption_channels=CC,
                    caption_max_length=L, in_channels=4, out_channels=4).model
  return random_module(lambda: VideoDiT(cfg, rngs=nnx.Rngs(seed)), seed)


@pytest.fixture(scope="module")
def models():
  teacher = _dit(0)
  student = distilled_copy(_dit(1), 1)
  return TrainModel(student, teacher=TrainModel(teacher))


def _batch(seed=0, C=4, h=4, w=4):
  rng = np.random.default_rng(seed)
  N, K = SEG.shape
  return {"x1": jnp.asarray(rng.normal(size=(N, C, K * CHUNK_WIDTH, h, w)), jnp.float32),
          "segment_ids": jnp.asarray(SEG),
          "text_emb": jnp.asarray(rng.normal(size=(N, K, L, CC)), jnp.float32),
          "text_mask": jnp.asarray((np.arange(L) < 5)[None, None].repeat(N, 0).repeat(K, 1),
                                   jnp.float32)}


def _objective(prev, text, cycle=(1 / 8, 1 / 4), v2v=None, prediction="velocity"):
  base = Objective(chunk_width=CHUNK_WIDTH, prediction=prediction,
                   conditioning=ConditioningConfig(p_v2v=0.5, p_i2v=0.3))
  return DistillObjective(base=base, cycle=cycle,
                          guidance=Guidance(prev_chunk_scales=(prev,), text_scales=(text,),
                                            v2v_text_scales=v2v))


def _cond(batch, key=jax.random.key(3)):
  cfg = ConditioningConfig(p_v2v=0.5, p_i2v=0.3, text_dropout=0.0)
  return sample_conditioning(key, batch["segment_ids"], CHUNK_WIDTH, cfg)


def _noised(batch, cond, key=jax.random.key(4)):
  x0 = jax.random.normal(key, batch["x1"].shape, jnp.float32)
  return x0, flow.interpolate(x0, batch["x1"], cond.frame_t)


def _null(dit):
  return (dit.y_embedder.null_caption_embedding[...],
          (jnp.arange(L) < NULL_CAPTION_VALID).astype(jnp.float32))


def _packed_call(dit, batch, cond, x_t, *, null_caption, step_size=None):
  """The DiT on the packed rows, written out: captions (or the null caption) per chunk."""
  seg = batch["segment_ids"]
  N, K = seg.shape
  tpc = CHUNK_WIDTH * 4                       # 2 frames x (4/2)² patches
  y = batch["text_emb"].reshape(N * K, L, CC)
  m = batch["text_mask"].reshape(N * K, L)
  null, null_m = _null(dit)
  off = (cond.text_drop | null_caption).reshape(-1)
  y = jnp.where(off[:, None, None], null[None], y)
  m = jnp.where(off[:, None], null_m[None], m)
  fi, ft = packed_frame_positions(seg, CHUNK_WIDTH)
  mask = ChunkMask(packed_kv_ranges(seg, tpc), q_block=tpc, layout="causal_segments")
  return dit(x_t, cond.t, y, m, mask, caption_dropped=cond.text_drop | null_caption,
             frame_index=fi, frame_total=ft, step_size=step_size).velocity


def _alone_calls(dit, batch, cond, x_t):
  """Every real chunk on its own: a one-chunk call, null caption, RoPE time from 0."""
  seg = np.asarray(batch["segment_ids"])
  null, null_m = _null(dit)
  tpc = CHUNK_WIDTH * 4
  out = np.zeros(x_t.shape, np.float32)
  for n in range(seg.shape[0]):
    for k in range(seg.shape[1]):
      if not seg[n, k]:
        continue
      sl = slice(k * CHUNK_WIDTH, (k + 1) * CHUNK_WIDTH)
      v = dit(x_t[n:n + 1, :, sl], cond.t[n:n + 1, k:k + 1], null[None], null_m[None],
              ChunkMask(np.array([[[0, tpc]]], np.int32), q_block=tpc),
              caption_dropped=jnp.array([True]), first_chunk=0).velocity
      out[n, :, sl] = np.asarray(v[0])
  return out


def _real_frames(a):
  """Only the frames of real (non-padding) chunks: padding chunks are never compared."""
  real = np.repeat(SEG > 0, CHUNK_WIDTH, axis=1)
  return np.asarray(a).transpose(0, 2, 1, 3, 4)[real]


# ------------------------------------------------------------------ guidance scales
def test_chunk_guidance_scales_follow_the_samplers_bucket_rule():
  edges = (0.0, 0.0217, 0.1, 0.3, 0.999)
  g = Guidance(cfg_t_range=edges, prev_chunk_scales=(1.5, 1.4, 1.3, 1.0, 0.9),
               text_scales=(7.5, 7.0, 6.5, 0.0, 0.5))
  e = np.asarray(edges, np.float32)
  t = np.concatenate([np.random.default_rng(0).uniform(0, 1, 200), e, e - 1e-7, e + 1e-7,
                      [0.0, 1.0]]).astype(np.float32)
  prev, text = jax.device_get(chunk_guidance_scales(jnp.asarray(t), g))
  for ti, p, s in zip(t, prev, text):
    b = schedule.guidance_bucket(float(ti), edges)
    assert p == np.float32(g.prev_chunk_scales[b]) and s == np.float32(g.text_scales[b]), ti


def test_v2v_text_scales_apply_to_videos_with_clean_chunks():
  g = Guidance(prev_chunk_scales=(4.0,), text_scales=(3.0,), v2v_text_scales=(1.0,))
  t = jnp.full((1, 3), 0.5)
  prev, text = chunk_guidance_scales(t, g, jnp.array([[True, False, True]]))
  np.testing.assert_array_equal(np.asarray(text), [[1.0, 3.0, 1.0]])
  np.testing.assert_array_equal(np.asarray(prev), [[4.0, 4.0, 4.0]])


def test_guidance_lists_must_match():
  with pytest.raises(DistillConfigError, match="same, nonzero length"):
    Guidance(cfg_t_range=(0.0, 0.5), prev_chunk_scales=(1.0,), text_scales=(1.0, 1.0))
  with pytest.raises(DistillConfigError, match="ascending"):
    Guidance(cfg_t_range=(0.5, 0.0), prev_chunk_scales=(1.0, 1.0), text_scales=(1.0, 1.0))


def test_a_larger_size_needs_its_half_in_range():
  with pytest.raises(DistillConfigError, match="half"):
    _objective(1.0, 1.0, cycle=(1 / 4, 1 / 16))
  with pytest.raises(ValueError, match="1/2"):
    _objective(1.0, 1.0, cycle=(1 / 3,))


# ------------------------------------------------------------------ the teacher's passes
def test_alone_segments_make_every_real_chunk_its_own_video():
  np.testing.assert_array_equal(np.asarray(alone_segments(SEG)), [[1, 2, 3, 4], [1, 2, 3, 0]])


@pytest.fixture(scope="module")
def passes(models):
  """One draw of noised rows and the teacher's three passes called directly: the packed rows
  with captions (A, the teacher's own velocity) and with the null caption (B), and every
  chunk on its own (C)."""
  teacher = models.teacher
  batch = _batch()
  cond = _cond(batch)
  _, x_t = _noised(batch, cond)
  direct = {"text": _packed_call(teacher.dit, batch, cond, x_t, null_caption=False),
            "prev": _packed_call(teacher.dit, batch, cond, x_t, null_caption=True),
            "alone": _alone_calls(teacher.dit, batch, cond, x_t)}
  return batch, cond, x_t, direct


@pytest.mark.parametrize("prev,text,which", [(1.0, 1.0, "text"), (1.0, 0.0, "prev"),
                                             (0.0, 0.0, "alone")])
def test_each_teacher_pass_equals_direct_dit_calls(models, passes, prev, text, which):
  """Scales picking one pass (1,1 -> A; 1,0 -> B; 0,0 -> C) give exactly that pass: at the
  smallest step size with both scales 1 the target is the teacher's own velocity."""
  batch, cond, x_t, direct = passes
  obj = _objective(prev, text)
  got = teacher_guided_velocity(models.teacher.dit,
                                rows_for(models.teacher, batch, cond, x_t, obj),
                                batch["segment_ids"], cond, obj, "velocity")
  np.testing.assert_allclose(_real_frames(got), _real_frames(direct[which]), atol=2e-5,
                             rtol=1e-5)


def test_the_guided_target_combines_the_three_passes(models, passes):
  batch, cond, x_t, direct = passes
  obj = _objective(2.5, 4.0)
  got = teacher_guided_velocity(models.teacher.dit,
                                rows_for(models.teacher, batch, cond, x_t, obj),
                                batch["segment_ids"], cond, obj, "velocity")
  want = ((1 - 2.5) * np.asarray(direct["alone"]) + (2.5 - 4.0) * np.asarray(direct["prev"])
          + 4.0 * np.asarray(direct["text"]))
  np.testing.assert_allclose(_real_frames(got), _real_frames(want), atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------ the loss
def _loss_by_hand(models, batch, key, step, obj):
  """distill_loss written out from direct DiT calls and the shortcut formulas."""
  k_cond, k_noise = jax.random.split(key)
  cond = _cond(batch, k_cond)
  x0, x_t = _noised(batch, cond, k_noise)
  s = obj.cycle[step % len(obj.cycle)]
  student, teacher = models.dit, models.teacher.dit
  emb = lambda size: shortcut.embedded_step_size(size)
  if s == min(obj.cycle):
    g = obj.guidance
    a = _packed_call(teacher, batch, cond, x_t, null_caption=False)
    b = _packed_call(teacher, batch, cond, x_t, null_caption=True)
    c = jnp.asarray(_alone_calls(teacher, batch, cond, x_t))
    target = ((1 - g.prev_chunk_scales[0]) * c + (g.prev_chunk_scales[0] - g.text_scales[0]) * b
              + g.text_scales[0] * a)
  else:
    # Two Euler steps of size s/2 in the sampler's u, the student at s/2, then the Δt-average.
    t = np.asarray(cond.t, np.float64)
    u = np.sqrt(np.clip(t, 0, 1) / (1 / 3 - (1 / 3 - 1) * np.clip(t, 0, 1)))
    w = lambda u: (u ** 2 / 3) / (1 + (1 / 3 - 1) * u ** 2)
    clean = np.asarray(cond.clean)
    t1 = np.where(clean, t, np.maximum(np.minimum(w(np.minimum(u + s / 2, 1)), 1), t))
    u1 = np.sqrt(t1 / (1 / 3 - (1 / 3 - 1) * t1))
    t2 = np.where(clean, t1, np.maximum(np.minimum(w(np.minimum(u1 + s / 2, 1)), 1), t1))
    per_frame = lambda a: jnp.asarray(np.repeat(a, CHUNK_WIDTH, axis=1)[:, None, :, None, None],
                                      jnp.float32)
    v1 = _packed_call(student, batch, cond, x_t, null_caption=False, step_size=emb(s / 2))
    image = np.repeat((SEG > 0) & ~clean, CHUNK_WIDTH, axis=1) & (np.asarray(cond.frame_weight)
                                                                   == 0)
    x_mid = jnp.where(jnp.asarray(image)[:, None, :, None, None], x_t,
                      x_t + per_frame(t1 - t) * v1)
    cond1 = dataclasses.replace(cond, t=jnp.asarray(t1, jnp.float32))
    v2 = _packed_call(student, batch, cond1, x_mid, null_caption=False, step_size=emb(s / 2))
    total = t2 - t
    w1 = np.where(total > 0, (t1 - t) / np.where(total > 0, total, 1), 1)
    target = per_frame(w1) * v1 + per_frame(1 - w1) * v2
  out = _packed_call(student, batch, cond, x_t, null_caption=False, step_size=emb(s))
  err = np.mean(np.square(np.asarray(out) - np.asarray(target)), axis=(1, 3, 4))
  weight = np.asarray(cond.frame_weight)
  return float(np.sum(err * weight) / np.sum(weight))


@pytest.mark.parametrize("step", [0, 1])
def test_distill_loss_matches_a_hand_built_computation(models, step):
  """Step 0 draws the smallest size (the teacher's guided target), step 1 the larger one (the
  student's two half steps); the jitted loss of each equals the written-out version."""
  batch = _batch(2)
  obj = _objective(2.0, 3.0)
  key = jax.random.key(11)
  loss, aux = jax.jit(lambda m, b, k, s: distill_loss(m, b, k, s, obj))(models, batch, key,
                                                                          jnp.int32(step))
  assert float(aux["step_size"]) == obj.cycle[step]
  want = _loss_by_hand(models, batch, key, step, obj)
  assert np.isfinite(want) and want > 0
  np.testing.assert_allclose(float(loss), want, rtol=2e-4)


def test_the_loss_trains_the_student_only(models):
  """Gradients reach the student's weights; the teacher is read, not trained."""
  batch = _batch(3)
  obj = _objective(2.0, 3.0)
  g, student, teacher = nnx.split(models, nnx.All(nnx.Param, nnx.Not(nnx.PathContains(
      "teacher"))), ...)

  def loss(p):
    return distill_loss(nnx.merge(g, p, teacher), batch, jax.random.key(0), jnp.int32(0), obj)[0]

  grads = jax.grad(loss)(student)
  norms = [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(grads)]
  assert sum(n > 0 for n in norms) > len(norms) // 2
  assert not any("teacher" in str(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0])


def test_a_base_student_is_refused(models):
  obj = _objective(1.0, 1.0)
  base = TrainModel(models.teacher.dit, teacher=models.teacher)
  with pytest.raises(DistillConfigError, match="distilled DiT"):
    distill_loss(base, _batch(), jax.random.key(0), jnp.int32(0), obj)
  with pytest.raises(DistillConfigError, match="teacher"):
    distill_loss(TrainModel(models.dit), _batch(), jax.random.key(0), jnp.int32(0), obj)


def test_distilled_copy_keeps_the_weights_and_adds_the_step_embedding():
  base = _dit(5)
  student = distilled_copy(base, 0)
  assert student.distill and not base.distill
  a, b = nnx.state(base, nnx.Param), nnx.state(student, nnx.Param)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ------------------------------------------------------------------ a distillation run
@pytest.fixture(scope="module")
def distill_run(tmp_path_factory, compile_cache):
  """The demo's smoke teacher (2 steps), then bouncing_distill.py:smoke from it (4 steps over
  the cycle (1/8, 1/4): both targets)."""
  from experiments.configs import bouncing_distill, bouncing_tiny
  from magi_jax.train.trainer import train
  base = tmp_path_factory.mktemp("distill_run")
  tc = bouncing_tiny.get_config("smoke")
  tc.total_steps, tc.checkpoint_every, tc.ema_decay = 2, 2, 0.0
  for c in (tc,):
    c.data.data_dir, c.tensorboard, c.sample_at_end = str(base / "tfds"), False, False
  teacher = train(tc, str(base / "teacher"), echo=lambda *_: None)
  c = bouncing_distill.get_config("smoke")
  c.distill.teacher = str(base / "teacher")
  c.data.data_dir, c.tensorboard, c.sample_at_end = str(base / "tfds"), False, False
  lines = []
  result = train(c, str(base / "student"), echo=lines.append)
  return dict(base=base, tc=tc, teacher=teacher, c=c, result=result, lines=lines)


def test_the_run_distils_its_teacher(distill_run):
  r = distill_run
  result, teacher = r["result"], r["teacher"]
  assert result.step == 4 and not result.stopped_by_signal
  assert any(line.startswith(f"teacher: {r['c'].distill.teacher} at step 2")
             for line in r["lines"])
  assert np.isfinite(float(result.last_metrics["loss"]))
  student = result.model
  assert student.dit.distill and not student.teacher.dit.distill
  # The teacher is the trained base model, untouched; the student moved away from it.
  want = nnx.state(teacher.model.dit, nnx.Param)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               want, nnx.state(student.teacher.dit, nnx.Param))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), want,
                                       nnx.state(student.dit, nnx.Param)))
  assert max(moved) > 0


def test_a_distilled_run_loads_and_samples_with_one_pass(distill_run):
  from magi_jax.train.samples import SampleSettings, VideoSampler
  from magi_jax.train.trainer import load_trained
  r = distill_run
  c, model, tok, step = load_trained(str(r["base"] / "student"))
  assert step == 4 and model.dit.distill and model.teacher is None
  for a, b in zip(jax.tree.leaves(nnx.state(model.dit, nnx.Param)),
                  jax.tree.leaves(nnx.state(r["result"].model.dit, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  vs = VideoSampler(model, tok, chunk_width=c.objective.chunk_width,
                    prediction=c.model.prediction,
                    settings=SampleSettings(num_steps=4, window_size=2))
  assert vs.cfg.runtime.cfg_number == 1 and vs.cfg.engine.distill
  video = vs.generate(["a red ball"], num_chunks=2, height=24, width=24, seed=0)
  assert video.shape == (8, 24, 24, 3) and video.dtype == np.uint8


def test_a_student_must_have_its_teachers_architecture(distill_run):
  from experiments.configs import bouncing_distill
  from magi_jax.configs import ConfigError
  from magi_jax.train.trainer import train
  r = distill_run
  c = bouncing_distill.get_config("smoke")
  c.distill.teacher = str(r["base"] / "teacher")
  c.data.data_dir, c.tensorboard = str(r["base"] / "tfds"), False
  c.model.overrides = dict(c.model.overrides, num_layers=2)
  with pytest.raises(ConfigError, match="teacher run's"):
    train(c, str(r["base"] / "wrong"), echo=lambda *_: None)
  c.model.overrides = dict(c.model.overrides, num_layers=1)
  c.distill.teacher = str(r["base"] / "student")
  with pytest.raises(ConfigError, match="itself a distillation run"):
    train(c, str(r["base"] / "wrong2"), echo=lambda *_: None)


def test_the_metrics_report_each_step_sizes_loss(distill_run):
  import json
  with open(distill_run["base"] / "student" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  # log_every 2 over the cycle (1/8, 1/4): every interval holds one step of each size.
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert np.isfinite(r["loss_s/1_8"]) and np.isfinite(r["loss_s/1_4"])
    np.testing.assert_allclose(r["loss"], (r["loss_s/1_8"] + r["loss_s/1_4"]) / 2, rtol=1e-6)


def test_evaluate_measures_a_student_at_each_step_count(distill_run, capsys):
  """`python -m experiments.evaluate --num_steps=2,4` on the smoke student: one report per
  step count, one guidance pass each, and the cost figures the README table reports."""
  import json

  from absl import flags

  from experiments import evaluate
  workdir = str(distill_run["base"] / "student")
  flags.FLAGS(["evaluate", f"--workdir={workdir}", "--num_steps=2,4", "--num_continuations=2",
               "--num_text=1"])
  try:
    evaluate.main(["evaluate"])
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert "--- 2 sampler steps ---" in out and "--- 4 sampler steps ---" in out
  with open(distill_run["base"] / "student" / "eval.json") as f:
    report = json.load(f)
  assert report["step"] == 4 and set(report) == {"step", "2_steps", "4_steps"}
  for n in (2, 4):
    r = report[f"{n}_steps"]
    assert (r["num_steps"], r["cfg_number"], r["network_evaluations_per_chunk"]) == (n, 1, n)
    assert r["seconds_per_chunk"] > 0 and 0 <= r["text_control_accuracy"] <= 1
    assert np.isfinite(r["continuation"]["centre_error_model"])
  assert (distill_run["base"] / "student" / "eval_strip.png").is_file()


def test_evaluate_refuses_a_bad_step_count():
  from magi_jax.proj.bouncing.evaluation import step_counts
  assert step_counts([], 8) == [8] and step_counts(["8", "16"], 4) == [8, 16]
  for bad in (["0"], ["eight"], ["8", "-1"]):
    with pytest.raises(ValueError, match="not a positive step count"):
      step_counts(bad, 8)


def test_the_benchmark_table_gives_ratios_to_the_teacher():
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "distill_student.py")
  spec = importlib.util.spec_from_file_location("distill_student", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)

  def report(acc, err, nfe, sec):
    return {"text_control_accuracy": acc, "network_evaluations_per_chunk": nfe,
            "seconds_per_chunk": sec,
            "continuation": {"centre_error_model": err, "bright_ratio_model": 1.2,
                             "mse_model": 0.01}}
  text = bench.table([("teacher", report(1.0, 6.0, 48, 0.48)),
                      ("student", report(0.9, 6.6, 8, 0.08))])
  rows = text.splitlines()
  assert len(rows) == 4 and rows[0].startswith("| model | text control")
  assert "90% (0.90x)" in rows[3] and "6.60 (1.10x)" in rows[3]
  assert rows[3].endswith("| 6.0x (6.0x) |")
