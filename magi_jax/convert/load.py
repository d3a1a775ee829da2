"""A model from a checkpoint directory (converted orbax or the official layout, detected) or,
where allowed, from seeded random weights, so every pipeline runs anywhere without downloads.

Used by sampling (magi_jax.generate) and training (magi_jax.train.build) alike.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.configs import MagiConfig
from magi_jax.errors import MagiError
from magi_jax.models import Precision, VideoDiT
from magi_jax.models.vae import VAEConfig, ViTVAE
from magi_jax.text import T5Config, T5Encoder, TextEncoder
from magi_jax.text.tokenizer import ByteTokenizer


class ComponentError(MagiError, ValueError):
  pass


# The random-weight VAE of the tiny preset (the geometry of the official one, much smaller).
TINY_VAE = VAEConfig(video_size=32, video_length=8, patch_size=8, patch_length=4, in_chans=3,
                     z_chans=16, double_z=True, embed_dim=256, depth=1, num_heads=8,
                     mlp_ratio=1.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                     attn_drop_rate=0.0, drop_path_rate=0.0, with_cls_token=True,
                     norm_code=False, ln_in_attn=True, conv_last_layer=True, use_rope=False,
                     use_final_proj=False)


def _owner(module, path):
  for name in path[:-1]:
    module = module[name] if isinstance(name, int) else getattr(module, name)
  return module


def random_module(build, seed: int, scale: float = 0.02):
  """`build()` with seeded random parameters, filled from numpy (no compilation).

  Matrices and conv kernels get N(0, 1/fan_in); norm gains get 1 + N(0, scale²) (or
  N(0, scale²) for the "1p" norms, whose gain is 1 + w); other vectors N(0, scale²). So a
  random model has non-degenerate activations everywhere. A module with stacked layers
  (`stacked_axes(path)`, e.g. VideoDiT) gets these rules per layer, from each parameter's
  per-layer shape.
  """
  abstract = nnx.eval_shape(build)
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  stacked = getattr(abstract, "stacked_axes", lambda path: 0)
  for path, var in sorted(nnx.to_flat_state(state), key=lambda kv: str(kv[0])):
    value = var.get_value()
    full, dtype = value.shape, value.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      var.set_value(jnp.zeros(full, dtype))
      continue
    shape = full[stacked(path):]
    base = 0.0
    if len(shape) >= 2:
      std = float(np.prod(shape[:-1] if len(shape) == 2 else shape[1:])) ** -0.5
    else:
      std = scale
      owner = _owner(abstract, path)
      if path[-1] == "weight" and "norm" in type(owner).__name__.lower() + str(path[-2]).lower():
        base = 0.0 if getattr(owner, "one_plus", False) else 1.0
    var.set_value(jnp.asarray((base + rng.standard_normal(full) * std).astype(np.float32), dtype))
  return nnx.merge(graphdef, state)


def _require_dir(path: str, what: str):
  if not os.path.isdir(path):
    raise ComponentError(f"{what} checkpoint {path!r} not found (a directory is expected)")


def load_dit(path: str, cfg: MagiConfig, precision: str, *, random_ok: bool, seed: int = 0):
  from magi_jax.official.dit import load_official_dit
  from magi_jax.convert.orbax_io import is_converted, load_converted
  if not path:
    if not random_ok:
      raise ComponentError("no DiT checkpoint given (--config.dit_checkpoint); random weights are "
                           "only allowed with the tiny preset")
    return random_module(lambda: VideoDiT(cfg.model, precision=Precision.named(precision),
                                          distill=cfg.engine.distill, rngs=nnx.Rngs(seed)),
                         seed), cfg
  _require_dir(path, "DiT")
  if is_converted(path):
    return load_converted(path, precision=precision)
  return load_official_dit(path, cfg.model, precision=Precision.named(precision),
                           distill=cfg.engine.distill, progress=True), cfg


def load_vae(path: str, precision: str, *, random_ok: bool, seed: int = 0):
  from magi_jax.convert.orbax_io import is_converted, load_converted_vae
  from magi_jax.official.vae import load_official_vae
  if not path:
    if not random_ok:
      raise ComponentError("no VAE checkpoint given (--config.vae_checkpoint)")
    return random_module(lambda: ViTVAE(TINY_VAE, precision=Precision.named(precision),
                                        rngs=nnx.Rngs(seed)), seed + 1)
  _require_dir(path, "VAE")
  if is_converted(path):
    return load_converted_vae(path, precision=precision)
  return load_official_vae(path, precision=Precision.named(precision))


def load_text_encoder(path: str, cfg: MagiConfig, *, random_ok: bool, cache_dir: str | None,
                      seed: int = 0, dtype: str = "float32") -> TextEncoder:
  """The prompt encoder of `path` (converted or Hugging Face T5 directory; empty: the tiny
  preset's random T5) with its weights in `dtype` (float32 as MAGI-1 runs it, or bfloat16 for
  small devices; the embedding cache keeps the two apart)."""
  from magi_jax.convert.orbax_io import is_converted, load_converted_t5
  from magi_jax.text.t5 import with_dtype
  from magi_jax.text.tokenizer import T5Tokenizer
  if dtype not in ("float32", "bfloat16"):
    raise ComponentError(f"--config.t5_dtype={dtype!r}: use float32 or bfloat16")
  max_length = cfg.model.caption_max_length
  if not path:
    if not random_ok:
      raise ComponentError("no T5 checkpoint given (--config.t5_checkpoint)")
    t5cfg = T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=cfg.model.caption_channels,
                     d_kv=8, num_heads=4, d_ff=2 * cfg.model.caption_channels, num_layers=2)
    t5 = random_module(lambda: T5Encoder(t5cfg, rngs=nnx.Rngs(0)), seed + 2, scale=1.0)
    return TextEncoder(with_dtype(t5, dtype), ByteTokenizer(), max_length=max_length,
                       cache_dir=cache_dir, model_id=f"random-tiny-t5-{seed}")
  _require_dir(path, "T5")
  if is_converted(path):
    from magi_jax.text.encoder import directory_fingerprint
    enc = TextEncoder(with_dtype(load_converted_t5(path), dtype), T5Tokenizer(path),
                      max_length=max_length, cache_dir=cache_dir,
                      model_id=directory_fingerprint(path))
  else:
    from magi_jax.official.t5 import load_text_encoder as load_official_text_encoder
    enc = load_official_text_encoder(path, max_length=max_length, cache_dir=cache_dir,
                                     dtype=jnp.dtype(dtype))
  if enc.t5.cfg.d_model != cfg.model.caption_channels:
    raise ComponentError(f"T5 d_model {enc.t5.cfg.d_model} != the DiT's caption_channels "
                         f"{cfg.model.caption_channels}")
  return enc
