"""Streams latent chunks through the DiT one chunk at a time with the bounded KV cache, and
checks the result against one block-causal forward over all chunks.

This is the chunk-causal machinery the sampler is built on: each call sees only its own chunk
plus cached keys/values of the `kv_window - 1` chunks before it, and the cache never holds
more than that, so memory stays flat however long the video is.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx

from magi_jax.attention import ChunkMask, chunk_kv_ranges
from magi_jax.configs import MagiConfig
from magi_jax.models.dit import VideoDiT
from magi_jax.models.embedders import distill_step_size
from magi_jax.models.kv_cache import KVCacheStore
from magi_jax.models.precision import Precision


@dataclasses.dataclass
class ChunkReport:
  chunk: int
  seconds: float
  cache_bytes: int
  max_abs_diff: float


def run(cfg: MagiConfig, *, num_chunks: int, latent_h: int, latent_w: int, kv_window: int,
        backend: str, precision: str, seed: int, log=print):
  m = cfg.model
  chunk_width = cfg.runtime.chunk_width
  policy = Precision.named(precision)
  model = VideoDiT(m, precision=policy, distill=cfg.engine.distill, rngs=nnx.Rngs(seed))
  kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (1, m.latent_channels, num_chunks * chunk_width, latent_h, latent_w))
  t = jax.random.uniform(kt, (1, num_chunks))
  y = jax.random.normal(ky, (num_chunks, m.caption_max_length, m.caption_channels))
  mask = jnp.ones((num_chunks, m.caption_max_length), jnp.int32)
  step = distill_step_size(cfg.runtime.num_steps) if cfg.engine.distill else None
  tokens_per_chunk = chunk_width * (latent_h // m.patch_size) * (latent_w // m.patch_size)
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("return_kv",))
  def forward(state, x, t, y, mask, ranges, first_chunk, cache, *, return_kv):
    return nnx.merge(graphdef, state)(x, t, y, mask, ChunkMask(ranges, q_block=tokens_per_chunk),
                                      first_chunk=first_chunk, step_size=step, cache=cache,
                                      backend=backend, return_kv=return_kv)

  widths = [kv_window] * num_chunks
  full_ranges = chunk_kv_ranges(range(num_chunks), widths=widths, tokens_per_chunk=tokens_per_chunk)
  full = forward(state, x, t, y, mask, full_ranges[None], 0, None, return_kv=False).velocity

  store = KVCacheStore(capacity_chunks=kv_window - 1 if kv_window > 1 else 1,
                       tokens_per_chunk=tokens_per_chunk)
  reports = []
  for c in range(num_chunks):
    need = min(c, kv_window - 1)
    cache = store.read(c, need)
    sl = slice(c * chunk_width, (c + 1) * chunk_width)
    rng = chunk_kv_ranges([c], widths=[kv_window], cache_start=c - need,
                          tokens_per_chunk=tokens_per_chunk)
    t0 = time.perf_counter()
    out = forward(state, x[:, :, sl], t[:, c:c + 1], y[c:c + 1], mask[c:c + 1], rng[None],
                  jnp.asarray(c, jnp.int32), cache, return_kv=True)
    out.velocity.block_until_ready()
    dt = time.perf_counter() - t0
    store.write(c, out.kv)
    diff = float(jnp.max(jnp.abs(out.velocity - full[:, :, sl])))
    reports.append(ChunkReport(c, dt, store.nbytes(), diff))
    log(f"chunk {c}: {dt * 1e3:8.1f} ms  cache {store.nbytes() / 2 ** 10:8.1f} KiB "
        f"({store.num_chunks} chunks)  max|streamed - full| = {diff:.2e}")
  return reports, tokens_per_chunk
