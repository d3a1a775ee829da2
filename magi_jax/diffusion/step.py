"""One sampler step: the guided velocity of the window's chunks and the Euler update.

The call's chunks (the refresh chunk first when there is one) arrive padded with the prefix
latents, with their self-attention key ranges inside [cache; current] from the window plan
(`magi_jax.attention.masks.chunk_kv_ranges`). Guidance (official
inference/pipeline/video_generate.py), as pure functions of a `StepInputs` record:

* `cfg3_velocity`: pass A (text rows, the caption-kept adaLN row) and pass B (null rows, the
  caption-dropped row) share x, t, ranges and the cache and run as one batch of two; pass C
  runs each denoised chunk alone (its own batch element, no cache, null rows, time positions
  from 0). Per chunk v = (1 - s_p)·C + (s_p - s_t)·B + s_t·A; the refresh K/V comes from B.
* `cfg1_velocity`: one pass with the text rows that also yields the refresh K/V. With
  `nearly_clean`, a copy of the oldest denoised chunk that sees only itself is appended and
  v_oldest = w·v_oldest + (1 - w)·v_copy (w = 0.7 officially).
* `euler_update`: x + v·dt per chunk.

`make_step(model)` jits `guided_step` once per distinct `StepOptions` (chunks in the call,
refresh, cached tokens, nearly_clean, guidance, static ranges) and input shapes; t, dt, the
scales, the first chunk index and the step size are traced. When the ranges are given as
static `StepOptions.ranges` (the sampler knows them on the host), kernels whose mask must be
known at trace time (splash on TPU) compute the exact mask; the traced `StepInputs.ranges`
serve the planner, which lowers one program for every window position.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.attention import ChunkMask
from magi_jax.models.kv_cache import KVCache
from magi_jax.diffusion.shortcut import guided_velocity


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
  """The traced inputs of one step (arrays; `cache` and `step_size` may be None)."""
  x: jax.Array              # (1, C, n·chunk_width, H, W): the call's chunks, refresh first
  t: jax.Array              # (n,) each chunk's level (the refresh chunk at clean_t)
  dt: jax.Array             # (d,) each denoised chunk's step t[σ + 1] - t[σ]
  y_cond: jax.Array         # (n, L, C) the chunks' caption rows (null for the refresh chunk)
  m_cond: jax.Array         # (n, L) their valid tokens
  y_null: jax.Array         # (1, L, C) the null caption row
  m_null: jax.Array         # (1, L)
  ranges: jax.Array         # (n, 2) self-attention key ranges inside [cache; current]
  first_chunk: jax.Array    # () absolute index of the call's first chunk (RoPE time)
  cache: KVCache | None     # K/V of the cached chunks right before first_chunk
  scale_prev: jax.Array     # (d,) guidance scale on the previous chunks (cfg 3)
  scale_text: jax.Array     # (d,) guidance scale on the text (cfg 3)
  blend: jax.Array          # () nearly-clean weight w (cfg 1)
  step_size: jax.Array | None = None   # () the distilled model's step-size value


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What a compiled step depends on besides shapes (hashable)."""
  cfg_number: int                          # 3: three-pass guidance; 1: one pass
  refresh: bool                            # the first chunk is re-run to write its K/V
  nearly_clean: bool = False               # cfg 1: blend the oldest chunk with its copy
  ranges: tuple | None = None              # static ((lo, hi), ...) replacing inputs.ranges


def _split_chunks(x, n):
  """(1, C, n·chunk_width, H, W) -> (n, C, chunk_width, H, W)."""
  _, c, f, h, w = x.shape
  return jnp.transpose(x.reshape(c, n, f // n, h, w), (1, 0, 2, 3, 4))


def _join_chunks(x):
  """(n, C, chunk_width, H, W) -> (1, C, n·chunk_width, H, W)."""
  n, c, chunk_width, h, w = x.shape
  return jnp.transpose(x, (1, 0, 2, 3, 4)).reshape(1, c, n * chunk_width, h, w)


def _geometry(model, inp: StepInputs):
  n = inp.t.shape[0]
  chunk_width = inp.x.shape[2] // n
  p, pt = model.cfg.patch_size, model.cfg.t_patch_size
  tokens_per_chunk = (inp.x.shape[3] // p) * (inp.x.shape[4] // p) * (chunk_width // pt)
  return n, chunk_width, tokens_per_chunk


def _ranges(inp: StepInputs, opts: StepOptions):
  """The call's (n, 2) ranges, static numpy when the options carry them."""
  return inp.ranges if opts.ranges is None else np.asarray(opts.ranges, np.int32)


def cfg3_velocity(model, inp: StepInputs, opts: StepOptions, backend: str = "auto"):
  """(v of the denoised chunks (1, C, d·chunk_width, H, W), the refresh chunk's K/V or None)."""
  n, chunk_width, tokens_per_chunk = _geometry(model, inp)
  d = n - int(opts.refresh)
  r = _ranges(inp, opts)
  stack = np.stack if isinstance(r, np.ndarray) else jnp.stack
  call = functools.partial(model, step_size=inp.step_size, backend=backend,
                           kv_tokens=tokens_per_chunk)
  ab = call(jnp.concatenate([inp.x, inp.x]), jnp.stack([inp.t, inp.t]),
            jnp.concatenate([inp.y_cond, jnp.broadcast_to(inp.y_null, inp.y_cond.shape)]),
            jnp.concatenate([inp.m_cond, jnp.broadcast_to(inp.m_null, inp.m_cond.shape)]),
            ChunkMask(stack([r, r]), q_block=tokens_per_chunk),
            caption_dropped=jnp.array([False, True]),
            first_chunk=inp.first_chunk, cache=inp.cache, return_kv=opts.refresh)
  text, prev = ab.velocity[:1], ab.velocity[1:]
  off = (n - d) * chunk_width
  # Pass C: each denoised chunk alone, so it sees only itself.
  own = np.tile(np.array([[[0, tokens_per_chunk]]], np.int32), (d, 1, 1))
  if opts.ranges is None:
    own = jnp.asarray(own)
  alone = call(_split_chunks(inp.x[:, :, off:], d), inp.t[n - d:, None],
               jnp.broadcast_to(inp.y_null, (d,) + inp.y_null.shape[1:]),
               jnp.broadcast_to(inp.m_null, (d,) + inp.m_null.shape[1:]),
               ChunkMask(own, q_block=tokens_per_chunk), caption_dropped=jnp.array([True]),
               first_chunk=0).velocity
  s_p = jnp.repeat(inp.scale_prev, chunk_width)[None, None, :, None, None]
  s_t = jnp.repeat(inp.scale_text, chunk_width)[None, None, :, None, None]
  v = guided_velocity(text[:, :, off:], prev[:, :, off:], _join_chunks(alone), s_p, s_t)
  kv = KVCache(ab.kv.k[:, 1:2], ab.kv.v[:, 1:2]) if opts.refresh else None
  return v, kv


def cfg1_velocity(model, inp: StepInputs, opts: StepOptions, backend: str = "auto"):
  """(v of the denoised chunks, the refresh chunk's K/V or None) with one guided pass."""
  n, chunk_width, tokens_per_chunk = _geometry(model, inp)
  d = n - int(opts.refresh)
  o = n - d                                            # the oldest denoised chunk
  oldest = slice(o * chunk_width, (o + 1) * chunk_width)
  x, t, y, m, r = inp.x, inp.t, inp.y_cond, inp.m_cond, _ranges(inp, opts)
  if opts.nearly_clean:                                # its copy sees only itself
    x = jnp.concatenate([x, x[:, :, oldest]], axis=2)
    t = jnp.concatenate([t, t[o:o + 1]])
    y = jnp.concatenate([y, y[o:o + 1]])
    m = jnp.concatenate([m, m[o:o + 1]])
    end = 0 if inp.cache is None else inp.cache.num_tokens
    end += n * tokens_per_chunk
    if isinstance(r, np.ndarray):
      r = np.concatenate([r, np.array([[end, end + tokens_per_chunk]], np.int32)])
    else:
      r = jnp.concatenate([r, jnp.array([[end, end + tokens_per_chunk]], jnp.int32)])
  out = model(x, t[None], y, m, ChunkMask(r[None], q_block=tokens_per_chunk),
              caption_dropped=jnp.array([False]), first_chunk=inp.first_chunk,
              step_size=inp.step_size, cache=inp.cache, backend=backend,
              return_kv=opts.refresh, kv_tokens=tokens_per_chunk)
  vel = out.velocity
  if opts.nearly_clean:
    mixed = vel[:, :, oldest] * inp.blend + vel[:, :, n * chunk_width:] * (1 - inp.blend)
    vel = jnp.concatenate([vel[:, :, :oldest.start], mixed,
                           vel[:, :, oldest.stop:n * chunk_width]], axis=2)
  kv = KVCache(out.kv.k, out.kv.v) if opts.refresh else None
  return vel[:, :, oldest.start:], kv


def euler_update(x, v, dt):
  """x + v·dt, chunk by chunk: x, v (1, C, d·chunk_width, H, W), dt (d,)."""
  chunk_width = x.shape[2] // dt.shape[0]
  return x + v * jnp.repeat(dt, chunk_width)[None, None, :, None, None]


def guided_step(model, inp: StepInputs, opts: StepOptions, backend: str = "auto"):
  """(x_next, v, refresh K/V) of the denoised chunks."""
  velocity = cfg3_velocity if opts.cfg_number == 3 else cfg1_velocity
  v, kv = velocity(model, inp, opts, backend)
  _, chunk_width, _ = _geometry(model, inp)
  x_noisy = inp.x[:, :, int(opts.refresh) * chunk_width:]
  return euler_update(x_noisy, v, inp.dt), v, kv


def tokens_per_chunk(model_cfg, chunk_width: int, latent_hw: tuple[int, int]) -> int:
  """Tokens of one chunk of `chunk_width` latent frames at latent size `latent_hw`."""
  p, pt = model_cfg.patch_size, model_cfg.t_patch_size
  return (chunk_width // pt) * (latent_hw[0] // p) * (latent_hw[1] // p)


def _shape_only(shape, dtype, names=()):
  del names
  return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


def abstract_inputs(model_cfg, *, chunk_width: int, call_chunks: int, denoised: int,
                    latent_hw: tuple[int, int], cached_chunks: int, cache_dtype, distill: bool,
                    array=_shape_only, cache_names=()) -> StepInputs:
  """The inputs of one step as the sampler builds them, as abstract arrays: latents, levels,
  steps and scales float32; caption rows and masks float32 of the DiT's caption length and
  width; key ranges and the first chunk int32; the cache of `cached_chunks` chunks in
  `cache_dtype`; the step size for a distilled model. `array(shape, dtype, names=())` makes
  each one (ShapeDtypeStructs; the planner's places them on its mesh, the cache's axes named
  `cache_names`)."""
  m = model_cfg
  n, d = call_chunks, denoised
  h, w = latent_hw
  L, Cc = m.caption_max_length, m.caption_channels
  f32, i32 = np.float32, np.int32
  cache = None
  if cached_chunks:
    shape = (m.num_layers, 1, cached_chunks * tokens_per_chunk(m, chunk_width, latent_hw),
             m.num_query_groups, m.head_dim)
    cache = KVCache(array(shape, cache_dtype, names=cache_names),
                    array(shape, cache_dtype, names=cache_names))
  return StepInputs(
      x=array((1, m.latent_channels, n * chunk_width, h, w), f32), t=array((n,), f32),
      dt=array((d,), f32), y_cond=array((n, L, Cc), f32), m_cond=array((n, L), f32),
      y_null=array((1, L, Cc), f32), m_null=array((1, L), f32), ranges=array((n, 2), i32),
      first_chunk=array((), i32), cache=cache, scale_prev=array((d,), f32),
      scale_text=array((d,), f32), blend=array((), f32),
      step_size=array((), f32) if distill else None)


def signature(inputs: StepInputs, options: StepOptions):
  """What a compiled step is keyed by: options, the inputs' tree, shapes and dtypes."""
  leaves, tree = jax.tree.flatten(inputs)
  return options, tree, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def make_step(model, *, backend: str = "auto"):
  """`step(inputs: StepInputs, options: StepOptions) -> (x_next, v, refresh_kv)` over a
  snapshot of `model`'s parameters; `step.compiled(state, inputs, options)` is the jitted
  function (what the planner lowers).

  `step.ahead(abstract_inputs, options, submit)` compiles a step before it is called:
  `submit(fn)` runs `fn` (a thread pool's `submit`), and a later call with that signature waits
  for the compile and runs its executable. A call whose arrays are placed differently from
  what was compiled ahead (another device or sharding) runs through the jit instead, as does
  any signature not compiled ahead; `step.stats()` counts both."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("options",))
  def compiled(state, inputs: StepInputs, options: StepOptions):
    return guided_step(nnx.merge(graphdef, state), inputs, options, backend)

  variants, ahead, passed_over = set(), {}, set()
  counts = {"ahead": 0, "jit": 0}
  lock = threading.Lock()

  def step(inputs: StepInputs, options: StepOptions):
    key = signature(inputs, options)
    variants.add(key)
    future = ahead.get(key)
    if future is not None:
      executable = future.result()           # waits for a compile still running
      try:
        out = executable(state, inputs)
      except ValueError as e:                 # placed unlike the compiled program
        if key not in passed_over:
          passed_over.add(key)
          logging.warning("a step compiled ahead does not take these inputs (%s); it runs "
                          "through the jit instead", str(e).splitlines()[0])
      else:
        counts["ahead"] += 1
        return out
    counts["jit"] += 1
    return compiled(state, inputs, options)

  def compile_ahead(inputs: StepInputs, options: StepOptions, submit):
    key = signature(inputs, options)
    with lock:
      if key not in ahead:
        ahead[key] = submit(lambda: compiled.lower(state, inputs, options=options).compile())
      return ahead[key]

  step.compiled = compiled
  step.ahead = compile_ahead
  step.variants = lambda: len(variants)       # distinct compiled signatures called so far
  step.stats = lambda: dict(counts, compiled_ahead=len(ahead))
  return step


def make_prefill(model, *, backend: str = "auto"):
  """`prefill(x, t, y, mask, first_chunk, step_size, caption_dropped) -> KVCache`: the
  cache-writing pass over one clean chunk (a V2V prefix chunk) that sees only itself."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("caption_dropped",))
  def compiled(state, x, t, y, mask, first_chunk, step_size, *, caption_dropped):
    m = nnx.merge(graphdef, state)
    tokens_per_chunk = (x.shape[2] // m.cfg.t_patch_size) * (x.shape[3] // m.cfg.patch_size) * (
        x.shape[4] // m.cfg.patch_size)
    own = ChunkMask(np.array([[[0, tokens_per_chunk]]], np.int32), q_block=tokens_per_chunk)
    return m(x, t[None], y, mask, own, caption_dropped=jnp.array([caption_dropped]),
             first_chunk=first_chunk, step_size=step_size, backend=backend,
             return_kv=True).kv

  def prefill(**kw):
    return compiled(state, **kw)

  prefill.compiled = compiled
  return prefill
