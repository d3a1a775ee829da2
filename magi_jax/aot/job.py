"""A resolved planning request: every flag checked, nothing compiled yet."""

from __future__ import annotations

import dataclasses

import jax

from magi_jax.aot.sizes import VideoSize
from magi_jax.aot.topology import Topology
from magi_jax.configs import MagiConfig
from magi_jax.parallel.rules import ShardingRules

JOBS = ("sample", "train", "distill")   # distill: the train step of a distillation run


@dataclasses.dataclass(frozen=True)
class LoRA:
  """A LoRA fine-tune's adapters (`train.lora.apply_lora`): only they train."""
  rank: int
  alpha: float
  targets: tuple[str, ...]     # the TransformerLayer's Linear maps that get adapters

  def describe(self) -> str:
    return f"LoRA rank {self.rank}, alpha {self.alpha:g}"


@dataclasses.dataclass(frozen=True)
class Job:
  kind: str                    # 'sample' | 'train' | 'distill'
  preset: str
  cfg: MagiConfig
  topology: Topology
  mesh: jax.sharding.Mesh
  mesh_desc: str               # "data:1,fsdp:4,context:1,tensor:1"
  rules: ShardingRules
  size: VideoSize              # train: one packed row; sample: the video (chunks to generate)
  batch: int                   # train: packed rows (global batch)
  programs: tuple[str, ...]    # program families to build ('step', 't5', 'vae')
  ema: bool = False            # train: keep an EMA of the parameters in the state
  t5_dtype: str = "float32"    # sample: T5 parameter / compute dtype
  dit_weights: str = "bf16"    # sample: the DiT's weights, bf16 | int8 (models/quant.py)
  lora: LoRA | None = None     # train / distill: train LoRA adapters only (None: every weight)
