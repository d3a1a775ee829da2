"""The MAGI-1 video DiT (official inference/model/dit/dit_model.py, dit_module.py): one forward call
over a few chunks of latent video.

Layout: latents are (N, C, T, H, W) like the official code; inside, tokens are (N, S, D) with
S ordered T-major, then H, then W, so chunk j owns tokens [j·tok, (j+1)·tok).
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


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def tok_per_chunk(T, H, W, drn, p, pt) -> int:
  return (T // pt) * (H // p) * (W // p) // drn


def _local_ranges(kv_range, N: int, drn: int, S: int, slice_point, n_cache: int):
  """Official kv ranges -> ranges inside each element's own [cache; current] key sequence.

  Official ranges are absolute token positions from the start of the video (the official cache
  starts at chunk 0), and for N > 1 element b's keys start at b·(slice_point·tok + S). Our key
  sequence starts at slice_point·tok - n_cache (the cache holds only the chunks needed).
  """
  tok = S // drn
  elem = np.arange(N * drn) // drn
  xp = np if isinstance(kv_range, np.ndarray) else jnp
  per_elem = slice_point * tok + S
  return kv_range - (xp.asarray(elem) * per_elem)[:, None] - (slice_point * tok - n_cache)


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
  def check_inputs(self, x, t, y, xattn_mask, kv_range, caption_dropout_mask=None, *,
                   slice_point=0, chunk_width=None, step_size=None,
                   cache: KVCache | None = None):
    """Raises InputError naming the problem; kv ranges are checked when they are concrete."""
    cfg = self.cfg
    if self.distill and step_size is None:
      raise InputError("a distilled model needs step_size (see distill_step_size)")
    if y.ndim == 4:
      y = y[:, 0]
    if xattn_mask.ndim == 3:
      xattn_mask = xattn_mask[:, 0]
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
    drn = t.shape[1]
    if T % (drn * pt):
      raise InputError(f"{T} latent frames cannot be split into {drn} equal chunks")
    if chunk_width is not None and chunk_width * drn != T:
      raise InputError(f"chunk_width {chunk_width} x {drn} chunks != {T} latent frames")
    if y.shape[0] != N * drn or y.shape[-1] != cfg.caption_channels:
      raise InputError(f"y must have N*chunks = {N * drn} rows of {cfg.caption_channels} "
                       f"channels, got {y.shape}")
    if xattn_mask.shape[0] != N * drn or xattn_mask.shape[-1] != y.shape[-2]:
      raise InputError(f"xattn_mask {xattn_mask.shape} does not match y {y.shape}")
    if tuple(kv_range.shape) != (N * drn, 2):
      raise InputError(f"kv_range must be (N*chunks, 2) = ({N * drn}, 2), got {kv_range.shape}")
    if cache is not None:
      want = (cfg.num_layers, None, None, cfg.num_query_groups, cfg.head_dim)
      for name, arr in (("k", cache.k), ("v", cache.v)):
        if (arr.ndim != 5 or arr.shape[1] not in (1, N)
            or any(w is not None and a != w for a, w in zip(arr.shape, want))):
          raise InputError(f"cache.{name} has shape {tuple(arr.shape)}; this call needs "
                           f"(layers={cfg.num_layers}, N={N} or 1 (shared by every element), "
                           f"tokens, kv_groups={cfg.num_query_groups}, head_dim={cfg.head_dim})")
      if cache.num_tokens % tok_per_chunk(T, H, W, drn, p, pt):
        raise InputError(f"cache holds {cache.num_tokens} tokens, not a whole number of "
                         f"{tok_per_chunk(T, H, W, drn, p, pt)}-token chunks")
    if caption_dropout_mask is not None and not (
        np.size(caption_dropout_mask) in (1, N)
        or tuple(np.shape(caption_dropout_mask)) == (N, drn)):
      raise InputError(f"caption_dropout_mask must have 1 or N={N} entries, or one per chunk "
                       f"({N}, {drn}), got shape {np.shape(caption_dropout_mask)}")
    S = (T // pt) * (H // p) * (W // p)
    n_cache = 0 if cache is None else cache.num_tokens
    if all(_is_concrete(a) for a in (kv_range, slice_point)):
      local = _local_ranges(np.asarray(kv_range), N, drn, S, int(slice_point), n_cache)
      lo, hi = int(local.min()), int(local.max())
      if lo < 0 or hi > n_cache + S or np.any(local[:, 0] > local[:, 1]):
        raise InputError(
            f"kv_range {np.asarray(kv_range).tolist()} reaches keys outside [cache; current] "
            f"(in local units [{lo}, {hi}) vs {n_cache} cached + {S} current tokens, "
            f"slice_point {int(slice_point)}): pass a cache that covers the chunks the ranges need")

  def __call__(self, x, t, y, xattn_mask, kv_range, caption_dropout_mask=None, *,
               slice_point=0, chunk_width: int | None = None, step_size=None,
               cache: KVCache | None = None, backend: str = "auto",
               return_kv: bool = False, return_activations: bool = False,
               frame_index=None, frame_total=None,
               self_mask_layout: str = "general", self_ranges=None,
               kv_tokens: int | None = None) -> DiTOutput:
    """One official `VideoDiTModel.forward`.

    Args:
      x: (N, C_lat, T, H, W) latents of the call's chunks.
      t: (N, chunks) timesteps, 0 = noise, 1 = clean.
      y: (N*chunks, [1,] L, C) caption rows; xattn_mask (N*chunks, [1,] L) valid tokens.
      kv_range: (N*chunks, 2) official key-token ranges: absolute positions from the start
        of the video, element-major for N > 1 (element b's keys start at b·range_num·tok).
      caption_dropout_mask: (N,) or (1,) bool, or (N, chunks) per chunk (packed training rows);
        picks the adaLN null row (default False).
      slice_point: index of the call's first chunk (earlier chunks come from `cache`).
      step_size: the distilled model's step-size value (`distill_step_size`).
      cache: keys/values of the chunks right before `slice_point`, all layers.
      backend: attention backend name (see `magi_jax.attention.backends()`).
      frame_index, frame_total: (N, token frames) for packed rows: each token frame's index
        inside its own video and that video's length; RoPE time then restarts per video
        (default: one video per row, time from `slice_point`).
      self_mask_layout: static promise about the self-attention ranges (`ChunkMask.layout`):
        "causal_segments" when kv_range is packed rows or unlimited-window block-causal
        attention over the call's own chunks (no cache), which lets backends with a static
        mask (splash) run under jit; "general" (default) promises nothing.
      self_ranges: optional static (numpy) (N, chunks, 2) self-attention ranges inside each
        element's own [cache; current] keys; used instead of the ranges derived from kv_range
        (the same ranges, known on the host: a sampler step's window plan fixes them), so
        kernels that need a static mask (splash) compute it exactly.
      kv_tokens: with return_kv, keep only each layer's first kv_tokens keys / values.
    """
    cfg, policy = self.cfg, self.precision
    if y.ndim == 4:
      y = y[:, 0]
    if xattn_mask.ndim == 3:
      xattn_mask = xattn_mask[:, 0]
    kv_range = jnp.asarray(kv_range) if _is_concrete(kv_range) else kv_range
    self.check_inputs(x, t, y, xattn_mask, kv_range, caption_dropout_mask,
                      slice_point=slice_point, chunk_width=chunk_width, step_size=step_size,
                      cache=cache)
    N, _, T, H, W = x.shape
    drn = t.shape[1]
    p, pt = cfg.patch_size, cfg.t_patch_size
    Tt, Ht, Wt = T // pt, H // p, W // p
    S = Tt * Ht * Wt
    tok = S // drn
    cw = chunk_width if chunk_width is not None else T // drn
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

    # Conditioning: per-chunk timestep embedding + the adaLN null-caption row.
    temb = self.t_embedder(t.reshape(-1), policy)
    if acts is not None:
      acts["t_embedder"] = temb
    if self.distill:
      dt = jnp.broadcast_to(jnp.asarray(step_size, F32), (N * drn,))
      temb = temb + self.t_embedder(dt, policy)
    if caption_dropout_mask is None:
      caption_dropout_mask = jnp.zeros((1,), bool)
    drop = jnp.asarray(caption_dropout_mask).astype(bool)
    if drop.ndim == 2 and drop.shape == (N, drn):                 # one adaLN row per chunk
      ya = self.y_embedder.adaln(drop.reshape(-1), policy).reshape(N, drn, -1)
    else:
      ya = self.y_embedder.adaln(jnp.broadcast_to(drop.reshape(-1), (N,)), policy)[:, None, :]
    cond = policy.low(temb.reshape(N, drn, -1) + ya)

    # Caption features: valid tokens first (the official code packs them), one row per chunk.
    feats = self.y_embedder.xattn_features(y, policy)
    if acts is not None:
      acts["y_embedder.0"] = feats[:, None]
      acts["y_embedder.1"] = ya[:, :1]
    valid = xattn_mask.astype(bool)
    order = jnp.argsort(~valid, axis=1, stable=True)
    feats = policy.low(jnp.take_along_axis(feats, order[:, :, None], axis=1))
    xmask = ChunkMask(caption_ranges(valid.sum(axis=1)), q_block=tok, layout="key_prefix")

    # Self-attention mask: official absolute ranges -> ranges in each element's own keys.
    n_cache = 0 if cache is None else cache.num_tokens
    local = _local_ranges(kv_range, N, drn, S, slice_point, n_cache)
    if self_ranges is not None:
      self_ranges = np.asarray(self_ranges, np.int32)
      if self_ranges.shape != (N, drn, 2) or self_ranges.min() < 0 or (
          self_ranges.max() > n_cache + S):
        raise InputError(f"self_ranges must be (N, chunks, 2) = ({N}, {drn}, 2) inside the "
                         f"{n_cache + S} keys of [cache; current], got {self_ranges.tolist()}")
      self_mask = ChunkMask(self_ranges, q_block=tok, layout=self_mask_layout)
    else:
      self_mask = ChunkMask(jnp.clip(local, 0, n_cache + S).reshape(N, drn, 2).astype(jnp.int32),
                            q_block=tok, layout=self_mask_layout)

    if frame_index is None:
      rope = rope_table(self.rope_bands[...], Tt, Ht, Wt, frame_offset=slice_point * cw // pt)
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


def rope_for_call(model: VideoDiT, frames: int, height: int, width: int, slice_point: int,
                  chunk_width: int):
  """The official `rope.get_embed` table ([sin | cos], (S, 6·nb)) for a call; a debug aid."""
  sin, cos = rope_table(model.rope_bands[...], frames, height, width,
                        frame_offset=slice_point * chunk_width // model.cfg.t_patch_size)
  return jnp.concatenate([sin, cos], axis=-1)
