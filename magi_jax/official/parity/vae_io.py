"""`vae_io`: the official ViTVAE encode / decode against the port in float32.

The plain keys are a pure fp32 run: encoder moments, posterior mean, decode of that mean and
decode of a latent whose grid differs from the position table (trilinear resize); checked
with the port in fp32 at 1e-5. The tiled keys exist only as the official bf16 pipeline run
(`.bf16`); they are checked with the port in bf16 at bf16 tolerance (the reference's own bf16
vs float64 spread is ~5e-2 abs). A wrong tile crop or blending order is off by ~2 there.
"""

from __future__ import annotations

import json

from magi_jax.official.vae import load_official_vae
from magi_jax.models import Precision
from magi_jax.models.vae import vae_config_from_dict
from magi_jax.models.vae_tiling import TileConfig, tiled_decode, tiled_encode
from magi_jax.official.parity import fixtures
from magi_jax.official.parity.compare import compare

FILE = "vae_io.safetensors"
ATOL, RTOL = 1e-5, 1e-5     # the reference's own fp32-vs-float64 spread is 3.5e-6
BF16_ATOL, BF16_RTOL = 5e-2, 1e-2


def run(directory: str, *, activations: bool = False, backend: str = "reference"):
  del activations, backend   # the VAE has one attention pattern (full) and no debug dumps
  with open(fixtures.path(directory, "vae_config.json")) as f:
    raw_cfg = json.load(f)
  cfg = vae_config_from_dict(raw_cfg, "vae_config.json")
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
  if "tiled_enc.in.x" in d or "tiled_dec.in.z" in d:
    tc = TileConfig(**raw_cfg.get("tiled_call_kwargs", {}))
    bf = load_official_vae(weights, cfg, precision=Precision.bf16())
    if "tiled_enc.in.x" in d:
      x = d["tiled_enc.in.x"].astype(bf.precision.compute_dtype)
      results.append(compare("vae_io/tiled_encode (bf16)", tiled_encode(bf, x, tc),
                             d["tiled_enc.out.z_mode.bf16"], atol=BF16_ATOL, rtol=BF16_RTOL))
    if "tiled_dec.in.z" in d:
      results.append(compare("vae_io/tiled_decode (bf16)",
                             tiled_decode(bf, d["tiled_dec.in.z"], tc),
                             d["tiled_dec.out.x.bf16"], atol=BF16_ATOL, rtol=BF16_RTOL))
  return results
