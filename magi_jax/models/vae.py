"""MAGI-1's transformer VAE (`ViTVAE`, official inference/model/vae/vae_module.py): 4x8x8 patches, a
class token, a learned position table resized trilinearly to the latent grid, pre-LN-free ViT blocks
whose attention normalises q, k and v per head without parameters, erf-GELU MLPs; the decoder
un-patchifies to 4 channels and ends with a 3x3x3 convolution.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from magi_jax.attention import ChunkMask, attention
from magi_jax.configs import ConfigError
from magi_jax.models.layers import LayerNorm, Linear
from magi_jax.models.pos_resize import resize_grid
from magi_jax.models.precision import Precision

F32 = jnp.float32
SCALE_FACTOR = 0.18215        # DiT latent = VAE posterior mean x 0.18215 (no shift)
_LN_EPS = 1e-5
_HEADNORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The official `ddconfig` (every key of the released `config.json`)."""

  video_size: int
  video_length: int
  patch_size: int
  patch_length: int
  in_chans: int
  z_chans: int
  double_z: bool
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float
  qkv_bias: bool
  qk_scale: float | None
  drop_rate: float
  attn_drop_rate: float
  drop_path_rate: float
  with_cls_token: bool
  norm_code: bool
  ln_in_attn: bool
  conv_last_layer: bool
  use_rope: bool
  use_final_proj: bool

  def __post_init__(self):
    def need(cond, msg):
      if not cond:
        raise ConfigError(f"ddconfig: {msg}")
    need(self.embed_dim % self.num_heads == 0,
         f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
    need(self.embed_dim % (self.patch_size ** 2 * self.patch_length) == 0,
         f"embed_dim ({self.embed_dim}) must be a multiple of patch_size^2 * patch_length "
         f"({self.patch_size ** 2 * self.patch_length}) for the decoder's un-patchify")
    need(self.video_size % self.patch_size == 0 and self.video_length % self.patch_length == 0,
         "video_size / video_length must be multiples of patch_size / patch_length")
    for flag, want in (("double_z", True), ("ln_in_attn", True), ("with_cls_token", True),
                       ("conv_last_layer", True), ("norm_code", False), ("use_rope", False),
                       ("use_final_proj", False), ("qkv_bias", True)):
      need(getattr(self, flag) == want, f"{flag}={getattr(self, flag)} is not the released "
           f"MAGI-1 VAE ({flag}={want}); only that variant is implemented")

  @property
  def grid(self) -> tuple[int, int, int]:
    return (self.video_length // self.patch_length, self.video_size // self.patch_size,
            self.video_size // self.patch_size)

  @property
  def unpatch_channels(self) -> int:
    return self.embed_dim // (self.patch_size ** 2 * self.patch_length)


def vae_config_from_dict(d: dict, where: str = "config.json") -> VAEConfig:
  """From the official `config.json` dict ({"_class_name": "ViTVAE", "ddconfig": {...}})."""
  if d.get("_class_name", "ViTVAE") != "ViTVAE":
    raise ConfigError(f"{where}: _class_name {d.get('_class_name')!r} is not 'ViTVAE'")
  if d.get("model_type", "vit") != "vit":
    raise ConfigError(f"{where}: model_type {d.get('model_type')!r} is unsupported (only 'vit')")
  dd = d.get("ddconfig")
  if not isinstance(dd, dict):
    raise ConfigError(f"{where}: missing 'ddconfig'")
  names = [f.name for f in dataclasses.fields(VAEConfig)]
  missing = [n for n in names if n not in dd]
  unknown = [k for k in dd if k not in names]
  if missing or unknown:
    raise ConfigError(f"{where}: ddconfig " + "; ".join(
        s for s in (f"missing field(s) {', '.join(missing)}" if missing else "",
                    f"unknown field(s) {', '.join(unknown)}" if unknown else "") if s))
  return VAEConfig(**dd)


def load_vae_config(path: str) -> VAEConfig:
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  try:
    with open(path) as f:
      return vae_config_from_dict(json.load(f), path)
  except FileNotFoundError:
    raise ConfigError(f"{path}: VAE config not found") from None


def save_vae_config(cfg: VAEConfig, directory: str) -> None:
  """Writes the official `config.json` (the inverse of `load_vae_config`)."""
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"_class_name": "ViTVAE", "model_type": "vit",
               "ddconfig": dataclasses.asdict(cfg)}, f, indent=2)


def head_norm(u):
  """(u - mean) / (population std + 1e-5) over the last axis; eps on the std, not the variance."""
  uf = u.astype(F32)
  mean = jnp.mean(uf, axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(uf - mean), axis=-1, keepdims=True))
  return ((uf - mean) / (std + _HEADNORM_EPS)).astype(u.dtype)


class VAEBlock(nnx.Module):
  def __init__(self, cfg: VAEConfig, dtype, *, rngs: nnx.Rngs):
    D = cfg.embed_dim
    hidden = int(D * cfg.mlp_ratio)
    self.heads = cfg.num_heads
    self.qkv = Linear(D, 3 * D, use_bias=True, dtype=dtype, rngs=rngs)
    self.proj = Linear(D, D, use_bias=True, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(D, eps=_LN_EPS, one_plus=False, dtype=dtype, rngs=rngs)
    self.fc1 = Linear(D, hidden, use_bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, D, use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x, policy: Precision):
    cd = policy.compute_dtype
    B, N, D = x.shape
    qkv = rearrange(self.qkv(x, out_dtype=cd, precision=policy.matmul),
                    "b n (three h d) -> three b n h d", three=3, h=self.heads)
    q, k, v = head_norm(qkv[0]), head_norm(qkv[1]), head_norm(qkv[2])
    full = ChunkMask(jnp.array([[[0, N]]] * B, jnp.int32), q_block=N)
    o = attention(q, k, v, full, scale=q.shape[-1] ** -0.5, backend="reference",
                  precision=policy.matmul)
    x = x + self.proj(rearrange(o, "b n h d -> b n (h d)"), out_dtype=cd, precision=policy.matmul)
    m = self.norm2(x, out_dtype=cd)
    m = self.fc1(m, out_dtype=F32, precision=policy.matmul)
    m = policy.low(jax.nn.gelu(m, approximate=False))
    return x + self.fc2(m, out_dtype=cd, precision=policy.matmul)


class _Trunk(nnx.Module):
  """cls token + resized position table + blocks + final LayerNorm (shared by both sides)."""

  def __init__(self, cfg: VAEConfig, dtype, *, rngs: nnx.Rngs):
    D = cfg.embed_dim
    n = cfg.grid[0] * cfg.grid[1] * cfg.grid[2] + 1
    self.cfg = cfg
    self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, D), F32).astype(dtype))
    self.pos_embed = nnx.Param(
        (0.02 * jax.random.normal(rngs.params(), (1, n, D), F32)).astype(dtype))
    self.blocks = nnx.List([VAEBlock(cfg, dtype, rngs=rngs) for _ in range(cfg.depth)])
    self.norm = LayerNorm(D, eps=_LN_EPS, one_plus=False, dtype=dtype, rngs=rngs)

  def positions(self, grid):
    pe = self.pos_embed[...]
    if tuple(grid) == self.cfg.grid:
      return pe
    table = pe[:, 1:].reshape((1,) + self.cfg.grid + (pe.shape[-1],))
    table = resize_grid(table.astype(F32), grid, axes=(1, 2, 3)).astype(pe.dtype)
    return jnp.concatenate([pe[:, :1], table.reshape(1, -1, pe.shape[-1])], axis=1)

  def __call__(self, tokens, grid, policy: Precision):
    cd = policy.compute_dtype
    B = tokens.shape[0]
    cls = jnp.broadcast_to(self.cls_token[...], (B, 1, tokens.shape[-1])).astype(cd)
    x = jnp.concatenate([cls, tokens.astype(cd)], axis=1) + self.positions(grid).astype(cd)
    for blk in self.blocks:
      x = blk(x, policy)
    return self.norm(x, out_dtype=cd)[:, 1:]


class ViTEncoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, dtype, *, rngs: nnx.Rngs):
    p, pl = cfg.patch_size, cfg.patch_length
    self.cfg = cfg
    self.patch_embed = Linear(cfg.in_chans * pl * p * p, cfg.embed_dim, use_bias=True,
                              dtype=dtype, rngs=rngs)
    self.trunk = _Trunk(cfg, dtype, rngs=rngs)
    self.last_layer = Linear(cfg.embed_dim, 2 * cfg.z_chans, use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x, policy: Precision):
    """x (B, 3, T, H, W) in [-1, 1] -> moments (B, 2z, T/4, H/8, W/8) = [mean | logvar]."""
    cfg = self.cfg
    p, pl = cfg.patch_size, cfg.patch_length
    T = x.shape[2] // pl * pl          # a stride-4 convolution drops trailing frames
    x = x[:, :, :T]
    grid = (T // pl, x.shape[3] // p, x.shape[4] // p)
    patches = rearrange(x, "b c (t a) (h e) (w f) -> b (t h w) (c a e f)", a=pl, e=p, f=p)
    tokens = self.patch_embed(patches.astype(policy.compute_dtype), out_dtype=policy.compute_dtype,
                              precision=policy.matmul)
    h = self.trunk(tokens, grid, policy)
    # Moments come out in the compute dtype (bf16 in the official pipeline).
    out = self.last_layer(h, out_dtype=policy.compute_dtype, precision=policy.matmul)
    return rearrange(out, "b (t h w) c -> b c t h w", t=grid[0], h=grid[1])


class ViTDecoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, dtype, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.proj_in = Linear(cfg.z_chans, cfg.embed_dim, use_bias=True, dtype=dtype, rngs=rngs)
    self.trunk = _Trunk(cfg, dtype, rngs=rngs)
    c = cfg.unpatch_channels
    self.last_layer_weight = nnx.Param(
        (jax.random.normal(rngs.params(), (cfg.in_chans, c, 3, 3, 3), F32) / (27 * c) ** 0.5
         ).astype(dtype))
    self.last_layer_bias = nnx.Param(jnp.zeros((cfg.in_chans,), dtype))

  def __call__(self, z, policy: Precision):
    """z (B, z, T', H', W') -> pixels (B, 3, 4T', 8H', 8W'), no clamp."""
    cfg = self.cfg
    p, pl = cfg.patch_size, cfg.patch_length
    grid = z.shape[2:]
    tokens = self.proj_in(rearrange(z, "b c t h w -> b (t h w) c").astype(policy.compute_dtype),
                          out_dtype=policy.compute_dtype, precision=policy.matmul)
    h = self.trunk(tokens, grid, policy)
    x = rearrange(h, "b (t h w) (a e f c) -> b c (t a) (h e) (w f)", t=grid[0], h=grid[1],
                  a=pl, e=p, f=p)
    w = self.last_layer_weight[...].astype(x.dtype)
    y = jax.lax.conv_general_dilated(x, w, (1, 1, 1), [(1, 1)] * 3,
                                     dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
                                     precision=policy.matmul, preferred_element_type=F32)
    y = y + self.last_layer_bias[...].astype(F32)[None, :, None, None, None]
    return y.astype(policy.compute_dtype)


class ViTVAE(nnx.Module):
  """encode: pixels -> posterior mean (single images as 4 repeated frames);
  decode: latents -> pixels."""

  def __init__(self, cfg: VAEConfig, *, precision: Precision = Precision.fp32(), rngs: nnx.Rngs):
    self.cfg = cfg
    self.precision = precision
    self.encoder = ViTEncoder(cfg, precision.param_dtype, rngs=rngs)
    self.decoder = ViTDecoder(cfg, precision.param_dtype, rngs=rngs)

  def moments(self, x):
    return self.encoder(x, self.precision)

  def encode(self, x):
    """Posterior mean (B, z, T/4, H/8, W/8); a single frame is repeated to 4 and keeps latent 0."""
    single = x.shape[2] == 1
    if single:
      x = jnp.repeat(x, self.cfg.patch_length, axis=2)
    mean = self.moments(x)[:, :self.cfg.z_chans]
    return mean[:, :, :1] if single else mean

  def decode(self, z):
    """A one-latent-frame input decodes to its first frame only, as the official wrapper does."""
    out = self.decoder(z, self.precision)
    return out[:, :, :1] if z.shape[2] == 1 else out
