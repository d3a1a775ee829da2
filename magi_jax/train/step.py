"""The jitted train step: fp32 master weights, compute in the model's dtype, NaN-safe update.

`TrainState` is a plain pytree (what orbax saves): step, trainable parameters (float32
masters), optimizer state, optional EMA of the parameters, and the base PRNG key. Each step's
randomness is `fold_in(rng, step)`, so a resumed run draws exactly what an uninterrupted one
draws. Frozen variables (LoRA's base weights) travel separately and are never updated.

A non-finite loss or gradient norm leaves parameters, optimizer state and EMA untouched (the
step counter still advances, the batch is consumed) and reports `finite = 0`. The count of
such steps in a row lives in the state (`nan_streak`, on device, checkpointed), so the host
loop reads it only when it fetches metrics (magi_jax.train.trainer) and never waits on a step
to decide whether to go on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from einops import rearrange
from flax import nnx

from magi_jax.media.read import pixels_to_model
from magi_jax.models.vae import SCALE_FACTOR
from magi_jax.models.vae_chunks import chunk_encoder, scaled
from magi_jax.train.distill import DistillObjective
from magi_jax.train.objective import Objective

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any
  rng: jax.Array           # raw key data (uint32), so orbax saves it as a plain array
  nan_streak: jax.Array    # int32: non-finite steps in a row up to this step (0 after a good one)


def ema_warmup_decay(decay: float, step):
  """min(decay, (1 + step) / (10 + step)): early steps average over few updates, so the EMA
  does not keep a fixed share of the random initialisation (0.999 over 1,400 steps would keep
  25% of it)."""
  step = jnp.asarray(step, F32)
  return jnp.minimum(jnp.asarray(decay, F32), (1.0 + step) / (10.0 + step))


def init_state(params, tx, *, seed: int, ema: bool) -> TrainState:
  params = jax.tree.map(lambda x: jnp.asarray(x, F32), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema=jax.tree.map(jnp.copy, params) if ema else None,
                    rng=jax.random.key_data(jax.random.key(seed)),
                    nan_streak=jnp.zeros((), jnp.int32))


def vae_chunk_encoder(vae, *, scale_factor: float, frames_per_chunk: int):
  """frames uint8 (B, K·F, H, W, 3) -> scaled latents (B, C, K·F/4, h, w), inside the step.

  Each chunk of F frames is encoded on its own by `magi_jax.models.vae_chunks.chunk_encoder`
  (the function the offline `experiments.prepare` job uses), so a chunk's latents depend on
  neither its row, its position nor the batch size. The VAE is frozen (no gradient).
  """
  encode_chunks = chunk_encoder(vae)
  F = frames_per_chunk

  def encode(frames):
    B, T = frames.shape[:2]
    if T % F:
      raise ValueError(f"{T} frames are not whole chunks of {F}")
    z = encode_chunks(rearrange(frames, "b (k f) h w c -> (b k) f h w c", f=F))
    return rearrange(scaled(z, scale_factor), "(b k) c t h w -> b c (k t) h w", b=B)

  return encode


def model_batch(batch, encode_frames=None, scale_factor: float = SCALE_FACTOR):
  """The loss's inputs from a data batch: frames (pixels, or VAE latents with
  `encode_frames`) or the prepared posterior means "latents" (B, T, h, w, C) of
  `experiments.prepare` (scaled here exactly as `encode_frames` scales) become x1."""
  out = {k: v for k, v in batch.items() if k not in ("frames", "latents")}
  if "latents" in batch:
    out["x1"] = rearrange(scaled(batch["latents"], scale_factor), "b t h w c -> b c t h w")
  elif encode_frames is not None:
    out["x1"] = encode_frames(batch["frames"])
  else:
    out["x1"] = pixels_to_model(batch["frames"])      # pixel space: the frames are x1
  return out


@dataclasses.dataclass(frozen=True)
class StepShardings:
  """Where the step's inputs and outputs live: each field a sharding or a tree of them."""
  state: Any          # like TrainState
  frozen: Any         # like the frozen (non-trained) model state
  batch: Any          # every batch leaf: leading (batch) axis split
  replicated: Any     # metrics


def single_device_shardings() -> StepShardings:
  """Everything on one device: the step's signature is the one a device mesh uses."""
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  P = jax.sharding.PartitionSpec
  rep = jax.sharding.NamedSharding(mesh, P())
  return StepShardings(rep, rep, jax.sharding.NamedSharding(mesh, P("data")), rep)


def mesh_shardings(state: TrainState, frozen, mesh, rules) -> StepShardings:
  """Parameters, optimizer moments and EMA by the rules' parameter table (FSDP over 'fsdp',
  heads / MLP columns over 'tensor'); the batch over the rules' 'batch' axes."""
  from magi_jax.parallel.rules import tree_shardings
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return StepShardings(state=tree_shardings(state, mesh, rules),
                       frozen=tree_shardings(frozen, mesh, rules),
                       batch=jax.sharding.NamedSharding(mesh, rules.spec(("batch",))),
                       replicated=rep)


def weights_loss(graphdef, obj, compute_dtypes=None):
  """`(params, frozen, batch, key, step) -> (loss, aux)`: the objective on the model of these
  weights, each master weight cast to its compute dtype first (None: as stored). The train
  step differentiates it; the validation loss evaluates it."""
  def loss_of(params, frozen, batch, key, step):
    if compute_dtypes is not None:
      params = jax.tree.map(lambda p, d: p.astype(d), params, compute_dtypes)
    model = nnx.merge(graphdef, params, frozen)
    return obj.loss(model, batch, key, step)
  return loss_of


def make_train_step(graphdef, obj: Objective | DistillObjective, tx, schedule, *,
                    compute_dtypes=None, ema_decay: float = 0.0, encode_frames=None,
                    latent_scale: float = SCALE_FACTOR, shardings=None):
  """Returns `step(state, frozen, batch) -> (state, metrics)`, jitted, state donated.

  compute_dtypes: a pytree like `params` giving the dtype each master weight is cast to in
  the forward pass (bf16 weights with fp32 masters); None computes with the masters.
  encode_frames: frames -> latents (`vae_chunk_encoder`); None trains in pixel space (or on
    the batches' prepared "latents").
  latent_scale: the VAE scale factor applied to prepared "latents" (`config.vae.scale_factor`).
  shardings: `StepShardings` for `jax.jit` (default `single_device_shardings()`); with a mesh,
  call the step inside `magi_jax.parallel.rules.use_mesh` so activations and the
  context-parallel attention backends see it.
  """
  sh = shardings or single_device_shardings()
  loss_of = weights_loss(graphdef, obj, compute_dtypes)

  @functools.partial(jax.jit, donate_argnums=(0,), in_shardings=(sh.state, sh.frozen, sh.batch),
                     out_shardings=(sh.state, sh.replicated))
  def step(state: TrainState, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = model_batch(batch, encode_frames, latent_scale)
    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params, frozen, batch,
                                                                   key, state.step)
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params = keep(params, state.params)
    opt_state = keep(opt_state, state.opt_state)
    ema = state.ema
    if ema is not None:
      d = ema_warmup_decay(ema_decay, state.step)
      ema = keep(jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params), ema)
    streak = jnp.where(finite, 0, state.nan_streak + 1).astype(jnp.int32)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                     rng=state.rng, nan_streak=streak)
    metrics = {"loss": loss, "grad_norm": gnorm, "learning_rate": schedule(state.step),
               "finite": finite.astype(jnp.int32), "nan_streak": streak, **aux}
    return new, metrics

  return step
