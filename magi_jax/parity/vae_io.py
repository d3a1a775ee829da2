"""`vae_io`: the official ViTVAE encode / decode against the port in float32.

Implemented: the plain (fp32) keys: encoder moments, posterior mean, decode of that mean, and
decode of a latent whose grid differs from the position table (trilinear resize). The tiled
bf16 keys (`tiled_enc.*`, `tiled_dec.*`) are not checked yet: tiling is not ported.
"""

from __future__ import annotations

import json

from magi_jax.convert.vae_official import load_official_vae
from magi_jax.models import Precision
from magi_jax.models.vae import vae_config_from_dict
from magi_jax.parity import fixtures
from magi_jax.parity.compare import compare

FILE = "vae_io.safetensors"
ATOL, RTOL = 1e-5, 1e-5     # the reference's own fp32-vs-float64 spread is 3.5e-6


def run(directory: str, *, activations: bool = False, backend: str = "reference"):
  del activations, backend   # the VAE has one attention pattern (full) and no debug dumps
  with open(fixtures.path(directory, "vae_config.json")) as f:
    cfg = vae_config_from_dict(json.load(f), "vae_config.json")
  weights = fixtures.tensors(directory, "vae_weights.safetensors")[0]
  vae = load_official_vae(weights, cfg, precision=Precision.fp32())
  d, _ = fixtures.tensors(directory, FILE)
  results = [
      compare("vae_io/encode_moments", vae.moments(d["enc.in.x"]), d["enc.out.moments"],
              atol=ATOL, rtol=RTOL),
      compare("vae_io/encode_mean", vae.encode(d["enc.in.x"]), d["enc.out.z_mode"],
              atol=ATOL, rtol=RTOL),
      compare("vae_io/decode", vae.decode(d["enc.out.z_mode"]), d["dec.out.from_z_mode"],
              atol=ATOL, rtol=RTOL),
  ]
  if "dec.in.z" in d:
    results.append(compare("vae_io/decode_resized_pos", vae.decode(d["dec.in.z"]),
                           d["dec.out.from_z"], atol=ATOL, rtol=RTOL))
  return results
