"""The T5 v1.1 encoder (what MAGI-1 conditions on), in Flax NNX, with Hugging Face semantics.

MAGI-1 runs `T5EncoderModel` (t5-v1_1-xxl) in float32 and reads its `last_hidden_state`
(official inference/model/t5/t5_model.py). The math here is the Hugging Face encoder's:

    h = shared[ids]                                          (no sqrt(d) scaling)
    bias = relative_position_bias (table of layer 0, reused by every layer) + mask term
    per layer:  h += o(attention(rms(h)·γ1))                  (no 1/sqrt(d_kv) scaling)
                h += wo(act(rms(h)·γ2 · wi_0) ⊙ (rms(h)·γ2 · wi_1))   (gated-gelu; tanh GELU)
    out = rms(h)·γ_final,   rms(u) = u · rsqrt(mean(u²) + eps), variance in float32

The mask term is `(1 - mask) · finfo(float32).min` added to the bias, so padded *query* rows
are computed too (HF-faithful; MAGI reads only rows with mask 1).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.errors import MagiError
from magi_jax.json_file import read_json
from magi_jax.models.layers import Linear

F32 = jnp.float32
_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class T5ConfigError(MagiError, ValueError):
  """A T5 config.json that this encoder cannot build."""


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int
  d_model: int
  d_kv: int
  num_heads: int
  d_ff: int
  num_layers: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "gelu_new"
  is_gated_act: bool = True

  def __post_init__(self):
    if self.dense_act_fn not in _ACTIVATIONS:
      raise T5ConfigError(f"dense_act_fn {self.dense_act_fn!r} is not supported; "
                          f"known: {sorted(_ACTIVATIONS)}")
    for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      if int(getattr(self, name)) <= 0:
        raise T5ConfigError(f"{name} must be positive, got {getattr(self, name)}")


# The real t5-v1_1-xxl encoder (4.76B parameters with the 32128-row embedding).
T5_V1_1_XXL = T5Config(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240,
                       num_layers=24)


def t5_config_from_dict(d: dict[str, Any], source: str = "config.json") -> T5Config:
  """Reads a Hugging Face `T5Config` dict (the fields the encoder uses; the rest is ignored)."""
  required = ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers")
  missing = [k for k in required if k not in d]
  if missing:
    raise T5ConfigError(f"{source}: missing T5 field(s) {', '.join(missing)}")
  if d.get("model_type", "t5") not in ("t5", "umt5", "mt5"):
    raise T5ConfigError(f"{source}: model_type {d.get('model_type')!r} is not a T5 model")
  # HF: feed_forward_proj "gated-gelu" -> gated act, and "gelu" there means the tanh GELU.
  proj = d.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise T5ConfigError(f"{source}: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
  act = parts[-1]
  if proj == "gated-gelu":
    act = "gelu_new"
  return T5Config(
      vocab_size=int(d["vocab_size"]), d_model=int(d["d_model"]), d_kv=int(d["d_kv"]),
      num_heads=int(d["num_heads"]), d_ff=int(d["d_ff"]), num_layers=int(d["num_layers"]),
      relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
      layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
      dense_act_fn=act, is_gated_act=len(parts) == 2)


def load_t5_config(directory: str) -> T5Config:
  path = os.path.join(directory, "config.json")
  return t5_config_from_dict(read_json(path, T5ConfigError, "T5 config"), path)


def t5_config_to_dict(cfg: T5Config) -> dict[str, Any]:
  """A Hugging Face-style config.json for `cfg` (what `T5EncoderModel.save_pretrained` writes)."""
  if cfg.is_gated_act:
    proj = "gated-gelu" if cfg.dense_act_fn == "gelu_new" else f"gated-{cfg.dense_act_fn}"
  else:
    proj = cfg.dense_act_fn
  return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": cfg.vocab_size,
          "d_model": cfg.d_model, "d_kv": cfg.d_kv, "num_heads": cfg.num_heads, "d_ff": cfg.d_ff,
          "num_layers": cfg.num_layers,
          "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
          "relative_attention_max_distance": cfg.relative_attention_max_distance,
          "layer_norm_epsilon": cfg.layer_norm_epsilon, "feed_forward_proj": proj,
          "dense_act_fn": cfg.dense_act_fn, "is_gated_act": cfg.is_gated_act,
          "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False}


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of `key_pos - query_pos` (int array), computed like HF in float32.

  Half the buckets per sign (+half when the key is after the query); distances below a
  quarter of the buckets get their own bucket, larger ones share log-spaced buckets up to
  `max_distance`.
  """
  rel = np.asarray(relative_position, np.int64)
  half = num_buckets // 2
  bucket = np.where(rel > 0, half, 0)
  n = np.abs(rel)
  exact = half // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(n.astype(np.float32) / np.float32(exact))
              / np.float32(np.log(np.float32(max_distance) / np.float32(exact)))
              * np.float32(half - exact))
  large = exact + np.where(n < exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return bucket + np.where(n < exact, n, large)


def rms_norm(x, weight, eps: float):
  """T5 LayerNorm: no mean, no bias; the variance is taken in float32."""
  xf = x.astype(F32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return y.astype(weight.dtype) * weight if weight.dtype != F32 else y * weight


class _Norm(nnx.Module):
  def __init__(self, dim: int, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))


class T5Block(nnx.Module):
  def __init__(self, cfg: T5Config, *, has_relative_bias: bool, dtype, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    lin = lambda i, o: Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)
    self.attn_norm = _Norm(cfg.d_model, dtype)
    self.q, self.k, self.v = (lin(cfg.d_model, inner), lin(cfg.d_model, inner),
                              lin(cfg.d_model, inner))
    self.o = lin(inner, cfg.d_model)
    self.relative_attention_bias = (
        nnx.Param(jax.random.normal(rngs.params(), (cfg.relative_attention_num_buckets,
                                                    cfg.num_heads), F32).astype(dtype))
        if has_relative_bias else None)
    self.ff_norm = _Norm(cfg.d_model, dtype)
    self.wi_0 = lin(cfg.d_model, cfg.d_ff)
    self.wi_1 = lin(cfg.d_model, cfg.d_ff) if cfg.is_gated_act else None
    self.wo = lin(cfg.d_ff, cfg.d_model)


class T5Encoder(nnx.Module):
  """`T5EncoderModel.last_hidden_state`. Parameters in `dtype` (float32 as MAGI uses it)."""

  def __init__(self, cfg: T5Config, *, dtype=F32, rngs: nnx.Rngs,
               matmul_precision=jax.lax.Precision.HIGHEST):
    self.cfg = cfg
    self.dtype = dtype
    self.matmul_precision = matmul_precision
    self.shared = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model),
                                              F32).astype(dtype))
    self.blocks = nnx.List([T5Block(cfg, has_relative_bias=(i == 0), dtype=dtype, rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.final_norm = _Norm(cfg.d_model, dtype)

  def position_bias(self, length: int):
    """(heads, length, length) float32 bias of layer 0's table, without the mask term."""
    pos = np.arange(length)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None],
                                       self.cfg.relative_attention_num_buckets,
                                       self.cfg.relative_attention_max_distance)
    table = self.blocks[0].relative_attention_bias[...].astype(F32)
    return jnp.transpose(table[jnp.asarray(buckets)], (2, 0, 1))

  def __call__(self, input_ids, attention_mask, *, return_activations: bool = False):
    """input_ids, attention_mask: (B, L) ints -> (B, L, d_model) float32 (and activations)."""
    cfg, dt, prec = self.cfg, self.dtype, self.matmul_precision
    ids = jnp.asarray(input_ids)
    mask = jnp.asarray(attention_mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be (B, L)")
    b, length = ids.shape
    h = jnp.take(self.shared[...], ids, axis=0)
    acts = {"embed": h}
    rel = self.position_bias(length)
    bias = rel[None] + (1.0 - mask.astype(F32))[:, None, None, :] * jnp.finfo(F32).min
    act = _ACTIVATIONS[cfg.dense_act_fn]
    heads = lambda x: x.reshape(b, length, cfg.num_heads, cfg.d_kv)
    for i, blk in enumerate(self.blocks):
      n = rms_norm(h, blk.attn_norm.weight[...], cfg.layer_norm_epsilon)
      q = heads(blk.q(n, out_dtype=dt, precision=prec))
      k = heads(blk.k(n, out_dtype=dt, precision=prec))
      v = heads(blk.v(n, out_dtype=dt, precision=prec))
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=prec,
                          preferred_element_type=F32) + bias
      weights = jax.nn.softmax(scores, axis=-1).astype(dt)
      a = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=prec, preferred_element_type=F32)
      h = h + blk.o(a.reshape(b, length, -1).astype(dt), out_dtype=dt, precision=prec)
      n = rms_norm(h, blk.ff_norm.weight[...], cfg.layer_norm_epsilon)
      g = act(blk.wi_0(n, out_dtype=F32, precision=prec))
      if blk.wi_1 is not None:
        g = g * blk.wi_1(n, out_dtype=F32, precision=prec)
      h = h + blk.wo(g.astype(dt), out_dtype=dt, precision=prec)
      acts[f"block.{i}"] = h
    out = rms_norm(h, self.final_norm.weight[...], cfg.layer_norm_epsilon).astype(F32)
    if return_activations:
      acts["rel_bias"] = rel[None]
      return out, acts
    return out


def with_dtype(t5: T5Encoder, dtype) -> T5Encoder:
  """The same encoder with its parameters (and compute) in `dtype` (float32 <-> bfloat16)."""
  dtype = jnp.dtype(dtype)
  if jnp.dtype(t5.dtype) == dtype:
    return t5
  out = nnx.eval_shape(lambda: T5Encoder(t5.cfg, dtype=dtype, rngs=nnx.Rngs(0),
                                         matmul_precision=t5.matmul_precision))
  nnx.update(out, jax.tree.map(lambda x: x.astype(dtype), nnx.state(t5)))
  return out
