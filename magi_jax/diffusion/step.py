"""One sampler step as a single jitted function: the guided velocity and the Euler update.

Inputs are the call's chunks (the refresh chunk first when there is one), already padded with
the prefix latents. Guidance (official inference/pipeline/video_generate.py):

* cfg 3: pass A (text rows, adaLN row -2) and pass B (null rows, adaLN row -1) share x, t, kv
  ranges and the cache and run as one batch of two; pass C runs each denoised chunk alone (its
  own batch element, no cache, null rows, time positions from 0). Per chunk,
  v = (1 - s_p)·C + (s_p - s_t)·B + s_t·A. The refresh chunk's K/V comes from pass B.
* cfg 1: one pass with the text rows (adaLN row -2) that also yields the refresh K/V. With
  `nearly_clean`, a copy of the oldest denoised chunk that sees only itself is appended and
  v_oldest = w·v_oldest + (1 - w)·v_copy (w = 0.7 officially).

The step compiles once per distinct (chunks in the call, refresh?, cached tokens, nearly_clean,
guidance, self-attention ranges) combination; `slice_point`, t, dt, scales and step size are
traced. The self-attention ranges inside [cache; current] are fixed by the window plan, so
`step` passes them as static values (`local_ranges`): kernels whose mask must be known at
trace time (splash on TPU) then compute the exact mask, and the refresh pass returns only the
refresh chunk's keys / values (`kv_tokens`), not every layer's K/V of the whole call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.models.kv_cache import KVCache

F32 = jnp.float32


def _split_chunks(x, n, cw):
  """(1, C, n·cw, H, W) -> (n, C, cw, H, W)."""
  _, c, _, h, w = x.shape
  return jnp.transpose(x.reshape(c, n, cw, h, w), (1, 0, 2, 3, 4))


def _join_chunks(x):
  """(n, C, cw, H, W) -> (1, C, n·cw, H, W)."""
  n, c, cw, h, w = x.shape
  return jnp.transpose(x, (1, 0, 2, 3, 4)).reshape(1, c, n * cw, h, w)


def make_step(model, *, backend: str = "auto"):
  """Returns `step(**inputs) -> (x_next, v, refresh_kv)` over a snapshot of `model`'s params."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("cfg_number", "refresh", "nearly_clean",
                                               "chunk_width", "local_ranges"))
  def compiled(state, x, t, dt, y_cond, m_cond, y_null, m_null, kv_range, slice_point, cache,
               scale_prev, scale_text, blend, step_size, *, cfg_number, refresh, nearly_clean,
               chunk_width, local_ranges=None):
    m = nnx.merge(graphdef, state)
    cw = chunk_width
    drn = t.shape[0]
    d = drn - int(refresh)
    tok = (x.shape[3] // m.cfg.patch_size) * (x.shape[4] // m.cfg.patch_size) * (
        cw // m.cfg.t_patch_size)
    call = functools.partial(m, chunk_width=cw, step_size=step_size, backend=backend,
                             kv_tokens=tok)
    n_cache = 0 if cache is None else cache.num_tokens
    local = None if local_ranges is None else np.asarray(local_ranges, np.int32)   # (drn, 2)
    # Pass C (each chunk alone) has static ranges too, given with the host's `local_ranges`.
    own = None if local is None else np.tile(np.array([[[0, tok]]], np.int32), (d, 1, 1))
    if cfg_number == 3:
      x2 = jnp.concatenate([x, x], axis=0)
      t2 = jnp.stack([t, t])
      y2 = jnp.concatenate([y_cond, jnp.broadcast_to(y_null, y_cond.shape)], axis=0)
      m2 = jnp.concatenate([m_cond, jnp.broadcast_to(m_null, m_cond.shape)], axis=0)
      kv2 = jnp.concatenate([kv_range, kv_range + (slice_point + drn) * tok], axis=0)
      # Both passes read the same cache (batch 1, broadcast per layer inside the DiT).
      out = call(x2, t2, y2, m2, kv2, jnp.array([False, True]), slice_point=slice_point,
                 cache=cache, return_kv=refresh,
                 self_ranges=None if local is None else np.stack([local, local]))
      cond_text, cond_pre = out.velocity[:1], out.velocity[1:]
      noisy = _split_chunks(x[:, :, (drn - d) * cw:], d, cw)
      t_noisy = t[drn - d:]
      y_c = jnp.broadcast_to(y_null, (d,) + y_null.shape[1:])
      m_c = jnp.broadcast_to(m_null, (d,) + m_null.shape[1:])
      kv_own = jnp.asarray(np.arange(d)[:, None] * tok + np.array([0, tok]), jnp.int32)
      uncond = call(noisy, t_noisy[:, None], y_c, m_c, kv_own, jnp.array([True]), slice_point=0,
                    self_ranges=own).velocity
      uncond = _join_chunks(uncond)
      sp_ = jnp.repeat(scale_prev, cw)[None, None, :, None, None]
      st_ = jnp.repeat(scale_text, cw)[None, None, :, None, None]
      off = (drn - d) * cw
      v = ((1 - sp_) * uncond + (sp_ - st_) * cond_pre[:, :, off:]
           + st_ * cond_text[:, :, off:])
      kv = None if not refresh else KVCache(out.kv.k[:, 1:2], out.kv.v[:, 1:2])
    else:
      xs, ts, ys, ms, kvs = x, t, y_cond, m_cond, kv_range
      rng = local
      if nearly_clean:
        o = drn - d                                   # the oldest denoised chunk
        xs = jnp.concatenate([x, x[:, :, o * cw:(o + 1) * cw]], axis=2)
        ts = jnp.concatenate([t, t[o:o + 1]])
        ys = jnp.concatenate([y_cond, y_cond[o:o + 1]])
        ms = jnp.concatenate([m_cond, m_cond[o:o + 1]])
        end = (slice_point + drn) * tok
        kvs = jnp.concatenate([kv_range, jnp.stack([end, end + tok])[None].astype(jnp.int32)])
        if rng is not None:                          # the copy sees only itself
          own_end = n_cache + drn * tok
          rng = np.concatenate([rng, np.array([[own_end, own_end + tok]], np.int32)])
      out = call(xs, ts[None], ys, ms, kvs, jnp.array([False]), slice_point=slice_point,
                 cache=cache, return_kv=refresh, self_ranges=None if rng is None else rng[None])
      vel = out.velocity
      if nearly_clean:
        o = drn - d
        mixed = vel[:, :, o * cw:(o + 1) * cw] * blend + vel[:, :, drn * cw:] * (1 - blend)
        vel = jnp.concatenate([vel[:, :, :o * cw], mixed, vel[:, :, (o + 1) * cw:drn * cw]], axis=2)
      v = vel[:, :, (drn - d) * cw:]
      kv = None if not refresh else KVCache(out.kv.k, out.kv.v)
    x_noisy = x[:, :, (drn - d) * cw:]
    x_next = x_noisy + v * jnp.repeat(dt, cw)[None, None, :, None, None]
    return x_next, v, kv

  def step(**kw):
    if "local_ranges" not in kw:
      kw["local_ranges"] = local_self_ranges(model, kw["x"], kw["kv_range"], kw["slice_point"],
                                             kw["cache"], kw["chunk_width"])
    return compiled(state, **kw)

  step.compiled = compiled
  return step


def local_self_ranges(model, x, kv_range, slice_point, cache, chunk_width: int):
  """The call's self-attention ranges inside its own [cache; current] keys, as a static
  tuple ((lo, hi), ...) per chunk: the official absolute ranges shifted by where the cache
  starts (it holds the chunks right before `slice_point`)."""
  p, pt = model.cfg.patch_size, model.cfg.t_patch_size
  tok = (x.shape[3] // p) * (x.shape[4] // p) * (chunk_width // pt)
  n_cache = 0 if cache is None else cache.num_tokens
  local = np.asarray(kv_range, np.int64) - (int(slice_point) * tok - n_cache)
  return tuple((int(lo), int(hi)) for lo, hi in local)


def make_prefill(model, *, backend: str = "auto"):
  """`prefill(x, t, y, mask, kv_range, slice_point, step_size, caption_dropout) -> KVCache`:
  the cache-writing pass over clean chunks (prefix chunks of V2V), keys/values only."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("chunk_width", "caption_dropout", "static_ranges"))
  def compiled(state, x, t, y, mask, kv_range, slice_point, step_size, *, chunk_width,
               caption_dropout, static_ranges=False):
    m = nnx.merge(graphdef, state)
    tok = x.shape[2] // m.cfg.t_patch_size * (x.shape[3] // m.cfg.patch_size) * (
        x.shape[4] // m.cfg.patch_size)
    out = m(x, t[None], y, mask, kv_range, jnp.array([caption_dropout]), slice_point=slice_point,
            chunk_width=chunk_width, step_size=step_size, backend=backend, return_kv=True,
            self_ranges=None if not static_ranges else np.array([[[0, tok]]], np.int32))
    return out.kv

  def prefill(**kw):
    kw.setdefault("static_ranges", True)          # one chunk that sees itself
    return compiled(state, **kw)

  prefill.compiled = compiled
  return prefill
