"""Converted checkpoints: the DiT parameters in orbax, beside the MAGI-1 config.

Layout of a converted directory:
  magi_config.json   the official three-section config (any preset or official file)
  magi_jax.json      {"format": "magi_jax.dit", "distill": ..., "precision": ...}
  params/            orbax StandardCheckpointer tree of the VideoDiT parameters
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from magi_jax.configs import MagiConfig, load_magi_config, save_magi_config
from magi_jax.convert.safetensors_io import CheckpointFormatError
from magi_jax.models import Precision, VideoDiT

FORMAT = "magi_jax.dit"


def is_converted(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "magi_jax.json"))


def save_converted(model: VideoDiT, cfg: MagiConfig, directory: str, *, precision: str) -> None:
  directory = os.path.abspath(directory)
  params = os.path.join(directory, "params")
  if os.path.exists(params):
    raise FileExistsError(f"{params} exists; refusing to overwrite a converted checkpoint")
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(params, nnx.state(model, nnx.Param))
  ckptr.wait_until_finished()
  save_magi_config(cfg, os.path.join(directory, "magi_config.json"))
  with open(os.path.join(directory, "magi_jax.json"), "w") as f:
    json.dump({"format": FORMAT, "distill": bool(model.distill), "precision": precision}, f)


def load_converted(directory: str, *, precision: str | None = None) -> tuple[VideoDiT, MagiConfig]:
  """Restores a converted checkpoint; `precision` ('fp32'/'bf16') overrides the saved one."""
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, "magi_jax.json")
  if not os.path.exists(meta_path):
    raise CheckpointFormatError(f"{directory}: not a converted magi_jax checkpoint (no magi_jax.json)")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise CheckpointFormatError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  cfg = load_magi_config(os.path.join(directory, "magi_config.json"))
  policy = Precision.named(precision or meta["precision"])
  abstract = nnx.eval_shape(lambda: VideoDiT(cfg.model, precision=policy,
                                             distill=meta["distill"], rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  target = jax.tree_util.tree_map(lambda a: a, params)
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointFormatError(f"{directory}/params does not match the config in "
                                f"magi_config.json: {e}") from None
  return nnx.merge(graphdef, restored, rest), cfg
