"""The official DiT call format, mapped onto the JAX-native `VideoDiT`.

The official `VideoDiTModel.forward` (inference/model/dit/dit_model.py) takes absolute,
element-major `kv_range` rows, a `slice_point` (the call's first chunk, earlier chunks come
from the cache) and a caption-dropout flag that selects the adaLN null row. `official_forward`
checks those inputs, turns them into the core's `ChunkMask` (ranges inside each element's own
[cache; current] keys), `first_chunk` and `caption_dropped`, and calls the model.
`jit_forward(model)` is the same behind one compiled function per input shape, with the
checks on the host first; the parity command, the converter's checks and the tests use it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.attention import ChunkMask
from magi_jax.models.dit import InputError, VideoDiT, check_cache, check_latents
from magi_jax.models.kv_cache import KVCache
from magi_jax.models.rope import rope_table


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def local_ranges(kv_range, N: int, chunks: int, S: int, slice_point, n_cache: int):
  """Official kv ranges (N·chunks, 2) -> ranges inside each element's own [cache; current] keys.

  Official ranges are absolute token positions from the start of the video (the official cache
  starts at chunk 0), and for N > 1 element b's keys start at
  b·(slice_point·tokens_per_chunk + S). The core's key sequence starts at
  slice_point·tokens_per_chunk - n_cache (the cache holds only the chunks the ranges need).
  """
  tokens_per_chunk = S // chunks
  elem = np.arange(N * chunks) // chunks
  xp = np if isinstance(kv_range, np.ndarray) else jnp
  cache_start = slice_point * tokens_per_chunk - n_cache
  per_elem = slice_point * tokens_per_chunk + S
  return kv_range - (xp.asarray(elem) * per_elem)[:, None] - cache_start


def _squeeze_rows(y, xattn_mask):
  """The official (N·chunks, 1, L, C) / (N·chunks, 1, L) rows without their singleton axis."""
  return (y[:, 0] if y.ndim == 4 else y), (xattn_mask[:, 0] if xattn_mask.ndim == 3
                                           else xattn_mask)


def check_official_inputs(model: VideoDiT, x, t, y, xattn_mask, kv_range,
                          caption_dropout_mask=None, *, slice_point=0, chunk_width=None,
                          step_size=None, cache: KVCache | None = None):
  """Raises InputError naming the problem in the official call's terms; kv ranges are checked
  when they are concrete. The core's own checks (`VideoDiT.check_inputs`) follow in the call."""
  cfg = model.cfg
  y, xattn_mask = _squeeze_rows(y, xattn_mask)
  N, T, H, W, chunks = check_latents(model, x, t, step_size)
  p, pt = cfg.patch_size, cfg.t_patch_size
  if chunk_width is not None and chunk_width * chunks != T:
    raise InputError(f"chunk_width {chunk_width} x {chunks} chunks != {T} latent frames")
  if y.shape[0] != N * chunks or y.shape[-1] != cfg.caption_channels:
    raise InputError(f"y must have N*chunks = {N * chunks} rows of {cfg.caption_channels} "
                     f"channels, got {y.shape}")
  if xattn_mask.shape[0] != N * chunks or xattn_mask.shape[-1] != y.shape[-2]:
    raise InputError(f"xattn_mask {xattn_mask.shape} does not match y {y.shape}")
  if tuple(kv_range.shape) != (N * chunks, 2):
    raise InputError(f"kv_range must be (N*chunks, 2) = ({N * chunks}, 2), got "
                     f"{kv_range.shape}")
  if caption_dropout_mask is not None and not (
      np.size(caption_dropout_mask) in (1, N)
      or tuple(np.shape(caption_dropout_mask)) == (N, chunks)):
    raise InputError(f"caption_dropout_mask must have 1 or N={N} entries, or one per chunk "
                     f"({N}, {chunks}), got shape {np.shape(caption_dropout_mask)}")
  S = (T // pt) * (H // p) * (W // p)
  check_cache(cfg, cache, N, S // chunks)
  n_cache = 0 if cache is None else cache.num_tokens
  if all(_is_concrete(a) for a in (kv_range, slice_point)):
    local = local_ranges(np.asarray(kv_range), N, chunks, S, int(slice_point), n_cache)
    lo, hi = int(local.min()), int(local.max())
    if lo < 0 or hi > n_cache + S or np.any(local[:, 0] > local[:, 1]):
      raise InputError(
          f"kv_range {np.asarray(kv_range).tolist()} reaches keys outside [cache; current] "
          f"(in local units [{lo}, {hi}) vs {n_cache} cached + {S} current tokens, "
          f"slice_point {int(slice_point)}): pass a cache that covers the chunks the ranges "
          "need")


def official_forward(model: VideoDiT, x, t, y, xattn_mask, kv_range, caption_dropout_mask=None,
                     *, slice_point=0, chunk_width: int | None = None, step_size=None,
                     cache: KVCache | None = None, backend: str = "auto",
                     return_kv: bool = False, return_activations: bool = False,
                     frame_index=None, frame_total=None, self_mask_layout: str = "general"):
  """One official `VideoDiTModel.forward`.

  Args:
    x: (N, C_lat, T, H, W) latents of the call's chunks.
    t: (N, chunks) timesteps, 0 = noise, 1 = clean.
    y: (N*chunks, [1,] L, C) caption rows; xattn_mask (N*chunks, [1,] L) valid tokens.
    kv_range: (N*chunks, 2) official key-token ranges: absolute positions from the start
      of the video, element-major for N > 1 (element b's keys start at
      b·range_num·tokens_per_chunk).
    caption_dropout_mask: (N,) or (1,) bool, or (N, chunks) per chunk; True selects the
      adaLN row of the caption-dropped pass (`caption_dropped` of the core).
    slice_point: index of the call's first chunk (earlier chunks come from `cache`).
    chunk_width: latent frames per chunk, checked against T / chunks when given.
    self_mask_layout: the static `ChunkMask.layout` promise about the ranges.
    The rest as `VideoDiT.__call__`.
  """
  kv_range = jnp.asarray(kv_range) if _is_concrete(kv_range) else kv_range
  check_official_inputs(model, x, t, y, xattn_mask, kv_range, caption_dropout_mask,
                        slice_point=slice_point, chunk_width=chunk_width, step_size=step_size,
                        cache=cache)
  y, xattn_mask = _squeeze_rows(y, xattn_mask)
  cfg = model.cfg
  N, _, T, H, W = x.shape
  chunks = t.shape[1]
  S = (T // cfg.t_patch_size) * (H // cfg.patch_size) * (W // cfg.patch_size)
  n_cache = 0 if cache is None else cache.num_tokens
  local = local_ranges(kv_range, N, chunks, S, slice_point, n_cache)
  mask = ChunkMask(jnp.clip(local, 0, n_cache + S).reshape(N, chunks, 2).astype(jnp.int32),
                   q_block=S // chunks, layout=self_mask_layout)
  return model(x, t, y, xattn_mask, mask, caption_dropped=caption_dropout_mask,
               first_chunk=slice_point, frame_index=frame_index, frame_total=frame_total,
               step_size=step_size, cache=cache, backend=backend, return_kv=return_kv,
               return_activations=return_activations)


def jit_forward(model: VideoDiT, *, backend: str = "auto", return_kv: bool = False,
                return_activations: bool = False):
  """`official_forward` as one compiled function per input shape, inputs checked on the host.

  `slice_point` and `step_size` are traced, so calls that differ only in them reuse the
  compiled function. The parameters are captured now: updating the model afterwards
  (`nnx.update`, an optimizer step) is not seen by this forward; make a new one.
  """
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("chunk_width",))
  def compiled(state, x, t, y, mask, kv_range, drop, slice_point, step_size, cache, chunk_width):
    return official_forward(nnx.merge(graphdef, state), x, t, y, mask, kv_range, drop,
                            slice_point=slice_point, chunk_width=chunk_width,
                            step_size=step_size, cache=cache, backend=backend,
                            return_kv=return_kv, return_activations=return_activations)

  def prepare(x, t, y, xattn_mask, kv_range, caption_dropout_mask=None, *, slice_point=0,
              chunk_width=None, step_size=None, cache=None):
    """Validates the inputs; returns the argument tuple of `compiled`."""
    check_official_inputs(model, x, t, y, xattn_mask, kv_range, caption_dropout_mask,
                          slice_point=slice_point, chunk_width=chunk_width,
                          step_size=step_size, cache=cache)
    if caption_dropout_mask is None:
      caption_dropout_mask = jnp.zeros((1,), bool)
    step = None if step_size is None else jnp.asarray(step_size, jnp.float32)
    return (state, jnp.asarray(x), jnp.asarray(t, jnp.float32), jnp.asarray(y),
            jnp.asarray(xattn_mask), jnp.asarray(kv_range, jnp.int32),
            jnp.asarray(caption_dropout_mask, bool), jnp.asarray(slice_point, jnp.int32),
            step, cache, chunk_width)

  def call(*args, **kwargs):
    return compiled(*prepare(*args, **kwargs))

  call.compiled = compiled
  call.prepare = prepare
  return call


def rope_for_call(model: VideoDiT, frames: int, height: int, width: int, slice_point: int,
                  chunk_width: int):
  """The official `rope.get_embed` table ([sin | cos], (S, 6·nb)) for a call; a debug aid."""
  sin, cos = rope_table(model.rope_bands[...], frames, height, width,
                        frame_offset=slice_point * chunk_width // model.cfg.t_patch_size)
  return jnp.concatenate([sin, cos], axis=-1)
