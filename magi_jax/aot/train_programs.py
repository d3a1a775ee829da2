"""The training job's program: the project's train step on the preset's abstract DiT.

What the trainer (magi_jax.train.trainer) builds for a bf16 run, with abstract arrays:
`TrainModel(dit)` split into trainable parameters and the rest, fp32 master weights with the
bf16 compute cast (`compute_dtypes`: each weight's own dtype in the bf16 model), remat per
layer, the real `Objective` (flow matching per chunk, chunk_width of the preset, attention
'auto'), AdamW with global-norm clipping (`train.optim.make_optimizer`), optional EMA, the
state donated, and the state / batch shardings of `train.step.mesh_shardings`.

The batch is `--batch` packed rows of precomputed latents and T5 rows (latent-space training
without the VAE in the step): latents (N, C, K·chunk_width, h, w) f32, segment_ids (N, K) int32 (one
video per row), text_emb (N, K, L, caption_channels) f32, text_mask (N, K, L) int32. Its rows
split over the rules' batch axes (data, fsdp); when those do not divide N the batch stays
replicated (as any dim a mesh axis does not divide; the trainer itself requires
data.batch_size to be a multiple of data x fsdp: per device the two plans hold the same rows).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from magi_jax.aot.abstract import abstract_dit, array, with_shardings
from magi_jax.aot.programs import Program, describe_inputs
from magi_jax.parallel.rules import axis_size
from magi_jax.train import optim
from magi_jax.train.objective import Objective, TrainModel
from magi_jax.train.step import init_state, make_train_step, mesh_shardings

F32, I32 = jnp.float32, jnp.int32
EMA_DECAY = 0.999


def batch_inputs(job) -> dict:
  m, chunk_width = job.cfg.model, job.cfg.runtime.chunk_width
  N, K = job.batch, job.size.chunks
  L, Cc = m.caption_max_length, m.caption_channels
  a = functools.partial(array, mesh=job.mesh, rules=job.rules, names=("batch",))
  latent_shape = (N, m.latent_channels, K * chunk_width, job.size.latent_h, job.size.latent_w)
  return {"latents": a(latent_shape, F32),
          "segment_ids": a((N, K), I32), "text_emb": a((N, K, L, Cc), F32),
          "text_mask": a((N, K, L), I32)}


def train_programs(job) -> list[Program]:
  cfg, mesh, rules = job.cfg, job.mesh, job.rules
  dit = abstract_dit(cfg)
  dit.remat = True
  graphdef, params, frozen = nnx.split(TrainModel(dit, None), nnx.Param, ...)
  dtypes = jax.tree.map(lambda x: x.dtype, params)       # bf16 compute, as the model has it
  schedule = optim.learning_rate(1e-4, 1000, 100_000)     # values do not change the program
  tx = optim.make_optimizer(schedule)
  state = jax.eval_shape(lambda p: init_state(p, tx, seed=0, ema=job.ema), params)
  sh = mesh_shardings(state, frozen, mesh, rules)
  batch = batch_inputs(job)
  sh = dataclasses.replace(sh, batch={k: v.sharding for k, v in batch.items()})
  obj = Objective(chunk_width=cfg.runtime.chunk_width)
  step = make_train_step(graphdef, obj, tx, schedule, compute_dtypes=dtypes,
                         ema_decay=EMA_DECAY if job.ema else 0.0, shardings=sh)
  split = axis_size(mesh, rules.spec(("batch",))[0])
  rows = (f"{job.batch} rows over {split} batch shards" if job.batch % split == 0
          else f"{job.batch} row(s) replicated (batch axes {split} do not divide them)")
  notes = (f"{rows}, {job.size.describe()} = {job.size.tokens:,} tokens per row; "
           f"fp32 masters + AdamW{' + EMA' if job.ema else ''}, bf16 compute, remat; "
           + describe_inputs(latents=batch["latents"], text_emb=batch["text_emb"]))
  return [Program("step", step, (with_shardings(state, sh.state),
                                 with_shardings(frozen, sh.frozen), batch), notes=notes)]

