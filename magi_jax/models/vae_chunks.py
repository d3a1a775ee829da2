"""The per-chunk VAE encoding training uses, one function for the train step and for the offline
`experiments.prepare` job, so both write the same bits.

Each chunk of F frames (24 for MAGI-1) is encoded on its own, like one temporal tile of the
official tiled encoder: a chunk's latents do not depend on the video it was packed next to.
The chunks run one after another through `jax.lax.map` (one compiled body, a batch of one
chunk), so a chunk's latents do not depend on how many chunks a call holds either: XLA picks
kernels by shape, and a batch of 6 chunks is not computed like a batch of 2 bit for bit. The
in-step encoder of a packed batch and the offline encoder of a group of clips therefore agree
exactly, which `tests/test_prepare.py` checks (measured on XLA:CPU: batches of 1, 2, 3 and 6
chunks, and 4 devices under shard_map, give the same bits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from magi_jax.media.read import pixels_to_model


def chunk_encoder(vae):
  """frames uint8 (N, F, H, W, 3) -> posterior means (N, C, F/4, H/8, W/8) in the VAE's
  compute dtype (unscaled), chunk by chunk. Frozen: no gradient."""
  graphdef, state = nnx.split(vae)

  def encode_one(frames):
    m = nnx.merge(graphdef, state)
    x = pixels_to_model(frames[None])
    return m.encode(x.astype(m.precision.compute_dtype))[0]

  def encode(frames):
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f"chunk_encoder takes frames (N, F, H, W, 3), got {frames.shape}")
    if frames.shape[0] == 1:
      # XLA removes a loop of one trip and fuses its body into the caller, which rounds
      # differently; two trips keep the loop (the padding chunk is dropped).
      return encode(jnp.concatenate([frames, jnp.zeros_like(frames)]))[:1]
    return jax.lax.stop_gradient(jax.lax.map(encode_one, frames))

  return encode


def scaled(z, scale_factor: float):
  """Stored or just-computed posterior means -> the DiT's latents (float32 x scale_factor)."""
  return z.astype(jnp.float32) * scale_factor
