"""The autoregressive chunk sampler: a generator that yields each chunk as soon as it is clean.

    sampler = Sampler(model, cfg)                      # VideoDiT + MagiConfig (runtime/engine)
    for chunk in sampler.sample(text_rows, latent_hw=(h, w), num_chunks=n, key=key):
        decode_and_write(chunk.latent)                 # (1, 16, <=chunk_width, h, w) float32

Memory is constant in the video length: only the chunks in the window, the chunk waiting for
its refresh and the bounded KV cache (the few clean chunks any kv range reaches) are held.
Noise is drawn per chunk from `fold_in(key, chunk)` unless an explicit `noise` tensor for the
whole video is given (that is how official runs are reproduced: the fixtures carry torch's
noise). Prefixes: `prefix` (1, 16, P, h, w) latents (already scaled by the VAE scale factor);
P = 1 is I2V (the image latent is written into frame 0 of chunk 0 before every call that
covers it, as the official code does), larger P is V2V (whole prefix chunks are prefilled into
the cache at clean_t with null rows, a partial last prefix chunk is padded like I2V).
"""

from __future__ import annotations

import copy

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from magi_jax.errors import MagiError
from magi_jax.configs import MagiConfig
from magi_jax.media.frames import emitted_latent_range
from magi_jax.models.embedders import distill_step_size
from magi_jax.models.kv_cache import KVCacheStore
from magi_jax.diffusion import schedule
from magi_jax.diffusion.step import (StepInputs, StepOptions, make_prefill, make_step,
                                     tokens_per_chunk)
from magi_jax.diffusion.window import (StepPlan, cache_chunks_needed, call_ranges, call_widths,
                                       plan_steps)

F32 = np.float32


class SamplerError(MagiError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """Settings the official code takes from the environment or hard-codes."""
  nearly_clean_weight: float = 0.7        # env `prev_chunks_scale` in the official code
  backend: str = "auto"


@dataclasses.dataclass
class Chunk:
  index: int                  # chunk number in the video (prefix chunks included)
  start: int                  # first latent frame emitted (absolute)
  latent: jax.Array           # (1, C, frames, h, w) float32


@dataclasses.dataclass(frozen=True)
class Call:
  """One sampler call as the plan fixes it on the host (`Sampler.calls`)."""
  plan: StepPlan
  t: np.ndarray               # (n,) levels, the refresh chunk at clean_t
  dt: np.ndarray              # (d,) steps of the denoised chunks
  kv_range: np.ndarray        # the official absolute key-token ranges
  ranges: np.ndarray          # (n, 2) the same inside [cache; current]
  cached_chunks: int          # cached chunks the call reads
  scale_prev: np.ndarray      # (d,) guidance scales
  scale_text: np.ndarray
  options: StepOptions        # what its compiled step depends on besides shapes


@dataclasses.dataclass
class CallRecord:
  """What one sampler call saw and produced (for parity checks and debugging)."""
  plan: StepPlan
  x: np.ndarray               # the call's input, refresh chunk and prefix padding included
  t: np.ndarray
  kv_range: np.ndarray        # the official kv_range of the call: absolute key-token ranges
  velocity: np.ndarray        # guided velocity of the denoised chunks


class Sampler:
  def __init__(self, model, cfg: MagiConfig, *, options: SamplerOptions = SamplerOptions()):
    self.model, self.cfg, self.options = model, cfg, options
    rt, eng = cfg.runtime, cfg.engine
    if rt.cfg_number == 3 and eng.distill:
      raise SamplerError("cfg_number 3 is for base models; a distilled model uses cfg_number 1")
    if getattr(model, "distill", eng.distill) != eng.distill:
      raise SamplerError(f"the model was built with distill={model.distill} but "
                         f"engine_config.distill={eng.distill}")
    self._set_schedule()
    self._step = make_step(model, backend=options.backend)
    self._prefill_fn = make_prefill(model, backend=options.backend)

  def _set_schedule(self):
    rt, eng = self.cfg.runtime, self.cfg.engine
    self.ts = schedule.timesteps(rt.num_steps, eng.shortcut_mode)
    self.intervals = schedule.distill_intervals(rt.num_steps, eng.shortcut_mode)

  def with_runtime(self, **fields) -> Sampler:
    """The same model and compiled steps under other runtime settings (guidance scales,
    steps, ...): the step functions depend on the model only, scales and t are traced."""
    other = copy.copy(self)
    other.cfg = self.cfg.replace(runtime=fields)
    other._set_schedule()
    return other

  # ------------------------------------------------------------------ helpers
  @property
  def step(self):
    """The compiled step function (`make_step`): its `ahead` and `stats` serve ahead.py."""
    return self._step

  def compilations(self) -> int:
    """How many distinct step functions have been compiled so far."""
    return self._step.variants()

  def _step_size(self, idx: int):
    if not self.cfg.engine.distill:
      return None
    return jnp.asarray(distill_step_size(self.cfg.runtime.num_steps, int(self.intervals[idx])), F32)

  def _scales(self, ts):
    rt = self.cfg.runtime
    b = [schedule.guidance_bucket(t, rt.cfg_t_range) for t in ts]
    return (np.array([rt.prev_chunk_scales[i] for i in b], F32),
            np.array([rt.text_scales[i] for i in b], F32))

  def calls(self, num_chunks: int, prefix_latent_frames: int,
            tokens_per_chunk: int) -> Iterator[Call]:
    """What every call of a video is, apart from its arrays: the plan, levels, steps, key
    ranges, cached chunks read and the compiled step's options (in call order)."""
    rt = self.cfg.runtime
    steps, clean_w = rt.num_steps, rt.clean_chunk_kvrange
    n_clean = prefix_latent_frames // rt.chunk_width
    for plan in plan_steps(num_chunks, n_clean, rt.window_size, steps):
      t_den = self.ts[list(plan.step_indices)]
      t = np.concatenate([[F32(rt.clean_t)] * plan.refresh, t_den]).astype(F32)
      dt = (self.ts[[s + 1 for s in plan.step_indices]] - t_den).astype(F32)
      widths = call_widths(plan, steps, rt.noise2clean_kvrange, clean_w)
      kv_range, need = call_ranges(plan, widths, tokens_per_chunk)
      ranges = kv_range - (plan.slice_point - need) * tokens_per_chunk   # in [cache; current]
      nearly = (rt.cfg_number == 1
                and schedule.nearly_clean(t_den[0],
                                          self.cfg.engine.distill_nearly_clean_chunk_threshold))
      s_p, s_t = self._scales(t_den)
      options = StepOptions(cfg_number=rt.cfg_number, refresh=plan.refresh,
                            nearly_clean=bool(nearly), ranges=tuple(map(tuple, ranges.tolist())))
      yield Call(plan, t, dt, kv_range, ranges, need, s_p, s_t, options)

  # ------------------------------------------------------------------ the loop
  def sample(self, text, *, latent_hw: tuple[int, int], num_chunks: int, key=None, noise=None,
             prefix=None, on_call: Callable[[CallRecord], None] | None = None) -> Iterator[Chunk]:
    """Yields the clean chunks in order. `text` has `.cond(chunk)` and `.null()` rows."""
    rt, m = self.cfg.runtime, self.model.cfg
    chunk_width, steps = rt.chunk_width, rt.num_steps
    h, w = latent_hw
    C = m.latent_channels
    if h % m.patch_size or w % m.patch_size:
      raise SamplerError(f"latent size {h}x{w} must be divisible by patch_size {m.patch_size}")
    tpc = tokens_per_chunk(m, chunk_width, latent_hw)
    P = 0 if prefix is None else int(prefix.shape[2])
    if prefix is not None and tuple(prefix.shape) != (1, C, P, h, w):
      raise SamplerError(f"prefix latents must be (1, {C}, P, {h}, {w}), got {tuple(prefix.shape)}")
    n_clean = P // chunk_width
    if not n_clean < num_chunks:
      raise SamplerError(f"{num_chunks} chunks leave nothing to generate after a prefix of "
                         f"{P} latent frames ({n_clean} whole chunks)")
    if noise is not None and tuple(noise.shape) != (1, C, num_chunks * chunk_width, h, w):
      raise SamplerError(f"noise must be (1, {C}, {num_chunks * chunk_width}, {h}, {w}), got "
                         f"{tuple(noise.shape)}")
    if noise is None and key is None:
      raise SamplerError("pass a PRNG key or an explicit noise tensor")
    if getattr(text, "infer_chunk_num", num_chunks) != num_chunks:
      raise SamplerError(f"text rows are for {text.infer_chunk_num} chunks, sampling {num_chunks}")
    if getattr(text, "clean_chunk_num", n_clean) != n_clean:
      raise SamplerError(f"text rows were built for {text.clean_chunk_num} clean chunks; the "
                         f"prefix of {P} latent frames gives {n_clean}")
    prefix = None if prefix is None else jnp.asarray(prefix, F32)

    plans = plan_steps(num_chunks, n_clean, rt.window_size, steps)
    clean_w = rt.clean_chunk_kvrange
    store = KVCacheStore(max(1, cache_chunks_needed(plans, steps, rt.noise2clean_kvrange, clean_w)),
                         tpc)
    null_y, null_m = (jnp.asarray(a)[None] for a in text.null())   # on the device once
    rows: dict[int, tuple] = {}      # device text rows of the chunks in the call, built once each

    def cond_row(c):
      if c not in rows:
        rows[c] = tuple(jnp.asarray(a) for a in text.cond(c))
      return rows[c]

    def initial(c):
      if noise is not None:
        return jnp.asarray(noise[:, :, c * chunk_width:(c + 1) * chunk_width], F32)
      return jax.random.normal(jax.random.fold_in(key, c), (1, C, chunk_width, h, w), F32)

    if n_clean:
      self._prefill(prefix, n_clean, store, tpc, null_y, null_m)

    latents: dict[int, jax.Array] = {}
    for call in self.calls(num_chunks, P, tpc):
      plan, slice_point, chunks = call.plan, call.plan.slice_point, list(call.plan.chunks)
      for c in range(plan.c0, plan.c1):
        if c not in latents:
          latents[c] = initial(c)
      x = jnp.concatenate([latents[c] for c in chunks], axis=2)
      first_frame = slice_point * chunk_width
      if P > first_frame:                             # prefix padding (I2V frame 0, V2V tail)
        n_pad = min(P - first_frame, x.shape[2])
        x = x.at[:, :, :n_pad].set(prefix[:, :, first_frame:first_frame + n_pad])
      call_rows = [(null_y[0], null_m[0]) if (plan.refresh and i == 0) else cond_row(c)
                   for i, c in enumerate(chunks)]
      y_cond = jnp.stack([r for r, _ in call_rows])
      m_cond = jnp.stack([k for _, k in call_rows])
      for c in [c for c in rows if c < plan.c0]:      # chunks that left the window
        del rows[c]
      inputs = StepInputs(
          x=x, t=jnp.asarray(call.t), dt=jnp.asarray(call.dt), y_cond=y_cond, m_cond=m_cond,
          y_null=null_y, m_null=null_m, ranges=jnp.asarray(call.ranges, jnp.int32),
          first_chunk=jnp.asarray(slice_point, jnp.int32),
          cache=store.read(slice_point, call.cached_chunks),
          scale_prev=jnp.asarray(call.scale_prev), scale_text=jnp.asarray(call.scale_text),
          blend=jnp.asarray(self.options.nearly_clean_weight, F32),
          step_size=self._step_size(plan.idx))
      x_next, v, kv = self._step(inputs, call.options)
      if plan.refresh:
        store.write(slice_point, kv)
        del latents[slice_point]
      for i, c in enumerate(range(plan.c0, plan.c1)):
        latents[c] = x_next[:, :, i * chunk_width:(i + 1) * chunk_width]
      if on_call is not None:
        on_call(CallRecord(plan, np.asarray(x), call.t, call.kv_range, np.asarray(v)))
      if plan.emits is not None:
        c = plan.emits
        start, _ = emitted_latent_range(c, P, chunk_width)   # I2V: chunk 0 whole; V2V: after P
        yield Chunk(c, start, latents[c][:, :, start - c * chunk_width:])

  def _prefill(self, prefix, n_clean, store, tokens_per_chunk, null_y, null_m):
    """Writes the K/V of the whole prefix chunks: t = clean_t, null rows, each sees only itself.

    The official code does this in one call over all prefix chunks with kv range 1 per chunk;
    running the chunks one at a time is the same computation in bounded memory.
    """
    rt = self.cfg.runtime
    chunk_width = rt.chunk_width
    for c in range(n_clean):
      kv = self._prefill_fn(
          x=prefix[:, :, c * chunk_width:(c + 1) * chunk_width], t=jnp.asarray([rt.clean_t], F32),
          y=null_y, mask=null_m, first_chunk=jnp.asarray(c, jnp.int32),
          step_size=self._step_size(0),
          caption_dropped=rt.cfg_number == 3)         # the cache-writing pass of each mode
      store.write(c, kv)


def final_latent(chunks) -> jax.Array:
  """Concatenates emitted chunks in time (what the official pipeline decodes)."""
  return jnp.concatenate([c.latent for c in chunks], axis=2)
