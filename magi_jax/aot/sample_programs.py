"""The sampling job's programs: the sampler steps of the steady state, T5, one VAE tile.

* 'step': `magi_jax.diffusion.step.make_step` over the preset's abstract DiT (bf16 weights, the
  official policy), once per steady-state call shape (steady.py), with the inputs the sampler
  builds for that call: x (1, C, chunks·chunk_width, h, w) f32, t / dt / guidance scales f32 per
  chunk, per-chunk text rows (L, caption_channels) f32 + masks, the null row, kv ranges and
  slice point int32, the KV cache of the cached chunks (layers, 1, tokens, kv groups,
  head_dim) in the compute dtype, the distilled step size. Weights by the project's parameter
  table; the cache's kv groups on 'tensor', its tokens on 'context'; the rest replicated. The
  sampler also keeps its bounded cache store (the cached chunks) between calls: that copy is
  outside the step program and not counted.
* 't5': the T5 encoder on one tokenised prompt (1, caption_max_length), as
  `text.encoder.TextEncoder` runs it (`--t5_dtype`, float32 as MAGI-1 does; the official
  configs run it on the host CPU: runtime_config.t5_device).
* 'vae': the VAE decode of one tile of a chunk (`models.vae_tiling.iter_tiled_decode`
  decodes a chunk tile by tile, one jitted decode per tile shape, as generate.pipeline does),
  bf16 weights, the whole VAE state as its argument (the pipeline's JittedVAE passes it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from magi_jax.aot import components
from magi_jax.aot.abstract import abstract_dit, array, placed
from magi_jax.aot.programs import Program, describe_inputs
from magi_jax.aot.steady import CallShape, steady_calls
from magi_jax.models import Precision
from magi_jax.models.vae import ViTVAE
from magi_jax.diffusion.step import StepOptions, abstract_inputs, make_step
from magi_jax.text import T5Encoder

F32, I32 = jnp.float32, jnp.int32
CACHE_AXES = (None, "batch", "length", "act_heads", "head_dim")


def step_program(job, step, state, call: CallShape) -> Program:
  cfg, rt = job.cfg, job.cfg.runtime
  # The ranges stay traced (options.ranges None): one program serves every window position,
  # and splash's static mask tables, quadratic in blocks, are not built for the plan.
  inputs = abstract_inputs(
      cfg.model, chunk_width=rt.chunk_width, call_chunks=call.call_chunks,
      denoised=call.plan.num_denoised, latent_hw=(job.size.latent_h, job.size.latent_w),
      cached_chunks=call.cache_chunks, cache_dtype=Precision.bf16().compute_dtype,
      distill=bool(cfg.engine.distill),
      array=functools.partial(array, mesh=job.mesh, rules=job.rules), cache_names=CACHE_AXES)
  notes = call.describe() + "; " + describe_inputs(x=inputs.x, y_cond=inputs.y_cond)
  if inputs.cache is not None:
    notes += ", " + describe_inputs(cache_k=inputs.cache.k) + " (and v)"
  options = StepOptions(cfg_number=rt.cfg_number, refresh=call.plan.refresh,
                        nearly_clean=call.nearly_clean)
  return Program(call.name, step.compiled, (state, inputs), static=dict(options=options),
                 notes=notes)


def t5_program(job) -> Program:
  t5cfg = components.t5_config(job.cfg)
  dtype = jnp.dtype(job.t5_dtype)
  enc = nnx.eval_shape(lambda: T5Encoder(t5cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(enc)
  fn = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))
  L = job.cfg.model.caption_max_length
  a = functools.partial(array, mesh=job.mesh, rules=job.rules)
  notes = (f"{'t5-v1_1-xxl' if not components.is_tiny(job.cfg) else 'tiny random T5'} "
           f"({t5cfg.num_layers} layers, d_model {t5cfg.d_model}), {job.t5_dtype} weights, "
           f"one prompt of {L} tokens")
  return Program("t5", fn, (placed(state, job.mesh, components.t5_rules(job.rules)),
                            a((1, L), I32), a((1, L), I32)), notes=notes)


def vae_program(job) -> Program:
  vcfg = components.vae_config(job.cfg)
  vae = nnx.eval_shape(lambda: ViTVAE(vcfg, precision=Precision.bf16(), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(vae)
  fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
  tile = components.decode_tile(vcfg, job.cfg.runtime.chunk_width, job.size.latent_h,
                                job.size.latent_w)
  z = array((1, vcfg.z_chans) + tile, Precision.bf16().compute_dtype, job.mesh, job.rules)
  notes = (f"decode of one {tile[0]}x{tile[1]}x{tile[2]}-latent tile "
           f"({tile[0] * vcfg.patch_length} frames of {tile[1] * vcfg.patch_size}x"
           f"{tile[2] * vcfg.patch_size} px; a chunk is decoded tile by tile), "
           f"VAE width {vcfg.embed_dim} x {vcfg.depth} blocks, bf16")
  return Program("vae", fn, (placed(state, job.mesh, components.vae_rules(job.rules)), z),
                 notes=notes)


def sample_programs(job) -> list[Program]:
  out = []
  if "step" in job.programs:
    model = abstract_dit(job.cfg, int8=job.dit_weights == "int8")
    step = make_step(model)          # backend 'auto'
    state = placed(nnx.split(model)[1], job.mesh, job.rules)
    out += [step_program(job, step, state, c) for c in steady_calls(job.cfg, job.size.chunks)]
  if "t5" in job.programs:
    out.append(t5_program(job))
  if "vae" in job.programs:
    out.append(vae_program(job))
  return out
