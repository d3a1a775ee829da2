"""What the sampler's parts take on one device, in bytes, from the configs alone.

Exact: the weights (parameter counts of the abstract modules, times the dtype's size) and the
steady state's KV cache (layers x cached tokens x kv groups x head dim x K and V, compute
dtype). Estimated: the largest step's temporaries, tokens in the call (both guidance passes
and the chunks-alone pass of cfg 3, the nearly-clean copy of cfg 1) times the per-token
activations of one layer (MLP hidden, and six model-width buffers) in bf16, times 1.3; and one
VAE decode tile (its MLP and width buffers, plus the attention scores in float32). Against the
TPU compiler (README, `magi_jax.aot`): 4.5B-distill at 480x832 gives 4.18 GiB for the step
against the compiler's 3.46 temp; 4.5B-base at 720x1280, cfg 3, 22.49 against 21.97. The
compiler's own figure (device_plan/compiler.py) replaces the estimate where it is asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from flax import nnx

from magi_jax.aot import components
from magi_jax.aot.sizes import tokens_per_chunk
from magi_jax.aot.steady import default_chunks, steady_calls
from magi_jax.configs import MagiConfig, num_parameters
from magi_jax.models.vae import ViTVAE
from magi_jax.models import Precision
from magi_jax.text import T5Encoder

GIB = 2 ** 30
MARGIN = 1.3                 # on the per-token activation estimate


def _count(make) -> int:
  abstract = nnx.eval_shape(make)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))


@functools.cache
def _t5_params(t5cfg) -> int:
  return _count(lambda: T5Encoder(t5cfg, rngs=nnx.Rngs(0)))


@functools.cache
def _int8_dit_bytes(model_cfg, distill: bool) -> int:
  """Bytes of the DiT with int8 layer kernels (models/quant.py), from its abstract state."""
  from magi_jax.models import VideoDiT
  from magi_jax.models.quant import quantize_int8
  abstract = nnx.eval_shape(lambda: quantize_int8(VideoDiT(
      model_cfg, precision=Precision.bf16(), distill=distill, rngs=nnx.Rngs(0))))
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(nnx.state(abstract)))


@functools.cache
def _vae_params(vcfg) -> int:
  return _count(lambda: ViTVAE(vcfg, precision=Precision.bf16(), rngs=nnx.Rngs(0)))


@dataclasses.dataclass(frozen=True)
class PartSizes:
  """Bytes per part of one sampling run at one video size."""
  dit_weights: int             # bf16
  dit_int8: int                # int8 layer kernels + their scales, the rest bf16
  t5_params: int               # parameter count (the dtype is the plan's choice)
  t5_temp: int                 # one prompt's forward, beyond the weights
  vae_weights: int
  vae_decode_temp: int
  kv_cache: int                # the steady state's cached chunks
  step_temp: int               # the largest steady-state step's temporaries (estimate)
  step_tokens: int             # tokens that step computes

  def t5_weights(self, dtype: str) -> int:
    return self.t5_params * (4 if dtype == "float32" else 2)


def part_sizes(cfg: MagiConfig, height: int, width: int) -> PartSizes:
  m, rt = cfg.model, cfg.runtime
  lh, lw = height // 8, width // 8
  tpc = tokens_per_chunk(cfg, lh, lw)
  calls = steady_calls(cfg, default_chunks(cfg))
  cached = max(c.cache_chunks for c in calls)
  kv = m.num_layers * cached * tpc * m.num_query_groups * m.kv_channels * 2 * 2
  tokens = 0
  for c in calls:
    n = c.call_chunks + int(c.nearly_clean)
    if rt.cfg_number == 3:
      n = 2 * c.call_chunks + c.plan.num_denoised    # passes A and B batched, then C
    tokens = max(tokens, n * tpc)
  mlp = m.ffn_hidden_size * (2 if m.gated_linear_unit else 1)
  step_temp = math.ceil(tokens * (mlp + 6 * m.hidden_size) * 2 * MARGIN)

  t5cfg = components.t5_config(cfg)
  t5_params = _t5_params(t5cfg)
  L = m.caption_max_length
  t5_temp = math.ceil(L * (2 * t5cfg.d_ff + 6 * t5cfg.d_model) * 4 * MARGIN
                      + t5cfg.num_heads * L * L * 4)

  vcfg = components.vae_config(cfg)
  vae_params = _vae_params(vcfg)
  tile = components.decode_tile(vcfg, rt.chunk_width, lh, lw)
  vt = int(np.prod(tile))
  vae_temp = math.ceil(vt * (2 * int(vcfg.mlp_ratio * vcfg.embed_dim) + 6 * vcfg.embed_dim) * 2
                       * MARGIN + vcfg.num_heads * vt * vt * 4)
  return PartSizes(dit_weights=num_parameters(m) * 2,
                   dit_int8=_int8_dit_bytes(m, bool(cfg.engine.distill)), t5_params=t5_params,
                   t5_temp=t5_temp,
                   vae_weights=vae_params * 2, vae_decode_temp=vae_temp, kv_cache=kv,
                   step_temp=step_temp, step_tokens=tokens)
