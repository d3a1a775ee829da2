"""The Hugging Face T5 encoder state-dict layout and its map onto `T5Encoder`."""

from __future__ import annotations

from magi_jax.official.dit_layout import Entry, linear, vector
from magi_jax.text.t5 import T5Config

# Tensors of a full T5 (encoder-decoder) checkpoint that the encoder does not use.
IGNORED_PREFIXES = ("decoder.", "lm_head.")
# `encoder.embed_tokens.weight` is the tied copy of `shared.weight` in some checkpoints.
TIED_EMBEDDING = "encoder.embed_tokens.weight"


def layout(cfg: T5Config) -> list[Entry]:
  entries = [vector("shared.weight", ("shared",)),
             vector("encoder.final_layer_norm.weight", ("final_norm", "weight"))]
  for i in range(cfg.num_layers):
    pre = f"encoder.block.{i}.layer"
    blk = ("blocks", i)
    entries.append(vector(f"{pre}.0.layer_norm.weight", blk + ("attn_norm", "weight")))
    for name in ("q", "k", "v", "o"):
      entries.append(linear(f"{pre}.0.SelfAttention.{name}.weight", blk + (name, "kernel")))
    if i == 0:
      entries.append(vector(f"{pre}.0.SelfAttention.relative_attention_bias.weight",
                            blk + ("relative_attention_bias",)))
    entries.append(vector(f"{pre}.1.layer_norm.weight", blk + ("ff_norm", "weight")))
    ffn = ("wi_0", "wi_1", "wo") if cfg.is_gated_act else ("wi", "wo")
    for name in ffn:
      path = blk + ("wi_0" if name == "wi" else name, "kernel")
      entries.append(linear(f"{pre}.1.DenseReluDense.{name}.weight", path))
  return entries
