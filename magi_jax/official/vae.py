"""Official VAE directory (`config.json` + `diffusion_pytorch_model.safetensors`) <-> `ViTVAE`."""

from __future__ import annotations

import os

from flax import nnx

from magi_jax.official import vae_layout
from magi_jax.formats.safetensors_io import CheckpointFormatError, SafetensorsFile, save_safetensors
from magi_jax.official.strict import export_state_dict, load_strict
from magi_jax.models import Precision
from magi_jax.models.vae import VAEConfig, ViTVAE, load_vae_config, save_vae_config

WEIGHTS = "diffusion_pytorch_model.safetensors"


def load_official_vae(checkpoint, cfg: VAEConfig | None = None, *,
                      precision: Precision = Precision.fp32()) -> ViTVAE:
  """`checkpoint`: the official directory (config read from it), a safetensors path or a dict."""
  if isinstance(checkpoint, str) and os.path.isdir(checkpoint):
    cfg = cfg or load_vae_config(checkpoint)
    path = os.path.join(checkpoint, WEIGHTS)
    if not os.path.exists(path):
      raise CheckpointFormatError(f"{path}: VAE weights not found")
    checkpoint = SafetensorsFile(path)      # lazy: tensors are read one at a time
  elif isinstance(checkpoint, str):
    checkpoint = SafetensorsFile(checkpoint)
  if cfg is None:
    raise ValueError("a VAEConfig is needed when the checkpoint is not an official directory")
  abstract = nnx.eval_shape(lambda: ViTVAE(cfg, precision=precision, rngs=nnx.Rngs(0)))
  return load_strict(checkpoint, vae_layout.layout(cfg), abstract)


def save_official_vae(model: ViTVAE, directory: str, dtype=None) -> None:
  os.makedirs(directory, exist_ok=True)
  save_safetensors(export_state_dict(model, vae_layout.layout(model.cfg), dtype),
                   os.path.join(directory, WEIGHTS))
  save_vae_config(model.cfg, directory)
