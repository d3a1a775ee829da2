"""Shortcut + guidance distillation (MAGI-1 report, arXiv 2505.13211, §3): the training loss.

The student is the distilled DiT (`VideoDiT(distill=True)`: the base network whose timestep
embedder also embeds the step size, `embedded_step_size(s) = 1 / (2 s)`), started from the
teacher's weights; the official distilled architecture has no separate step-size embedder,
so nothing starts from zero. The teacher is the frozen base model of the same architecture.

Each training step draws its step size s from the cycle (`shortcut.step_size_at`, one s for
the whole batch) and uses exactly the base objective's packed rows, per-chunk levels, clean
chunks, I2V image frames and block-causal mask (`objective.velocity_of_row`'s inputs):

* s = the cycle's smallest size: the target is the teacher's guided velocity, MAGI's three
  passes batched as one teacher call of 3N rows: (A) the rows as drawn with their captions,
  (B) the same with the null caption, (C) every chunk alone (its own segment: it sees only
  itself, RoPE time from 0, the null caption), combined with per-chunk scales by the
  sampler's bucket rule (`chunk_guidance_scales`). Guidance is distilled in: the student
  samples with `cfg_number` 1.
* a larger s: the self-consistency target, two size-s/2 steps of the student itself
  (`shortcut.self_consistency_target`, under stop-gradient; the student's current weights,
  not an EMA), clean chunks and image frames held.

Choices the report leaves open, made here: no caption dropout while distilling (the student
is always asked for the guided velocity with its caption; clean chunks keep the null caption
as in base training); the loss is the squared velocity error on the noisy frames, weighted by
(1 - t)² for a clean-predicting model (its loss is on the implied clean sample, as in base
training); the caption rows come from the teacher's text path and are not trained.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.attention import ChunkMask
from magi_jax.diffusion import flow, shortcut
from magi_jax.diffusion.conditioning import sample_conditioning
from magi_jax.diffusion.segments import packed_frame_positions, same_segment
from magi_jax.errors import MagiError
from magi_jax.text.rows import NULL_CAPTION_VALID
from magi_jax.train.objective import (Objective, caption_rows, chunk_losses, packed_mask,
                                      row_geometry)

F32 = jnp.float32


class DistillConfigError(MagiError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Guidance:
  """The teacher's guidance, as the sampler reads it: bucket b of a chunk at level t is
  #{edges < t} - 1 over f32(cfg_t_range) - 1e-7; `v2v_text_scales` (optional) replaces
  `text_scales` for videos with clean chunks (the demo samples continuations with less text
  guidance than caption-only videos)."""
  cfg_t_range: tuple = (0.0,)
  prev_chunk_scales: tuple = (1.0,)
  text_scales: tuple = (1.0,)
  v2v_text_scales: tuple | None = None

  def __post_init__(self):
    n = len(self.cfg_t_range)
    lists = {"prev_chunk_scales": self.prev_chunk_scales, "text_scales": self.text_scales}
    if self.v2v_text_scales is not None:
      lists["v2v_text_scales"] = self.v2v_text_scales
    if not n or any(len(v) != n for v in lists.values()):
      raise DistillConfigError(f"guidance: cfg_t_range has {n} entries; "
                               + ", ".join(f"{k} {len(v)}" for k, v in lists.items())
                               + " (they must all have the same, nonzero length)")
    if list(self.cfg_t_range) != sorted(self.cfg_t_range):
      raise DistillConfigError(f"guidance: cfg_t_range must be ascending, got "
                               f"{list(self.cfg_t_range)}")


def chunk_guidance_scales(t, guidance: Guidance, has_prefix=None):
  """(scale_prev, scale_text), each like t (per chunk): the sampler's bucket rule, traced."""
  t = jnp.asarray(t, F32)
  edges = jnp.asarray(np.asarray(guidance.cfg_t_range, np.float32) - np.float32(1e-7))
  b = jnp.maximum(jnp.sum(edges < t[..., None], axis=-1) - 1, 0)
  prev = jnp.asarray(guidance.prev_chunk_scales, F32)[b]
  text = jnp.asarray(guidance.text_scales, F32)[b]
  if guidance.v2v_text_scales is not None and has_prefix is not None:
    text = jnp.where(has_prefix, jnp.asarray(guidance.v2v_text_scales, F32)[b], text)
  return prev, text


@dataclasses.dataclass(frozen=True)
class DistillObjective:
  """What a distillation step needs besides the models: the base objective's geometry and
  conditioning (its caption dropout is not used), the step-size cycle, the teacher's
  guidance."""
  base: Objective
  cycle: tuple = shortcut.STEP_CYCLE
  guidance: Guidance = Guidance()

  def __post_init__(self):
    object.__setattr__(self, "cycle", shortcut.check_cycle(self.cycle))
    if self.base.prediction not in flow.PREDICTIONS:
      raise DistillConfigError(f"prediction {self.base.prediction!r} is not one of "
                               f"{flow.PREDICTIONS}")
    for s in self.cycle:
      if s != min(self.cycle) and s / 2 not in self.cycle:
        raise DistillConfigError(f"step size {s} is learnt from two steps of its half {s / 2}, "
                                 "which the cycle does not train")

  @property
  def chunk_width(self) -> int:
    return self.base.chunk_width

  def for_batch(self, batch) -> DistillObjective:
    if "image_rows" in batch:
      raise DistillConfigError("distillation trains on videos: set data.image_ratio=0 (the "
                               "prepared images have no teacher passes)")
    return self

  def loss(self, model, batch, key, step):
    self.for_batch(batch)
    return distill_loss(model, batch, key, step, self)


@dataclasses.dataclass
class _Rows:
  """The noised packed rows of one batch and everything a DiT call on them needs."""
  x_t: jax.Array
  t: jax.Array               # (N, K)
  y: jax.Array               # (N·K, L, C) caption rows (null where text_drop)
  m: jax.Array
  y_null: jax.Array
  m_null: jax.Array
  mask: ChunkMask
  frame_index: jax.Array
  frame_total: jax.Array
  tokens_per_chunk: int


def alone_segments(segment_ids):
  """Segment ids under which every real chunk is a video of its own (1, 2, ..., 0 padding)."""
  seg = jnp.asarray(segment_ids, jnp.int32)
  own = jnp.arange(1, seg.shape[1] + 1, dtype=jnp.int32)[None]
  return jnp.where(seg > 0, own, 0)


def image_frames(cond, segment_ids, frames_per_chunk: int):
  """(N, K·F) bool: the I2V image frames (a noisy chunk's frame that carries no loss)."""
  noisy = (jnp.asarray(segment_ids) > 0) & ~cond.clean
  return jnp.repeat(noisy, frames_per_chunk, axis=1) & (cond.frame_weight == 0)


def as_velocity(out, x, t, prediction: str, frames_per_chunk: int):
  """The velocity of a DiT output (what the sampler sees, `as_velocity_model`)."""
  if prediction == "velocity":
    return out.astype(F32)
  return flow.clean_to_velocity(out.astype(F32), x.astype(F32), flow.frame_t(t, frames_per_chunk))


def teacher_guided_velocity(teacher, rows: _Rows, seg, cond, obj: DistillObjective,
                            prediction: str):
  """The teacher's three-pass guided velocity of the rows, (N, C, K·F, h, w), stop-gradient."""
  N, K = rows.t.shape
  F = obj.chunk_width
  alone = alone_segments(seg)
  tf = rows.frame_index.shape[1] // K
  fi_alone, ft_alone = packed_frame_positions(alone, tf)
  null_y = jnp.broadcast_to(rows.y_null, rows.y.shape)
  null_m = jnp.broadcast_to(rows.m_null, rows.m.shape)
  ranges = jnp.concatenate([rows.mask.kv_ranges, rows.mask.kv_ranges,
                            packed_mask(alone, rows.tokens_per_chunk).kv_ranges])
  dropped = jnp.concatenate([cond.text_drop, jnp.ones_like(cond.text_drop),
                             jnp.ones_like(cond.text_drop)])
  x3 = jnp.concatenate([rows.x_t] * 3)
  t3 = jnp.concatenate([rows.t] * 3)
  out = teacher(x3, t3, jnp.concatenate([rows.y, null_y, null_y]),
                jnp.concatenate([rows.m, null_m, null_m]),
                ChunkMask(ranges, q_block=rows.tokens_per_chunk, layout="causal_segments"),
                caption_dropped=dropped, backend=obj.base.backend,
                frame_index=jnp.concatenate([rows.frame_index, rows.frame_index, fi_alone]),
                frame_total=jnp.concatenate([rows.frame_total, rows.frame_total, ft_alone])
                ).velocity
  v = as_velocity(out, x3, t3, prediction, F)
  v_text, v_prev, v_alone = v[:N], v[N:2 * N], v[2 * N:]
  has_prefix = _video_has_clean(seg, cond.clean)
  s_p, s_t = chunk_guidance_scales(rows.t, obj.guidance, has_prefix)
  per_frame = lambda a: jnp.repeat(a, F, axis=1)[:, None, :, None, None]
  return jax.lax.stop_gradient(
      shortcut.guided_velocity(v_text, v_prev, v_alone, per_frame(s_p), per_frame(s_t)))


def _video_has_clean(seg, clean):
  """(N, K) bool: the chunk's video has clean chunks (a continuation)."""
  return jnp.any(same_segment(seg) & clean[:, None, :], axis=2)


def student_output(dit, rows: _Rows, x, t, s, cond, obj: DistillObjective):
  """The student's raw output at step size s on (x, t) with the rows' captions and mask."""
  return dit(x, t, rows.y, rows.m, rows.mask, caption_dropped=cond.text_drop,
             step_size=shortcut.embedded_step_size(s), backend=obj.base.backend,
             frame_index=rows.frame_index, frame_total=rows.frame_total).velocity


def rows_for(model, batch, cond, x_t, obj: DistillObjective) -> _Rows:
  """The DiT inputs of the noised rows for `model` (a TrainModel: its own caption rows)."""
  dit = model.dit
  seg = batch["segment_ids"]
  F = obj.chunk_width
  tokens_per_chunk, token_frames = row_geometry(dit, x_t, seg, F)
  y, m = caption_rows(model, batch, cond, obj.base.special)
  null = dit.y_embedder.null_caption_embedding[...].astype(F32)
  null_m = (jnp.arange(y.shape[1]) < NULL_CAPTION_VALID).astype(F32)
  frame_index, frame_total = packed_frame_positions(seg, token_frames)
  return _Rows(x_t, cond.t, y, m, null[None], null_m[None], packed_mask(seg, tokens_per_chunk),
               frame_index, frame_total, tokens_per_chunk)


def distill_loss(model, batch, key, step, obj: DistillObjective):
  """(loss, aux) of one distillation step; `model` is a TrainModel (the student DiT and text
  path) whose `teacher` is the frozen base TrainModel."""
  teacher = getattr(model, "teacher", None)
  if teacher is None:
    raise DistillConfigError("distillation needs the TrainModel's teacher")
  if not model.dit.distill:
    raise DistillConfigError("the student must be a distilled DiT (VideoDiT(distill=True))")
  prediction = obj.base.prediction
  x1 = batch["x1"].astype(F32)
  seg = batch["segment_ids"]
  F = obj.chunk_width
  k_cond, k_noise = jax.random.split(key)
  cond_cfg = dataclasses.replace(obj.base.conditioning, text_dropout=0.0)
  cond = sample_conditioning(k_cond, seg, F, cond_cfg)
  x0 = jax.random.normal(k_noise, x1.shape, F32)
  x_t = flow.interpolate(x0, x1, cond.frame_t)
  rows = rows_for(model, batch, cond, x_t, obj)

  s = shortcut.step_size_at(step, obj.cycle)
  smallest = jnp.asarray(min(obj.cycle), F32)

  def from_teacher():
    return teacher_guided_velocity(teacher.dit, rows_for(teacher, batch, cond, x_t, obj), seg,
                                   cond, obj, prediction)

  g, state = nnx.split(model)
  still = nnx.merge(g, jax.lax.stop_gradient(state))       # the student, no gradient

  def self_consistency():
    # The student's own rows, without gradient (its text path is not run a second time).
    still_rows = dataclasses.replace(rows, y=jax.lax.stop_gradient(rows.y),
                                     m=jax.lax.stop_gradient(rows.m))

    def velocity(x, t, size):
      out = student_output(still.dit, still_rows, x, t, size, cond, obj)
      return as_velocity(out, x, t, prediction, F)
    return shortcut.self_consistency_target(velocity, x_t, cond.t, s / 2, clean=cond.clean,
                                            hold_frames=image_frames(cond, seg, F))

  if len(set(obj.cycle)) == 1:
    target = from_teacher()
  else:
    target = jax.lax.cond(s <= smallest, from_teacher, self_consistency)

  out = student_output(model.dit, rows, x_t, cond.t, s, cond, obj).astype(F32)
  if prediction == "velocity":
    err = out - target
  else:                        # compare implied clean samples: the velocity error x (1 - t)
    one_minus_t = jnp.maximum(1.0 - flow.frame_t(cond.t, F), flow.MIN_ONE_MINUS_T)
    err = out - (x_t + one_minus_t[:, None, :, None, None] * target)
  per_frame = jnp.mean(jnp.square(err), axis=(1, 3, 4))
  loss = flow.weighted_mean(per_frame, cond.frame_weight)
  sums, counts = chunk_losses(per_frame, cond.frame_weight, cond.t, F)
  aux = {"bucket_loss_sum": sums, "bucket_count": counts,
         "noisy_frames": jnp.sum(cond.frame_weight),
         "tokens": jnp.sum(seg > 0) * rows.tokens_per_chunk, "step_size": s}
  return loss, aux
