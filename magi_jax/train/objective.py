"""The training loss of one batch of packed rows: conditioning, noising, one DiT call, loss.

Inputs (a batch dict, as the trainer feeds it):
  x1           (N, C, K·chunk_width, h, w) float32  clean latents (or pixels in [-1, 1])
  segment_ids  (N, K) int32                         videos of each packed row, 0 = padding
  text: either text_tokens (N, K, L) int32 + text_mask (N, K, L), encoded by the model's
        `text_encoder`, or text_emb (N, K, L, C) float + text_mask (precomputed T5 rows).
  image_rows   (N,) int32, only in a batch of images (`Objective.for_batch`): each chunk is
               one image, one latent frame wide, trained as T2V (MAGI-1: an image is a
               one-frame video).

The whole row goes through the DiT in one call with block-causal attention per video, so
clean chunks get gradients through the keys and values that later noisy chunks read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from magi_jax.text.rows import NULL_CAPTION_VALID, TokenHead
from magi_jax.diffusion import flow
from magi_jax.diffusion.conditioning import ConditioningConfig, sample_conditioning
from magi_jax.attention import ChunkMask
from magi_jax.diffusion.segments import packed_frame_positions, packed_kv_ranges, segment_layout
from magi_jax.train.own_context import OwnContext, own_context_batch

F32 = jnp.float32
T_BUCKETS = (0.0, 0.1, 0.3, 0.6, 1.0)     # per-level loss in TensorBoard: [0, .1), [.1, .3), ...


class TrainModel(nnx.Module):
  """What a training step runs: the DiT, for the demo a small text encoder, and when
  distilling the frozen teacher DiT (which parts the optimizer trains is the trainer's
  filter)."""

  def __init__(self, dit, text_encoder=None, teacher=None):
    self.dit = dit
    self.text_encoder = text_encoder
    self.teacher = teacher            # distillation: the frozen base DiT (train/distill.py)


@dataclasses.dataclass(frozen=True)
class Objective:
  chunk_width: int                                   # latent frames per chunk
  conditioning: ConditioningConfig = ConditioningConfig()
  prediction: str = "velocity"
  backend: str = "auto"
  special: TokenHead | None = None     # special tokens before precomputed caption rows
  own_context: OwnContext = OwnContext()   # condition on the model's own estimates (off)

  def __post_init__(self):
    flow.check_prediction(self.prediction)

  def for_batch(self, batch) -> Objective:
    """The objective of this batch: for a batch of images ("image_rows", packed one-frame
    chunks) chunks one frame wide and no clean prefix (no V2V or I2V: one frame has nothing
    to continue from); else itself. Decided by the batch's keys, so it is static under jit."""
    if "image_rows" not in batch:
      return self
    cond = dataclasses.replace(self.conditioning, p_v2v=0.0, p_i2v=0.0)
    return dataclasses.replace(self, chunk_width=1, conditioning=cond, own_context=OwnContext())

  def loss(self, model, batch, key, step):
    """(loss, aux) of one training step (`step` only gates `own_context.from_step`)."""
    return training_loss(model, batch, key, self.for_batch(batch), step)


def with_token_head(emb, mask, segment_ids, head: TokenHead):
  """Precomputed rows (N·K, L, C) / masks with `head` in front of every chunk's caption, the
  length kept (as sampling builds a noisy chunk's row: `text.rows.ChunkTextRows.cond`)."""
  NK, L, C = emb.shape
  P = head.rows.shape[0]
  if P == 0:
    return emb, mask
  rows = jnp.broadcast_to(jnp.asarray(head.rows, F32)[None], (NK, P, C))
  if head.duration_at >= 0:
    index, _, length = segment_layout(segment_ids)
    k = jnp.clip(length - index, 1, 8).reshape(-1) - 1
    rows = rows.at[:, head.duration_at].set(jnp.asarray(head.durations, F32)[k])
  emb = jnp.concatenate([rows, emb], axis=1)[:, :L]
  mask = jnp.concatenate([jnp.ones((NK, P), mask.dtype), mask], axis=1)[:, :L]
  return emb, mask


def caption_rows(model: TrainModel, batch, cond, head: TokenHead | None = None):
  """(N·K, L, C) rows and (N·K, L) masks: captions (precomputed T5 rows with `head`'s special
  tokens in front), or the null caption where text is off."""
  if "text_tokens" in batch:
    if model.text_encoder is None:
      raise ValueError("the batch has text_tokens but the model has no text_encoder")
    ids = batch["text_tokens"]
    N, K, L = ids.shape
    emb, mask = model.text_encoder(ids.reshape(N * K, L), batch["text_mask"].reshape(N * K, L))
  else:
    N, K, L, C = batch["text_emb"].shape
    emb = batch["text_emb"].reshape(N * K, L, C).astype(F32)
    mask = batch["text_mask"].reshape(N * K, L).astype(F32)
    if head is not None:
      emb, mask = with_token_head(emb, mask, batch["segment_ids"], head)
  null = model.dit.y_embedder.null_caption_embedding[...].astype(F32)
  if null.shape != emb.shape[1:]:
    raise ValueError(f"caption rows {emb.shape[1:]} do not match the DiT's null caption "
                     f"{null.shape} (caption_max_length, caption_channels)")
  null_mask = (jnp.arange(L) < NULL_CAPTION_VALID).astype(F32)
  off = cond.text_drop.reshape(-1)[:, None]
  y = jnp.where(off[:, :, None], null[None], emb)
  m = jnp.where(off, null_mask[None], mask)
  return y, m


def chunk_losses(per_frame, frame_weight, t, chunk_width: int):
  """Per-level loss sums and counts over T_BUCKETS (noisy chunks only)."""
  N, K = t.shape
  sq = jnp.sum((per_frame * frame_weight).reshape(N, K, chunk_width), axis=2)
  n = jnp.sum(frame_weight.reshape(N, K, chunk_width), axis=2)
  edges = jnp.asarray(T_BUCKETS, F32)
  b = jnp.clip(jnp.searchsorted(edges, t, side="right") - 1, 0, len(T_BUCKETS) - 2)
  onehot = jax.nn.one_hot(b, len(T_BUCKETS) - 1) * (n > 0)[..., None]
  sums = jnp.einsum("nk,nkb->b", sq / jnp.maximum(n, 1.0), onehot)
  return sums, jnp.sum(onehot, axis=(0, 1))


def training_loss(model: TrainModel, batch, key, obj: Objective, step=None):
  """Returns (loss, aux): the flow-matching loss over the noisy frames of the batch."""
  x1 = batch["x1"]
  k_cond, k_noise = jax.random.split(key)
  cond = sample_conditioning(k_cond, batch["segment_ids"], obj.chunk_width, obj.conditioning)
  x0 = jax.random.normal(k_noise, x1.shape, F32)
  if obj.own_context.on:      # its own key: the draws above are those of a run without it
    batch = own_context_batch(model, batch, cond, jax.random.fold_in(key, 2), obj, step)
  return loss_given(model, batch, cond, x0, obj)


def row_geometry(dit, x, segment_ids, chunk_width: int) -> tuple[int, int]:
  """(tokens_per_chunk, token frames per chunk) of packed rows x (N, C, K·chunk_width, h, w)."""
  T, h, w = x.shape[2:]
  K = segment_ids.shape[1]
  if T != K * chunk_width:
    raise ValueError(f"x1 has {T} latent frames; {K} chunks of {chunk_width} need "
                     f"{K * chunk_width}")
  p, pt = dit.cfg.patch_size, dit.cfg.t_patch_size
  if chunk_width % pt:
    raise ValueError(f"chunk_width {chunk_width} is not a multiple of t_patch_size {pt}")
  return (chunk_width // pt) * (h // p) * (w // p), chunk_width // pt


def packed_mask(segment_ids, tokens_per_chunk: int) -> ChunkMask:
  """Each chunk sees [its video's first token, its own end): causal segments."""
  return ChunkMask(packed_kv_ranges(segment_ids, tokens_per_chunk), q_block=tokens_per_chunk,
                   layout="causal_segments")


def velocity_of_row(model: TrainModel, batch, cond, x0, obj: Objective):
  """The DiT output for noised packed rows: (N, C, K·chunk_width, h, w)."""
  x1 = batch["x1"].astype(F32)
  seg = batch["segment_ids"]
  dit = model.dit
  tokens_per_chunk, token_frames = row_geometry(dit, x1, seg, obj.chunk_width)
  x_t = flow.interpolate(x0, x1, cond.frame_t)
  y, m = caption_rows(model, batch, cond, obj.special)
  frame_index, frame_total = packed_frame_positions(seg, token_frames)
  out = dit(x_t, cond.t, y, m, packed_mask(seg, tokens_per_chunk), caption_dropped=cond.text_drop,
            backend=obj.backend, frame_index=frame_index, frame_total=frame_total).velocity
  return out, tokens_per_chunk


def loss_given(model: TrainModel, batch, cond, x0, obj: Objective):
  """The loss for given conditioning and noise (packed == unpacked is tested through this)."""
  x1 = batch["x1"].astype(F32)
  out, tokens_per_chunk = velocity_of_row(model, batch, cond, x0, obj)
  per_frame = flow.per_frame_sq_error(out, x0, x1, obj.prediction)
  loss = flow.weighted_mean(per_frame, cond.frame_weight)
  sums, counts = chunk_losses(per_frame, cond.frame_weight, cond.t, obj.chunk_width)
  aux = {"bucket_loss_sum": sums, "bucket_count": counts,
         "noisy_frames": jnp.sum(cond.frame_weight),
         "tokens": jnp.sum(batch["segment_ids"] > 0) * tokens_per_chunk}
  return loss, aux
