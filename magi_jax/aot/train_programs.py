"""The training job's program: the project's train step on the preset's abstract DiT.

What the trainer (magi_jax.train.trainer) builds for a bf16 run, with abstract arrays:
`TrainModel(dit)` split into trainable parameters and the rest, fp32 master weights with the
bf16 compute cast (`compute_dtypes`: each weight's own dtype in the bf16 model), remat per
layer, the real `Objective` (flow matching per chunk, chunk_width of the preset, attention
'auto'), AdamW with global-norm clipping (`train.optim.make_optimizer`), optional EMA, the
state donated, and the state / batch shardings of `train.step.mesh_shardings`.

`--job=distill`: what the trainer builds for a distillation run of the preset (a base model):
the student is the distilled DiT (`distill=True`, trained as above), the teacher the frozen
base DiT in bf16 (part of the frozen state, sharded by the same rules), and the objective
`train.distill.DistillObjective` with the report's step-size cycle and the preset's own
sampling guidance as the teacher's; one program holds both branches (`lax.cond` between the
teacher's three-pass target and the student's two half steps).

The batch is `--batch` packed rows of precomputed latents and T5 rows (latent-space training
without the VAE in the step, as `data.kind=prepared` feeds it): latents (N, K·chunk_width, h,
w, C) f32, the prepared posterior means' layout (`train.step.model_batch` scales them and
moves channels first), segment_ids (N, K) int32 (one video per row), text_emb (N, K, L,
caption_channels) f32, text_mask (N, K, L) int32. Its rows split over the rules' batch axes
(data, fsdp); when those do not divide N the batch stays replicated (as any dim a mesh axis
does not divide; the trainer itself requires data.batch_size to be a multiple of data x fsdp:
per device the two plans hold the same rows).

`--lora_rank=N` (job.lora): what the trainer builds for a LoRA run (`lora.rank` > 0). The DiT
(a distillation's student) gets float32 adapters on the job's targets from
`train.lora.apply_lora`; the trainable state is the adapters only (the `nnx.LoRAParam` filter
of the trainer's `trainable_filter`, which also leaves a distillation's teacher out), so the
fp32 masters, AdamW moments and EMA are adapter-shaped; the base weights ride in the `frozen`
argument in bf16, placed by the same parameter table (it has rules for the adapters' paths).
The adapters compute in float32 (their own dtype, as `compute_dtypes` gives the trainer).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from magi_jax.aot.abstract import abstract_dit, array, with_shardings
from magi_jax.aot.programs import Program, describe_inputs
from magi_jax.parallel.rules import axis_size
from magi_jax.train import optim
from magi_jax.train.distill import DistillObjective, Guidance
from magi_jax.train.objective import Objective, TrainModel
from magi_jax.train.step import init_state, make_train_step, mesh_shardings

F32, I32 = jnp.float32, jnp.int32
EMA_DECAY = 0.999


def batch_inputs(job) -> dict:
  m, chunk_width = job.cfg.model, job.cfg.runtime.chunk_width
  N, K = job.batch, job.size.chunks
  L, Cc = m.caption_max_length, m.caption_channels
  a = functools.partial(array, mesh=job.mesh, rules=job.rules, names=("batch",))
  latent_shape = (N, K * chunk_width, job.size.latent_h, job.size.latent_w, m.latent_channels)
  return {"latents": a(latent_shape, F32),
          "segment_ids": a((N, K), I32), "text_emb": a((N, K, L, Cc), F32),
          "text_mask": a((N, K, L), I32)}


def train_model(job):
  """(TrainModel, trainable filter, objective) of the job: the base run or the distillation,
  training every weight or (job.lora) the LoRA adapters only."""
  cfg = job.cfg
  obj = Objective(chunk_width=cfg.runtime.chunk_width)
  if job.kind != "distill":
    dit = abstract_dit(cfg, lora=job.lora)
    dit.remat = True
    return TrainModel(dit, None), (nnx.LoRAParam if job.lora else nnx.Param), obj
  student, teacher = abstract_dit(cfg, distill=True, lora=job.lora), abstract_dit(cfg)
  student.remat = teacher.remat = True
  rt = cfg.runtime
  guidance = Guidance(cfg_t_range=tuple(rt.cfg_t_range),
                      prev_chunk_scales=tuple(rt.prev_chunk_scales),
                      text_scales=tuple(rt.text_scales))
  trainable = nnx.All(nnx.LoRAParam if job.lora else nnx.Param,
                      nnx.Not(nnx.PathContains("teacher")))
  return (TrainModel(student, None, TrainModel(teacher, None)), trainable,
          DistillObjective(base=obj, guidance=guidance))


def count(tree) -> int:
  """Parameters (array elements) in a tree of ShapeDtypeStructs."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def train_programs(job) -> list[Program]:
  mesh, rules = job.mesh, job.rules
  model, trainable, obj = train_model(job)
  graphdef, params, frozen = nnx.split(model, trainable, ...)   # the trainer's split_model
  dtypes = jax.tree.map(lambda x: x.dtype, params)       # bf16 compute (LoRA: f32 adapters)
  schedule = optim.learning_rate(1e-4, 1000, 100_000)     # values do not change the program
  tx = optim.make_optimizer(schedule)
  state = jax.eval_shape(lambda p: init_state(p, tx, seed=0, ema=job.ema), params)
  sh = mesh_shardings(state, frozen, mesh, rules)
  batch = batch_inputs(job)
  sh = dataclasses.replace(sh, batch={k: v.sharding for k, v in batch.items()})
  step = make_train_step(graphdef, obj, tx, schedule, compute_dtypes=dtypes,
                         ema_decay=EMA_DECAY if job.ema else 0.0, shardings=sh)
  split = axis_size(mesh, rules.spec(("batch",))[0])
  rows = (f"{job.batch} rows over {split} batch shards" if job.batch % split == 0
          else f"{job.batch} row(s) replicated (batch axes {split} do not divide them)")
  distill = ("distilled student + frozen bf16 teacher, step-size cycle "
             f"{len(obj.cycle)} sizes; " if job.kind == "distill" else "")
  trained = count(params)
  if job.lora:
    trains = (f"{job.lora.describe()} on {','.join(job.lora.targets)}: {trained:,} trainable "
              f"parameters (fp32 masters + AdamW{' + EMA' if job.ema else ''} for the adapters "
              f"only), base weights frozen in bf16 ({count(frozen):,} frozen values), remat")
  else:
    trains = (f"{trained:,} trainable parameters, fp32 masters + "
              f"AdamW{' + EMA' if job.ema else ''}, bf16 compute, remat")
  notes = (f"{distill}{rows}, {job.size.describe()} = {job.size.tokens:,} tokens per row; "
           f"{trains}; " + describe_inputs(latents=batch["latents"], text_emb=batch["text_emb"]))
  return [Program("step", step, (with_shardings(state, sh.state),
                                 with_shardings(frozen, sh.frozen), batch), notes=notes,
                  trainable_params=trained)]

