"""Converted checkpoints: DiT or VAE parameters in orbax, beside their official config.

Layout of a converted DiT directory:
  magi_config.json   the official three-section config (any preset or official file)
  magi_jax.json      {"format": "magi_jax.dit", "distill": ..., "precision": ...}
  params/            orbax StandardCheckpointer tree of the VideoDiT parameters
The DiT's layer parameters are stacked (`layers/q/kernel` (L, ...), magi_jax/models/stack.py).
A directory converted before the layers were stacked (`layers/<i>/q/kernel`) still loads: its
per-layer tensors are read and stacked (`load_converted`); re-save to get the new layout.
A converted VAE directory has the official VAE `config.json` instead of magi_config.json,
and format "magi_jax.vae"; a converted T5 encoder has the Hugging Face `config.json` and the
tokenizer files, and format "magi_jax.t5".
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from magi_jax.configs import MagiConfig, load_magi_config, save_magi_config
from magi_jax.formats.safetensors_io import CheckpointFormatError
from magi_jax.models import Precision, VideoDiT

FORMAT = "magi_jax.dit"
VAE_FORMAT = "magi_jax.vae"


def is_converted(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "magi_jax.json"))


def _save_params(model, directory: str, meta: dict) -> str:
  directory = os.path.abspath(directory)
  params = os.path.join(directory, "params")
  if os.path.exists(params):
    raise FileExistsError(f"{params} exists; refusing to overwrite a converted checkpoint")
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(params, nnx.state(model, nnx.Param))
  ckptr.wait_until_finished()
  with open(os.path.join(directory, "magi_jax.json"), "w") as f:
    json.dump(meta, f)
  return directory


def _read_meta(directory: str, fmt: str) -> dict:
  meta_path = os.path.join(directory, "magi_jax.json")
  if not os.path.exists(meta_path):
    raise CheckpointFormatError(f"{directory}: not a converted magi_jax checkpoint "
                                "(no magi_jax.json)")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != fmt:
    raise CheckpointFormatError(f"{meta_path}: format {meta.get('format')!r}, expected {fmt!r}")
  return meta


def _restore_params(abstract, directory: str, config_name: str, per_layer: bool = False):
  """Restores the parameters of `abstract`; `per_layer` also accepts the pre-stacking DiT
  layout (see the module docstring)."""
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  path = os.path.join(directory, "params")
  try:
    if per_layer and _has_per_layer_layout(path):
      restored = _restore_per_layer(path, params)
    else:
      restored = ocp.StandardCheckpointer().restore(path, params)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointFormatError(f"{directory}/params does not match the config in "
                                f"{config_name}: {e}") from None
  return nnx.merge(graphdef, restored, rest)


def _has_per_layer_layout(path: str) -> bool:
  """True when the saved tree holds `layers/<int>/...` (saved before layer stacking)."""
  meta = ocp.StandardCheckpointer().metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  layers = tree.get("layers") if hasattr(tree, "get") else None
  return hasattr(layers, "keys") and bool(layers) and all(str(k).isdigit() for k in layers)


def _restore_per_layer(path: str, params):
  """Reads `layers/<i>/<name>` tensors into the stacked `params` (abstract State)."""
  flat = list(nnx.to_flat_state(params))
  target = []
  for p, var in flat:
    if p[0] != "layers":
      target.append((p, var))
      continue
    one = jax.ShapeDtypeStruct(var.shape[1:], var.dtype)
    target += [(("layers", i) + p[1:], var.replace(one)) for i in range(var.shape[0])]
  restored = dict(nnx.to_flat_state(
      ocp.StandardCheckpointer().restore(path, nnx.from_flat_state(target))))
  for p, var in flat:
    if p[0] == "layers":
      var.set_value(jnp.stack([restored.pop(("layers", i) + p[1:]).get_value()
                               for i in range(var.shape[0])]))
    else:
      var.set_value(restored[p].get_value())
  return params


def save_converted(model: VideoDiT, cfg: MagiConfig, directory: str, *, precision: str) -> None:
  directory = _save_params(model, directory, {"format": FORMAT, "distill": bool(model.distill),
                                              "precision": precision})
  save_magi_config(cfg, os.path.join(directory, "magi_config.json"))


def load_converted(directory: str, *, precision: str | None = None) -> tuple[VideoDiT, MagiConfig]:
  """Restores a converted DiT; `precision` ('fp32'/'bf16') overrides the saved one."""
  directory = os.path.abspath(directory)
  meta = _read_meta(directory, FORMAT)
  cfg = load_magi_config(os.path.join(directory, "magi_config.json"))
  policy = Precision.named(precision or meta["precision"])
  abstract = nnx.eval_shape(lambda: VideoDiT(cfg.model, precision=policy,
                                             distill=meta["distill"], rngs=nnx.Rngs(0)))
  return _restore_params(abstract, directory, "magi_config.json", per_layer=True), cfg


def save_converted_vae(model, directory: str, *, precision: str) -> None:
  from magi_jax.models.vae import save_vae_config
  directory = _save_params(model, directory, {"format": VAE_FORMAT, "precision": precision})
  save_vae_config(model.cfg, directory)


def load_converted_vae(directory: str, *, precision: str | None = None):
  """Restores a converted VAE; `precision` ('fp32'/'bf16') overrides the saved one."""
  from magi_jax.models.vae import ViTVAE, load_vae_config
  directory = os.path.abspath(directory)
  meta = _read_meta(directory, VAE_FORMAT)
  cfg = load_vae_config(directory)
  policy = Precision.named(precision or meta["precision"])
  abstract = nnx.eval_shape(lambda: ViTVAE(cfg, precision=policy, rngs=nnx.Rngs(0)))
  return _restore_params(abstract, directory, "config.json")


T5_FORMAT = "magi_jax.t5"


def save_converted_t5(model, directory: str, *, tokenizer_dir: str | None = None) -> None:
  """T5 encoder parameters in orbax + its HF config.json (+ the tokenizer files, copied)."""
  import shutil
  from magi_jax.text.t5 import t5_config_to_dict
  directory = _save_params(model, directory, {"format": T5_FORMAT,
                                              "dtype": str(jnp.dtype(model.dtype))})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(t5_config_to_dict(model.cfg), f, indent=2)
  if tokenizer_dir:
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json"):
      if os.path.exists(os.path.join(tokenizer_dir, name)):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(directory, name))


def load_converted_t5(directory: str):
  from magi_jax.text.t5 import T5Encoder, load_t5_config
  directory = os.path.abspath(directory)
  meta = _read_meta(directory, T5_FORMAT)
  cfg = load_t5_config(directory)
  abstract = nnx.eval_shape(lambda: T5Encoder(cfg, dtype=jnp.dtype(meta["dtype"]),
                                              rngs=nnx.Rngs(0)))
  return _restore_params(abstract, directory, "config.json")
