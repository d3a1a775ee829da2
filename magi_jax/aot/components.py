"""The shapes of the sampler's other two models, for presets that ship no weights here.

* VAE: `OFFICIAL_VAE` is the released MAGI-1 VAE's `ddconfig` (the official
  inference/model/vae/vae_model.py with the checkpoint's config.json: width 1024, 24 blocks
  per side, 16 heads, MLP 4096; about 614M parameters). The tiny preset uses
  `convert.load.TINY_VAE`, the geometry its random-weight pipeline runs. Both have bf16 weights (the
  official pipeline casts them).
* T5: the real t5-v1_1-xxl encoder (`text.t5.T5_V1_1_XXL`, 4.76B parameters) when the DiT's
  caption_channels is its width (4096: every MAGI-1 preset), else the tiny preset's random
  T5 (the shape `convert.load.load_text_encoder` builds: d_model = caption_channels,
  2 layers, 4 heads of 8, d_ff 2·d_model, the byte tokenizer's vocabulary).

T5 weights are placed by T5_PARAM_RULES (the DiT's table names DiT paths only): model width on
('fsdp', 'context') like the DiT's 'embed', heads and d_ff on 'tensor'. The VAE's
(VAE_PARAM_RULES) are replicated.
"""

from __future__ import annotations

from magi_jax.configs import MagiConfig
from magi_jax.convert.load import TINY_VAE
from magi_jax.models.vae import VAEConfig
from magi_jax.models.vae_tiling import TileConfig
from magi_jax.parallel.rules import REPLICATED, ShardingRules
from magi_jax.text import T5Config
from magi_jax.text.t5 import T5_V1_1_XXL
from magi_jax.text.tokenizer import ByteTokenizer

OFFICIAL_VAE = VAEConfig(video_size=256, video_length=16, patch_size=8, patch_length=4,
                         in_chans=3, z_chans=16, double_z=True, embed_dim=1024, depth=24,
                         num_heads=16, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                         drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                         with_cls_token=True, norm_code=False, ln_in_attn=True,
                         conv_last_layer=True, use_rope=False, use_final_proj=False)

T5_PARAM_RULES = (
    (r"blocks/\d+/(q|k|v)/kernel$", ("embed", "heads")),
    (r"blocks/\d+/o/kernel$", ("heads", "embed")),
    (r"blocks/\d+/(wi_0|wi_1)/kernel$", ("embed", "mlp")),
    (r"blocks/\d+/wo/kernel$", ("mlp", "embed")),
    (r"shared$", (None, "embed")),
    (r"blocks/\d+/relative_attention_bias$", REPLICATED),     # (32 buckets, heads): tiny
)

# The VAE is replicated on purpose: the sampler decodes one tile at a time, and its weights
# (about 614M parameters, 1.2 GB in bf16) are small next to the DiT's.
VAE_PARAM_RULES = (
    (r"^(encoder|decoder)/", REPLICATED),
)


def t5_rules(rules: ShardingRules) -> ShardingRules:
  return ShardingRules(logical=rules.logical, params=T5_PARAM_RULES, strict=rules.strict)


def vae_rules(rules: ShardingRules) -> ShardingRules:
  return ShardingRules(logical=rules.logical, params=VAE_PARAM_RULES, strict=rules.strict)


def is_tiny(cfg: MagiConfig) -> bool:
  return cfg.model.caption_channels != T5_V1_1_XXL.d_model


def t5_config(cfg: MagiConfig) -> T5Config:
  if not is_tiny(cfg):
    return T5_V1_1_XXL
  d = cfg.model.caption_channels
  return T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=d, d_kv=8, num_heads=4,
                  d_ff=2 * d, num_layers=2)


def vae_config(cfg: MagiConfig) -> VAEConfig:
  return TINY_VAE if is_tiny(cfg) else OFFICIAL_VAE


def decode_tile(vae: VAEConfig, chunk_width: int, latent_h: int, latent_w: int,
                tiles: TileConfig = TileConfig()) -> tuple[int, int, int]:
  """Latent (T, H, W) of the largest tile the pipeline's tiled decode feeds the VAE for one
  chunk (official tiles: 12 frames x 256 x 256 px = 3 x 32 x 32 latents, edges smaller)."""
  return (min(tiles.tile_sample_min_length // vae.patch_length, chunk_width),
          min(tiles.tile_sample_min_height // vae.patch_size, latent_h),
          min(tiles.tile_sample_min_width // vae.patch_size, latent_w))
