"""The DiT's transformer layers as ONE stacked module, run by a scan over layers (or unrolled).

Storage. `stacked_layers` builds a single `TransformerLayer` whose every parameter has a leading
`num_layers` axis: layer i's weights are `param[i]`, and the state paths have no layer index
(`layers/q/kernel`, shape (L, D, heads·hd)). Every consumer of per-layer names (the official
checkpoint layout, LoRA adapter files, parity keys `videodit_blocks.layers.{i}`) maps layer i
to index i of that axis.

Running. `run_layers` applies the layers in order to the hidden stream:
* `scan=True`: one `jax.lax.scan` over the stacked state, `nnx.merge` of one layer's slice in
  the body. The body is traced and compiled once, so compile time does not grow with depth.
* `scan=False`: a Python loop over the same storage that slices layer i (the program has every
  layer unrolled; kept to compare compile times and as a fallback).
Both give the same values; each layer is the same function of its inputs.

Per-call constants and the custom VJPs. The attention masks' integer ranges (self-attention
`ChunkMask`, caption `ChunkMask`) enter the scan as scanned inputs (`xs`, broadcast to one copy
per layer), never as values the body closes over or carries: closed over, they are
loop-invariant, and under `jax.grad` JAX hoists everything computed from them alone out of the
loop (the flash / ring tile masks of every layer), which doubles the backward pass's
temporaries (measured on CPU for 3 tiny layers at 4K tokens: 637 MiB closed over or through
`nnx.scan(in_axes=None)`, 307 MiB as `xs`, 290 MiB unrolled; with remat 411 / 102 / 278 MiB).
The float constants (conditioning rows, RoPE tables, caption features) are closed over; they
depend on parameters, and their gradients are summed over layers by the scan's transpose. The
custom VJPs (flash, ring) run their own backward in both paths.

Remat. `remat=True` wraps each layer (the scan body, or each unrolled layer) in
`jax.checkpoint` with the named policy of `jax.checkpoint_policies` (`REMAT_POLICIES`);
"nothing_saveable" (the default) recomputes each layer's activations in the backward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.errors import MagiError
from magi_jax.attention import ChunkMask
from magi_jax.configs import ModelConfig
from magi_jax.models.block import TransformerLayer
from magi_jax.models.precision import Precision
from magi_jax.parallel.rules import constrain

# Policies of `jax.checkpoint_policies` that take no arguments (the others are factories).
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
DEFAULT_REMAT_POLICY = "nothing_saveable"
STACK_NAME = "layers"          # the VideoDiT attribute that holds the stacked layer


class RematPolicyError(MagiError, ValueError):
  """An unknown remat policy name."""


def remat_policy(name: str):
  """The `jax.checkpoint_policies` policy called `name`; RematPolicyError lists the choices."""
  if name not in REMAT_POLICIES:
    raise RematPolicyError(f"unknown remat policy {name!r}; choose one of {list(REMAT_POLICIES)} "
                           "(jax.checkpoint_policies without arguments)")
  return getattr(jax.checkpoint_policies, name)


def stacked_layers(cfg: ModelConfig, precision: Precision, *, rngs: nnx.Rngs) -> TransformerLayer:
  """One TransformerLayer with a leading `cfg.num_layers` axis on every parameter; each layer
  is initialised from its own split of `rngs` (the stream advances by one key)."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def build(layer_rngs):
    return TransformerLayer(cfg, precision, rngs=layer_rngs)

  return build(rngs)


def stacked_axes(path) -> int:
  """Leading axes of the VideoDiT parameter at state `path` that index layers: 1 under the
  stacked layer (its per-layer shape is shape[1:]), else 0."""
  return int(len(path) > 0 and str(path[0]) == STACK_NAME)


@dataclasses.dataclass(frozen=True)
class LayerInputs:
  """What every layer reads besides the hidden stream: the same for all layers of a call."""

  cond: jax.Array               # (N, chunks, Dc) conditioning rows
  rope: tuple                   # (sin, cos) RoPE tables, (S, 3·bands) float32
  self_mask: ChunkMask          # over [cache; current] keys
  feats: jax.Array              # (N·chunks, caption tokens, D) caption features
  xmask: ChunkMask              # caption valid tokens per chunk row
  policy: Precision
  backend: str


@dataclasses.dataclass
class StackOutput:
  hidden: jax.Array                         # (N, S, D) after the last layer
  kv: tuple | None = None                   # (k, v), each (L, N, S, kv_groups, head_dim)
  per_layer: jax.Array | None = None        # (L, N, S, D): each layer's output


def num_layers(state) -> int:
  """The stacked axis length, checked to be the same on every leaf."""
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(state)}
  if len(sizes) != 1:
    raise ValueError(f"stacked layer state has leading axes of different sizes {sorted(sizes)}")
  return sizes.pop()


def run_layers(layers: TransformerLayer, h, inputs: LayerInputs, cache_kv=None, *,
               scan: bool = True, remat: bool = False,
               policy_name: str = DEFAULT_REMAT_POLICY, return_kv: bool = False,
               kv_tokens: int | None = None, return_hidden: bool = False) -> StackOutput:
  """All layers of the stack on `h` (N, S, D).

  cache_kv: None or (k, v), each (L, N, S_cache, kv_groups, head_dim): layer i reads slice i.
  return_kv stacks each layer's new (k, v) (only its first `kv_tokens` tokens when given:
  a sampler's refresh pass keeps one chunk, not the whole call's K/V of every layer);
  return_hidden stacks each layer's output. Masks whose ranges are concrete (numpy: a
  sampler step's static ranges) stay closed over as constants, so kernels that need a static
  mask (splash) still see them; traced ranges enter the scan as `xs` (above).
  """
  graphdef, state = nnx.split(layers)
  L = num_layers(state)
  policy = remat_policy(policy_name) if remat else None
  masks = (inputs.self_mask, inputs.xmask)

  def layer_fn(h, weights, masks, layer_cache):
    self_mask, xmask = masks
    layer = nnx.merge(graphdef, weights)
    h, kv = layer(h, inputs.cond, inputs.rope, self_mask, layer_cache, inputs.feats, xmask,
                  inputs.policy, inputs.backend)
    if kv_tokens is not None:
      kv = (kv[0][:, :kv_tokens], kv[1][:, :kv_tokens])
    return constrain(h, ("batch", "length", "act_embed")), kv

  if scan:
    static = tuple(isinstance(m.kv_ranges, np.ndarray) for m in masks)

    def body(h, xs):
      weights, layer_masks, layer_cache = xs
      layer_masks = tuple(m if st else lm for m, st, lm in zip(masks, static, layer_masks))
      h, kv = layer_fn(h, weights, layer_masks, layer_cache)
      return h, (kv if return_kv else None, h if return_hidden else None)

    if remat:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    per_layer = lambda a: jnp.broadcast_to(a, (L,) + a.shape)
    traced = tuple(None if st else jax.tree.map(per_layer, m) for m, st in zip(masks, static))
    xs = (state, traced, cache_kv)
    h, (kv, hidden) = jax.lax.scan(body, h, xs)
    return StackOutput(h, kv, hidden)

  step = jax.checkpoint(layer_fn, policy=policy) if remat else layer_fn
  # jnp.split (not a[i]): its transpose concatenates the per-layer gradients.
  split = lambda a: [x[0] for x in jnp.split(a, L, axis=0)]
  weights = _unstack(state, L, split)
  caches = [None] * L if cache_kv is None else list(zip(split(cache_kv[0]), split(cache_kv[1])))
  ks, vs, hidden = [], [], []
  for i in range(L):
    h, (k, v) = step(h, weights[i], masks, caches[i])
    if return_kv:
      ks.append(k)
      vs.append(v)
    if return_hidden:
      hidden.append(h)
  kv = (jnp.stack(ks), jnp.stack(vs)) if return_kv else None
  return StackOutput(h, kv, jnp.stack(hidden) if return_hidden else None)


def _unstack(state, L: int, split) -> list[Any]:
  """[layer 0's state, ..., layer L-1's] from the stacked state."""
  leaves, treedef = jax.tree.flatten(state)
  parts = [split(leaf) for leaf in leaves]
  return [jax.tree.unflatten(treedef, [p[i] for p in parts]) for i in range(L)]
