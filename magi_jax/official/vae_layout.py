"""The official ViTVAE state-dict layout (official inference/model/vae/vae_module.py) and its map
onto `ViTVAE`."""

from __future__ import annotations

from magi_jax.official.dit_layout import Entry, linear, vector
from magi_jax.models.vae import VAEConfig


def _patch_to_model(w):
  return (w.reshape(w.shape[0], -1).T,)


def layout(cfg: VAEConfig) -> list[Entry]:
  patch = (cfg.in_chans, cfg.patch_length, cfg.patch_size, cfg.patch_size)
  D = cfg.embed_dim
  entries = [
      Entry(("encoder.patch_embed.proj.weight",), (("encoder", "patch_embed", "kernel"),),
            _patch_to_model, lambda k: (k.T.reshape((D,) + patch),)),
      vector("encoder.patch_embed.proj.bias", ("encoder", "patch_embed", "bias")),
      linear("encoder.last_layer.weight", ("encoder", "last_layer", "kernel")),
      vector("encoder.last_layer.bias", ("encoder", "last_layer", "bias")),
      linear("decoder.proj_in.weight", ("decoder", "proj_in", "kernel")),
      vector("decoder.proj_in.bias", ("decoder", "proj_in", "bias")),
      vector("decoder.last_layer.weight", ("decoder", "last_layer_weight")),
      vector("decoder.last_layer.bias", ("decoder", "last_layer_bias")),
  ]
  for side in ("encoder", "decoder"):
    T = (side, "trunk")
    entries += [vector(f"{side}.cls_token", T + ("cls_token",)),
                vector(f"{side}.pos_embed", T + ("pos_embed",)),
                vector(f"{side}.norm.weight", T + ("norm", "weight")),
                vector(f"{side}.norm.bias", T + ("norm", "bias"))]
    for i in range(cfg.depth):
      o, B = f"{side}.blocks.{i}.", T + ("blocks", i)
      for off, ours in (("attn.qkv", "qkv"), ("attn.proj", "proj"), ("mlp.fc1", "fc1"),
                        ("mlp.fc2", "fc2")):
        entries += [linear(o + off + ".weight", B + (ours, "kernel")),
                    vector(o + off + ".bias", B + (ours, "bias"))]
      entries += [vector(o + "norm2.weight", B + ("norm2", "weight")),
                  vector(o + "norm2.bias", B + ("norm2", "bias"))]
  return entries
