"""The official MAGI-1 DiT state-dict layout (official dit_module.py,
inference/infra/checkpoint/checkpointing.py) and its map onto `VideoDiT`.

Each `Entry` ties official keys to model paths with a forward transform (official tensors ->
model tensors) and its inverse. One-time weight permutations live here, not in the forward:
PyTorch (out, in) weights become (in, out) kernels, the fused cross-attention K/V weight
(per group: k rows, then v rows) is split in two, and the output projection's 8-group
[self, cross] column interleave is undone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from magi_jax.configs import ModelConfig

INTERLEAVE_GROUPS = 8    # hard-coded in the official code (TP8 compatibility)


@dataclasses.dataclass(frozen=True)
class Entry:
  official: tuple[str, ...]
  paths: tuple[tuple, ...]
  to_model: Callable[..., tuple]
  to_official: Callable[..., tuple]


def _t(w):
  return (np.swapaxes(w, 0, 1),)


def _same(w):
  return (w,)


def linear(official: str, path: tuple) -> Entry:
  return Entry((official,), (path,), _t, _t)


def vector(official: str, path: tuple) -> Entry:
  return Entry((official,), (path,), _same, _same)


def proj_to_model(w, groups=INTERLEAVE_GROUPS):
  """(D, 2P) official columns [(g·2+n)·P/8 + d] -> kernel (2P, D) rows [n·P + g·P/8 + d]."""
  d_out, width = w.shape
  nat = w.reshape(d_out, groups, 2, width // (2 * groups)).transpose(0, 2, 1, 3)
  return (nat.reshape(d_out, width).T,)


def proj_to_official(kernel, groups=INTERLEAVE_GROUPS):
  w = kernel.T
  d_out, width = w.shape
  off = w.reshape(d_out, 2, groups, width // (2 * groups)).transpose(0, 2, 1, 3)
  return (off.reshape(d_out, width),)


def kv_xattn_to_model(w, groups: int):
  """(2·G·hd, D) with rows [k_g | v_g] per group -> k kernel, v kernel (D, G·hd)."""
  rows, d_in = w.shape
  hd = rows // (2 * groups)
  kv = w.reshape(groups, 2, hd, d_in)
  return (kv[:, 0].reshape(groups * hd, d_in).T, kv[:, 1].reshape(groups * hd, d_in).T)


def kv_xattn_to_official(k, v, groups: int):
  d_in = k.shape[0]
  hd = k.shape[1] // groups
  # jnp so that jax.eval_shape can trace it (strict.expected_shapes); plain arrays work too.
  kv = jnp.stack([k.T.reshape(groups, hd, d_in), v.T.reshape(groups, hd, d_in)], axis=1)
  return (kv.reshape(2 * groups * hd, d_in),)


def patch_embed_to_model(w):
  """Conv3d weight (D, C, pt, p, p) -> kernel (C·pt·p·p, D); patches flatten as (c, pt, ph, pw)."""
  return (w.reshape(w.shape[0], -1).T,)


def layout(cfg: ModelConfig) -> list[Entry]:
  G = cfg.num_query_groups
  D = cfg.hidden_size
  patch = (cfg.in_channels, cfg.t_patch_size, cfg.patch_size, cfg.patch_size)
  entries = [
      Entry(("x_embedder.weight",), (("x_embedder", "kernel"),), patch_embed_to_model,
            lambda k: (k.T.reshape((D,) + patch),)),
      linear("t_embedder.mlp.0.weight", ("t_embedder", "fc1", "kernel")),
      vector("t_embedder.mlp.0.bias", ("t_embedder", "fc1", "bias")),
      linear("t_embedder.mlp.2.weight", ("t_embedder", "fc2", "kernel")),
      vector("t_embedder.mlp.2.bias", ("t_embedder", "fc2", "bias")),
      linear("y_embedder.y_proj_xattn.0.weight", ("y_embedder", "y_proj_xattn", "kernel")),
      vector("y_embedder.y_proj_xattn.0.bias", ("y_embedder", "y_proj_xattn", "bias")),
      linear("y_embedder.y_proj_adaln.0.weight", ("y_embedder", "y_proj_adaln", "kernel")),
      vector("y_embedder.y_proj_adaln.0.bias", ("y_embedder", "y_proj_adaln", "bias")),
      vector("y_embedder.null_caption_embedding", ("y_embedder", "null_caption_embedding")),
      vector("rope.bands", ("rope_bands",)),
      vector("videodit_blocks.final_layernorm.weight", ("final_norm", "weight")),
      vector("videodit_blocks.final_layernorm.bias", ("final_norm", "bias")),
      linear("final_linear.linear.weight", ("final_linear", "kernel")),
  ]
  for i in range(cfg.num_layers):
    o = f"videodit_blocks.layers.{i}."
    L = ("layers", i)
    entries += [
        linear(o + "ada_modulate_layer.proj.0.weight", L + ("ada_modulate", "kernel")),
        vector(o + "ada_modulate_layer.proj.0.bias", L + ("ada_modulate", "bias")),
        vector(o + "self_attention.linear_qkv.layer_norm.weight", L + ("ln_qkv", "weight")),
        vector(o + "self_attention.linear_qkv.layer_norm.bias", L + ("ln_qkv", "bias")),
        linear(o + "self_attention.linear_qkv.q.weight", L + ("q", "kernel")),
        linear(o + "self_attention.linear_qkv.qx.weight", L + ("qx", "kernel")),
        linear(o + "self_attention.linear_qkv.k.weight", L + ("k", "kernel")),
        linear(o + "self_attention.linear_qkv.v.weight", L + ("v", "kernel")),
        Entry((o + "self_attention.linear_kv_xattn.weight",),
              (L + ("kx", "kernel"), L + ("vx", "kernel")),
              lambda w: kv_xattn_to_model(w, G), lambda k, v: kv_xattn_to_official(k, v, G)),
        Entry((o + "self_attention.linear_proj.weight",), (L + ("proj", "kernel"),),
              proj_to_model, proj_to_official),
    ]
    for off, ours in (("self_attention.q_layernorm", "q_norm"),
                      ("self_attention.k_layernorm", "k_norm"),
                      ("self_attention.q_layernorm_xattn", "qx_norm"),
                      ("self_attention.k_layernorm_xattn", "kx_norm"),
                      ("self_attn_post_norm", "attn_post_norm"),
                      ("mlp.layer_norm", "mlp_norm"),
                      ("mlp_post_norm", "mlp_post_norm")):
      entries += [vector(o + off + ".weight", L + (ours, "weight")),
                  vector(o + off + ".bias", L + (ours, "bias"))]
    entries += [linear(o + "mlp.linear_fc1.weight", L + ("fc1", "kernel")),
                linear(o + "mlp.linear_fc2.weight", L + ("fc2", "kernel"))]
  return entries
