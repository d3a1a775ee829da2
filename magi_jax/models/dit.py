"""The MAGI-1 video DiT (official inference/model/dit/dit_model.py, dit_module.py).

One forward call over a few consecutive chunks of latent video, with JAX-native inputs:
per-chunk levels, a `ChunkMask` of self-attention key ranges, caption rows and an explicit
choice of the adaLN null-caption row. The official call format (absolute kv ranges,
slice_point, caption dropout) is the adapter `magi_jax.official.forward`.

Layout: latents are (N, C, T, H, W) like the official code; inside, tokens are (N, S, D) with
S ordered T-major, then H, then W, so chunk j owns tokens
[j·tokens_per_chunk, (j+1)·tokens_per_chunk).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from magi_jax.errors import MagiError
from magi_jax.attention import ChunkMask, caption_ranges
from magi_jax.attention.masks import concrete_ranges
from magi_jax.configs import ModelConfig
from magi_jax.models.embedders import CaptionEmbedder, TimestepEmbedder
from magi_jax.models.kv_cache import KVCache
from magi_jax.models.layers import LayerNorm, Linear
from magi_jax.models.precision import Precision
from magi_jax.models.rope import default_bands, packed_rope_table, rope_table
from magi_jax.models.stack import (DEFAULT_REMAT_POLICY, LayerInputs, remat_policy, run_layers,
                                   stacked_axes, stacked_layers)
from magi_jax.parallel.rules import constrain

F32 = jnp.float32


class InputError(MagiError, ValueError):
  """A forward-call input has the wrong shape or an impossible value."""


@dataclasses.dataclass
class DiTOutput:
  velocity: jax.Array                     # (N, C_lat, T, H, W) float32
  kv: KVCache | None = None               # this call's keys/values, when return_kv
  activations: dict[str, Any] | None = None


jax.tree_util.register_dataclass(DiTOutput, data_fields=["velocity", "kv", "activations"],
                                 meta_fields=[])


def chunk_token_count(T, H, W, chunks, p, pt) -> int:
  return (T // pt) * (H // p) * (W // p) // chunks


def check_latents(model, x, t, step_size) -> tuple[int, int, int, int, int]:
  """(N, T, H, W, chunks) of a call's latents and levels; InputError naming the problem
  otherwise. Shared by the core call and the official adapter."""
  cfg = model.cfg
  if model.distill and step_size is None:
    raise InputError("a distilled model needs step_size (see distill_step_size)")
  if x.ndim != 5:
    raise InputError(f"x must be (N, C, T, H, W), got shape {x.shape}")
  N, C, T, H, W = x.shape
  if C != cfg.latent_channels:
    raise InputError(f"x has {C} channels; this model takes {cfg.latent_channels}")
  p, pt = cfg.patch_size, cfg.t_patch_size
  if H % p or W % p:
    raise InputError(f"latent height/width ({H}x{W}) must be divisible by patch_size {p}")
  if t.ndim != 2 or t.shape[0] != N:
    raise InputError(f"t must be (N, chunks) = ({N}, chunks), got {t.shape}")
  chunks = t.shape[1]
  if T % (chunks * pt):
    raise InputError(f"{T} latent frames cannot be split into {chunks} equal chunks")
  return N, T, H, W, chunks


def check_cache(cfg: ModelConfig, cache: KVCache | None, N: int, tokens_per_chunk: int) -> None:
  """Raises InputError unless `cache` fits a call of N elements with chunks of
  `tokens_per_chunk` tokens."""
  if cache is None:
    return
  want = (cfg.num_layers, None, None, cfg.num_query_groups, cfg.head_dim)
  for name, arr in (("k", cache.k), ("v", cache.v)):
    if (arr.ndim != 5 or arr.shape[1] not in (1, N)
        or any(w is not None and a != w for a, w in zip(arr.shape, want))):
      raise InputError(f"cache.{name} has shape {tuple(arr.shape)}; this call needs "
                       f"(layers={cfg.num_layers}, N={N} or 1 (shared by every element), "
                       f"tokens, kv_groups={cfg.num_query_groups}, head_dim={cfg.head_dim})")
  if cache.num_tokens % tokens_per_chunk:
    raise InputError(f"cache holds {cache.num_tokens} tokens, not a whole number of "
                     f"{tokens_per_chunk}-token chunks")


class VideoDiT(nnx.Module):
  """MAGI-1 DiT. `distill` adds the shortcut step-size embedding of the distilled models.

  `layers` is ONE `TransformerLayer` whose parameters have a leading `num_layers` axis
  (magi_jax/models/stack.py); layer i of the official model is index i of that axis.

  Static switches (plain attributes, read when a call is traced; none changes the values):
    scan_layers: run the layers with a scan over the stacked parameters (default; compiles
      one layer body) or unrolled in a Python loop over the same storage.
    remat: recompute each layer's activations in the backward pass (training memory); set by
      the trainer.
    remat_policy: the `jax.checkpoint_policies` name used under remat (`stack.REMAT_POLICIES`;
      "nothing_saveable" recomputes everything).
  """

  def __init__(self, cfg: ModelConfig, *, precision: Precision = Precision.fp32(),
               distill: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    self.precision = precision
    self.distill = distill
    self.scan_layers = True
    self.remat = False
    self.remat_policy = DEFAULT_REMAT_POLICY
    D, Dc = cfg.hidden_size, cfg.cond_hidden_dim
    patch_in = cfg.in_channels * cfg.t_patch_size * cfg.patch_size ** 2
    self.x_embedder = Linear(patch_in, D, use_bias=False, dtype=F32, rngs=rngs)
    self.t_embedder = TimestepEmbedder(Dc, rngs=rngs)
    self.y_embedder = CaptionEmbedder(cfg.caption_channels, cfg.caption_max_length, D, Dc,
                                      rngs=rngs)
    self.rope_bands = nnx.Param(default_bands(cfg.rope_head_dim // 8))
    self.layers = stacked_layers(cfg, precision, rngs=rngs)
    self.final_norm = LayerNorm(D, eps=cfg.layernorm_epsilon, one_plus=True, dtype=F32, rngs=rngs)
    self.final_linear = Linear(D, cfg.patch_dim, use_bias=False, dtype=F32, rngs=rngs)

  @staticmethod
  def stacked_axes(path) -> int:
    """Leading axes of the parameter at state `path` that index layers (1 under `layers`)."""
    return stacked_axes(path)

  # -------------------------------------------------------------------------------------------
  def check_inputs(self, x, t, captions, caption_mask, self_mask: ChunkMask, *,
                   caption_dropped=None, step_size=None, cache: KVCache | None = None):
    """Raises InputError naming the problem; the key ranges are checked when concrete."""
    cfg = self.cfg
    N, T, H, W, chunks = check_latents(self, x, t, step_size)
    p, pt = cfg.patch_size, cfg.t_patch_size
    if (captions.ndim != 3 or captions.shape[0] != N * chunks
        or captions.shape[-1] != cfg.caption_channels):
      raise InputError(f"captions must be (N*chunks, L, C) = ({N * chunks}, L, "
                       f"{cfg.caption_channels}), got {captions.shape}")
    if caption_mask.shape != captions.shape[:2]:
      raise InputError(f"caption_mask {caption_mask.shape} does not match captions "
                       f"{captions.shape}")
    if not isinstance(self_mask, ChunkMask):
      raise InputError(f"self_mask must be a ChunkMask, got {type(self_mask).__name__}")
    tokens_per_chunk = chunk_token_count(T, H, W, chunks, p, pt)
    if tuple(self_mask.kv_ranges.shape) != (N, chunks, 2) or self_mask.q_block != tokens_per_chunk:
      raise InputError(f"self_mask must hold (N, chunks, 2) = ({N}, {chunks}, 2) key ranges of "
                       f"{tokens_per_chunk}-token chunks, got "
                       f"{tuple(self_mask.kv_ranges.shape)} with q_block {self_mask.q_block}")
    check_cache(cfg, cache, N, tokens_per_chunk)
    n_cache = 0 if cache is None else cache.num_tokens
    if caption_dropped is not None and not (
        np.size(caption_dropped) in (1, N) or tuple(np.shape(caption_dropped)) == (N, chunks)):
      raise InputError(f"caption_dropped must have 1 or N={N} entries, or one per chunk "
                       f"({N}, {chunks}), got shape {np.shape(caption_dropped)}")
    ranges = concrete_ranges(self_mask)
    if ranges is not None and ranges.size:
      S = chunks * tokens_per_chunk
      if ranges.min() < 0 or ranges.max() > n_cache + S or np.any(ranges[..., 0] > ranges[..., 1]):
        raise InputError(f"self-attention key ranges {ranges.tolist()} reach keys outside "
                         f"[cache; current] ({n_cache} cached + {S} current tokens): pass a "
                         "cache that covers the chunks the ranges need")

  def __call__(self, x, t, captions, caption_mask, self_mask: ChunkMask, *,
               caption_dropped=None, first_chunk=0, frame_index=None, frame_total=None,
               step_size=None, cache: KVCache | None = None, backend: str = "auto",
               return_kv: bool = False, return_activations: bool = False,
               kv_tokens: int | None = None) -> DiTOutput:
    """One forward call over a few consecutive chunks of latent video.

    Args:
      x: (N, C_lat, T, H, W) latents of the call's chunks (T = chunks · chunk width).
      t: (N, chunks) the chunks' levels, 0 = noise, 1 = clean.
      captions: (N·chunks, L, C) one caption row per chunk (T5 features);
        caption_mask (N·chunks, L) its valid tokens.
      self_mask: the self-attention `ChunkMask`: (N, chunks, 2) key ranges of each chunk inside
        its element's own keys [cache; current], q_block = tokens per chunk
        (`magi_jax.attention.chunk_kv_ranges(...)` with `tokens_per_chunk`).
      caption_dropped: which of the two learned null-caption rows conditions the chunk through
        adaLN: False (default) the row of chunks that see their caption, True the row of the
        caption-dropped (unconditional) pass. (N,) or (1,) bool, or (N, chunks) per chunk.
      first_chunk: absolute index of the call's first chunk: RoPE time positions start at its
        first frame (may be traced). frame_index, frame_total: (N, token frames) instead, for
        packed rows: each token frame's index inside its own video and that video's length
        (RoPE time restarts per video).
      step_size: the distilled model's step-size value (`distill_step_size`).
      cache: keys / values of the chunks before the call that the ranges reach, all layers.
      backend: attention backend name (see `magi_jax.attention.backends()`).
      kv_tokens: with return_kv, keep only each layer's first kv_tokens keys / values.
    """
    cfg, policy = self.cfg, self.precision
    self.check_inputs(x, t, captions, caption_mask, self_mask, caption_dropped=caption_dropped,
                      step_size=step_size, cache=cache)
    N, _, T, H, W = x.shape
    chunks = t.shape[1]
    p, pt = cfg.patch_size, cfg.t_patch_size
    Tt, Ht, Wt = T // pt, H // p, W // p
    tokens_per_chunk = Tt * Ht * Wt // chunks
    acts = {} if return_activations else None

    # Patch embedding, float32.
    x = x * jnp.asarray(cfg.x_rescale_factor, x.dtype)
    if cfg.half_channel_vae:
      x = jnp.concatenate([x, x], axis=1)
    patches = rearrange(x.astype(F32), "n c (t a) (h b) (w e) -> n (t h w) (c a b e)",
                        a=pt, b=p, e=p)
    h = self.x_embedder(patches, out_dtype=F32, precision=policy.matmul)
    if acts is not None:
      acts["x_embedder"] = rearrange(h, "n (t h w) d -> n d t h w", t=Tt, h=Ht)
    h = constrain(policy.low(h), ("batch", "length", "act_embed"))

    # Conditioning: per-chunk timestep embedding + the chosen adaLN null-caption row.
    temb = self.t_embedder(t.reshape(-1), policy)
    if acts is not None:
      acts["t_embedder"] = temb
    if self.distill:
      dt = jnp.broadcast_to(jnp.asarray(step_size, F32), (N * chunks,))
      temb = temb + self.t_embedder(dt, policy)
    if caption_dropped is None:
      caption_dropped = jnp.zeros((1,), bool)
    drop = jnp.asarray(caption_dropped).astype(bool)
    if drop.ndim == 2 and drop.shape == (N, chunks):              # one adaLN row per chunk
      ya = self.y_embedder.adaln(drop.reshape(-1), policy).reshape(N, chunks, -1)
    else:
      ya = self.y_embedder.adaln(jnp.broadcast_to(drop.reshape(-1), (N,)), policy)[:, None, :]
    cond = policy.low(temb.reshape(N, chunks, -1) + ya)

    # Caption features: valid tokens first (the official code packs them), one row per chunk.
    feats = self.y_embedder.xattn_features(captions, policy)
    if acts is not None:
      acts["y_embedder.0"] = feats[:, None]
      acts["y_embedder.1"] = ya[:, :1]
    valid = caption_mask.astype(bool)
    order = jnp.argsort(~valid, axis=1, stable=True)
    feats = policy.low(jnp.take_along_axis(feats, order[:, :, None], axis=1))
    xmask = ChunkMask(caption_ranges(valid.sum(axis=1)), q_block=tokens_per_chunk,
                      layout="key_prefix")

    if frame_index is None:
      rope = rope_table(self.rope_bands[...], Tt, Ht, Wt,
                        frame_offset=first_chunk * (Tt // chunks))
    else:
      rope = packed_rope_table(self.rope_bands[...], frame_index, frame_total, Ht, Wt)

    remat_policy(self.remat_policy)                 # a clear error for a bad name, always
    cache_kv = None if cache is None else (cache.k, cache.v)
    stack = run_layers(self.layers, h, LayerInputs(cond, rope, self_mask, feats, xmask, policy,
                                                   backend),
                       cache_kv, scan=self.scan_layers, remat=self.remat,
                       policy_name=self.remat_policy, return_kv=return_kv, kv_tokens=kv_tokens,
                       return_hidden=acts is not None)
    h = stack.hidden
    if acts is not None:
      for i in range(cfg.num_layers):
        acts[f"videodit_blocks.layers.{i}"] = stack.per_layer[i]

    hf = self.final_norm(h, out_dtype=F32)
    out = self.final_linear(hf, out_dtype=F32, precision=policy.matmul)
    if acts is not None:
      acts["videodit_blocks.final_layernorm"] = hf
      acts["final_linear"] = out
    out = rearrange(out, "n (t h w) (a b e c) -> n c (t a) (h b) (w e)",
                    t=Tt, h=Ht, a=pt, b=p, e=p)
    out = out[:, :cfg.output_channels] / jnp.asarray(cfg.x_rescale_factor, F32)
    kv = KVCache(*stack.kv) if return_kv else None
    return DiTOutput(out, kv, acts)
