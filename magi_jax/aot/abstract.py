"""Abstract inputs: models built by `nnx.eval_shape` (nothing allocated) and ShapeDtypeStructs
that carry the NamedSharding each input has on the mesh."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from magi_jax.aot.job import LoRA
from magi_jax.configs import MagiConfig
from magi_jax.models import Precision, VideoDiT
from magi_jax.models.quant import quantize_int8
from magi_jax.parallel.rules import ShardingRules, fit_spec, tree_shardings


def abstract_dit(cfg: MagiConfig, precision: Precision | None = None,
                 distill: bool | None = None, int8: bool = False,
                 lora: LoRA | None = None) -> VideoDiT:
  """The preset's DiT with ShapeDtypeStruct parameters (bf16 weights by default); `distill`
  overrides the preset's architecture (a distillation job's student); `int8`: the layers'
  kernels as int8 values and scales (models/quant.py); `lora`: adapters on its targets, added
  by `train.lora.apply_lora` as the trainer adds them (float32 `nnx.LoRAParam`s next to the
  base kernels, which keep their paths and dtype)."""
  precision = precision or Precision.bf16()
  distill = cfg.engine.distill if distill is None else distill

  def make():
    m = VideoDiT(cfg.model, precision=precision, distill=distill, rngs=nnx.Rngs(0))
    if lora is not None:
      from magi_jax.train.lora import apply_lora
      apply_lora(m, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, rngs=nnx.Rngs(1))
    return quantize_int8(m) if int8 else m
  return nnx.eval_shape(make)


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying the matching leaf of `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def placed(tree, mesh, rules: ShardingRules):
  """`tree` (parameters, optimizer state: leaves with shape and dtype) placed by the rules'
  parameter table."""
  return with_shardings(tree, tree_shardings(tree, mesh, rules))


def array(shape, dtype, mesh, rules: ShardingRules, names=()) -> jax.ShapeDtypeStruct:
  """One input with logical axis `names` (padded with None: replicated); dims a mesh axis
  does not divide stay replicated."""
  names = tuple(names) + (None,) * (len(shape) - len(names))
  spec = fit_spec(rules.spec(names), tuple(shape), mesh)
  return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=NamedSharding(mesh, spec))


def per_device_bytes(tree) -> int:
  """Bytes of one device's shards of every leaf (ShapeDtypeStructs with shardings): the
  largest shard of each leaf, which is every shard's size for even splits."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total
