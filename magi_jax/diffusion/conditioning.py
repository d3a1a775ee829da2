"""What each training video conditions on: clean chunks, noise levels, text dropout.

T2V, I2V and V2V are one task that differs in how much of the video is clean (MAGI-1
report, arXiv 2505.13211). Per video (segment) of a packed row, with probabilities from
`ConditioningConfig` (the report leaves them open; our defaults below):

* V2V: the first n chunks are clean, n uniform in [1, length - 1] (videos of one chunk fall
  back to T2V);
* I2V: only the first latent frame of the first chunk is clean (the sampler writes the image
  into that frame at every step, with the chunk's own noisy t);
* T2V: nothing is clean.

Clean chunks and the image frame get up to 5% noise (t ~ U[clean_t_min, 1]), no text (the
null caption rows and the dropped adaLN row, as the sampler's cache-writing pass sees them),
and no loss; they still get gradients through the keys and values the noisy chunks read.
Noisy chunks get their levels in one of two ways (`levels`; the report leaves it open):

* "sorted" (default): independent `timesteps.sample_t` draws, sorted per video so earlier
  chunks are cleaner;
* "staggered": the states of the sampler's window (`timesteps.staggered_t`): one position on
  the denoising grid per video, each later noisy chunk `stagger` grid units behind the one
  before (1 / window_size is what a window of that size visits), mapped to levels by the
  shift `t_shift` (1/3 is the sampler's sd3 shift 3). Unlike sorting, the first noisy chunk is
  as often at pure noise as at any other grid position, which is where a continuation decides
  where its objects are: measured on the bouncing demo, sorted levels leave that case so rare
  (the first noisy chunk is the cleanest of up to three draws) that the model ignores the clean
  prefix at high noise.

Either way noisy chunks are never cleaner than the video's clean chunks. Text dropout (null
caption for classifier-free guidance) is drawn per video.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from magi_jax.diffusion import timestep_sampling as timesteps
from magi_jax.diffusion.segments import per_segment, segment_layout

F32 = jnp.float32
LEVELS = ("sorted", "staggered")


@dataclasses.dataclass(frozen=True)
class ConditioningConfig:
  p_v2v: float = 0.3
  p_i2v: float = 0.2            # the rest is T2V
  clean_t_min: float = 0.95     # clean chunks: up to 5% noise
  text_dropout: float = 0.1
  t_mean: float = 0.0
  t_std: float = 0.5
  t_shift: float = 1.0 / 3.0
  levels: str = "sorted"        # or "staggered" (module docstring; it ignores t_mean, t_std)
  stagger: float = 0.5          # "staggered": grid units between consecutive noisy chunks

  def __post_init__(self):
    for name in ("p_v2v", "p_i2v", "text_dropout"):
      v = getattr(self, name)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"conditioning.{name} must be in [0, 1], got {v}")
    if self.p_v2v + self.p_i2v > 1.0:
      raise ValueError(f"conditioning.p_v2v + p_i2v = {self.p_v2v + self.p_i2v} exceeds 1")
    if not 0.0 < self.clean_t_min <= 1.0:
      raise ValueError(f"conditioning.clean_t_min must be in (0, 1], got {self.clean_t_min}")
    if not (self.t_std > 0 and 0 < self.t_shift):
      raise ValueError(f"conditioning.t_std and t_shift must be > 0, got {self.t_std}, "
                       f"{self.t_shift}")
    if self.levels not in LEVELS:
      raise ValueError(f"conditioning.levels must be one of {LEVELS}, got {self.levels!r}")
    if not 0.0 < self.stagger <= 1.0:
      raise ValueError(f"conditioning.stagger must be in (0, 1], got {self.stagger}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Conditioning:
  t: jax.Array             # (N, K) float32: each chunk's level (timestep embedding)
  clean: jax.Array         # (N, K) bool: whole clean chunks (V2V prefix)
  text_drop: jax.Array     # (N, K) bool: null caption + dropped adaLN row
  frame_t: jax.Array       # (N, K·F) float32: the level mixed into each latent frame
  frame_weight: jax.Array  # (N, K·F) float32: 1 where the loss counts


def sample_conditioning(key, segment_ids, frames_per_chunk: int,
                        cfg: ConditioningConfig = ConditioningConfig()) -> Conditioning:
  seg = jnp.asarray(segment_ids, jnp.int32)
  N, K = seg.shape
  F = frames_per_chunk
  real = seg > 0
  index, start, length = segment_layout(seg)
  k_task, k_n, k_t, k_clean, k_img, k_text = jax.random.split(key, 6)

  u_task = per_segment(jax.random.uniform(k_task, (N, K)), start)
  v2v = (u_task < cfg.p_v2v) & (length > 1)
  i2v = (u_task >= cfg.p_v2v) & (u_task < cfg.p_v2v + cfg.p_i2v)
  u_n = per_segment(jax.random.uniform(k_n, (N, K)), start)
  n_clean = jnp.where(v2v, 1 + jnp.floor(u_n * (length - 1)).astype(jnp.int32), 0)
  clean = real & (index < n_clean)

  t_clean = jax.random.uniform(k_clean, (N, K), F32, cfg.clean_t_min, 1.0)
  if cfg.levels == "staggered":
    grid = per_segment(jax.random.uniform(k_t, (N, K), F32), start)
    t_noisy = timesteps.staggered_t(grid, index - n_clean, cfg.stagger, shift_w=cfg.t_shift)
    t = jnp.where(clean, t_clean, t_noisy)
  else:
    t_noisy = timesteps.sample_t(k_t, (N, K), mean=cfg.t_mean, std=cfg.t_std,
                                 shift_w=cfg.t_shift)
    # Clean chunks sort first (key + 2), then noisy ones, each group in descending order.
    key_ = jnp.where(clean, 2.0 + t_clean, t_noisy)
    t = timesteps.sort_desc_within_segments(key_, seg)
    t = jnp.where(t >= 2.0, t - 2.0, t)
  t = timesteps.cummin_within_segments(t, seg)
  t = jnp.where(real, t, 0.0)

  t_img = jax.random.uniform(k_img, (N, K), F32, cfg.clean_t_min, 1.0)
  image = real & i2v & (index == 0)                                  # chunk holding the image
  ft = jnp.repeat(t, F, axis=1)
  first = (jnp.arange(K * F) % F == 0)[None, :]
  image_frame = jnp.repeat(image, F, axis=1) & first
  ft = jnp.where(image_frame, jnp.repeat(t_img, F, axis=1), ft)

  weight = jnp.repeat(real & ~clean, F, axis=1) & ~image_frame
  drop = per_segment(jax.random.uniform(k_text, (N, K)), start) < cfg.text_dropout
  text_drop = real & (drop | clean)
  return Conditioning(t=t.astype(F32), clean=clean, text_drop=text_drop, frame_t=ft.astype(F32),
                      frame_weight=weight.astype(F32))
