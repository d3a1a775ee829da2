"""A word tokenizer and a tiny transformer text encoder, trained jointly with the DiT for the
built-in demo.

Why: the demo world (coloured shapes) is captioned with a handful of words ("red ball moves
left"), and a 4.7B-parameter T5 is neither needed nor available offline for it. A closed
vocabulary plus a one-layer encoder learned together with the DiT is enough to carry colour /
motion words into the cross-attention, and it trains from scratch in minutes on a CPU. This
is a demo choice only: real data uses precomputed T5 embeddings (`magi_jax.text.t5`,
`magi_jax.text.cache`), and the encoder's output simply stands in for those rows, with
`out_channels` equal to the DiT's `caption_channels`.

Conventions:
  * ids: 0 = padding, 1 = unknown word, vocabulary words from 2 in the given order;
  * masks are float32 (1 = token, 0 = padding), like the DiT's `emb_masks`;
  * the encoder attends to valid tokens only and zeroes padding rows, so its output does not
    depend on what sits in padded positions.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD_ID = 0
UNK_ID = 1
FIRST_WORD_ID = 2


def split_words(text: str) -> list[str]:
  """Lower-cased words; ';', ',' and '.' separate words like spaces."""
  return text.lower().replace(";", " ").replace(",", " ").replace(".", " ").split()


class WordTokenizer:
  """Closed-vocabulary word tokenizer with fixed-length padding / truncation.

  Vocabulary entries must be single words in normalized form (`split_words(w) == [w]`, e.g.
  lower case, no punctuation); an entry that text could never produce is refused rather than
  silently mapping every occurrence to unknown.
  """

  def __init__(self, vocabulary: Sequence[str], max_length: int):
    if int(max_length) <= 0:
      raise ValueError(f"max_length must be positive, got {max_length}")
    vocabulary = list(vocabulary)
    seen = set()
    for word in vocabulary:
      if word in seen:
        raise ValueError(f"duplicate vocabulary entry {word!r}")
      if split_words(word) != [word]:
        raise ValueError(f"vocabulary entry {word!r} is not a normalized single word")
      seen.add(word)
    self.vocabulary = vocabulary
    self.max_length = int(max_length)
    self._ids = {w: i + FIRST_WORD_ID for i, w in enumerate(vocabulary)}

  @property
  def vocab_size(self) -> int:
    """Number of ids, including padding and unknown."""
    return len(self.vocabulary) + FIRST_WORD_ID

  def encode(self, text: str) -> list[int]:
    """The ids of `text`'s words (unknown words -> 1), truncated to `max_length`."""
    return [self._ids.get(w, UNK_ID) for w in split_words(text)][:self.max_length]

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 (n, max_length), mask float32 (n, max_length)), padded with id 0 / mask 0."""
    if isinstance(texts, str):
      raise TypeError("pass a list of texts, not a single string")
    ids = np.zeros((len(texts), self.max_length), np.int32)
    mask = np.zeros((len(texts), self.max_length), np.float32)
    for row, text in enumerate(texts):
      tokens = self.encode(text)
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1.0
    return ids, mask

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready description, to save alongside a checkpoint."""
    return {"vocabulary": list(self.vocabulary), "max_length": self.max_length}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> WordTokenizer:
    return cls(list(d["vocabulary"]), int(d["max_length"]))


class EncoderLayer(nnx.Module):
  """Pre-LN transformer encoder layer: x + attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.proj = nnx.Linear(width, width, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, 4 * width, rngs=rngs)
    self.fc2 = nnx.Linear(4 * width, width, rngs=rngs)

  def attention(self, x, valid):
    """Self-attention of every query over the valid keys only. `valid` (n, L) bool. A row
    with no valid key attends uniformly (finite, no NaN); its output is zeroed by the caller."""
    n, L, width = x.shape
    head = width // self.num_heads
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    q, k, v = (t.reshape(n, L, self.num_heads, head) for t in (q, k, v))
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) * head ** -0.5
    logits = jnp.where(valid[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, L, width)
    return self.proj(out)

  def __call__(self, x, valid):
    x = x + self.attention(self.norm1(x), valid)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class DemoTextEncoder(nnx.Module):
  """ids (n, L) + mask -> caption rows (n, L, out_channels) for the DiT's cross-attention.

  Token embedding + learned position embedding, `num_layers` pre-LN encoder layers with
  masked self-attention, a final LayerNorm, a linear map to `out_channels`; padding rows are
  zeroed. Everything is float32 (the model is tiny).
  """

  def __init__(self, vocab_size: int, max_length: int, width: int, out_channels: int,
               num_layers: int = 1, num_heads: int = 2, *, rngs: nnx.Rngs):
    self.max_length = max_length
    self.token_embed = nnx.Embed(vocab_size, width, rngs=rngs)
    self.pos_embed = nnx.Param(
        jax.random.normal(rngs.params(), (max_length, width), jnp.float32) * 0.02)
    self.layers = nnx.List([EncoderLayer(width, num_heads, rngs=rngs)
                            for _ in range(num_layers)])
    self.final_norm = nnx.LayerNorm(width, rngs=rngs)
    self.out = nnx.Linear(width, out_channels, rngs=rngs)

  def __call__(self, ids, mask) -> tuple[jax.Array, jax.Array]:
    """(emb float32 (n, L, out_channels), mask float32 (n, L)); L <= max_length."""
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.asarray(mask, jnp.float32)
    L = ids.shape[1]
    if L > self.max_length:
      raise ValueError(f"sequence length {L} exceeds max_length {self.max_length}")
    valid = mask > 0.5
    ids = jnp.where(valid, ids, PAD_ID)  # whatever sits under the padding is never looked up
    x = self.token_embed(ids).astype(jnp.float32) + self.pos_embed[...][:L][None]
    for layer in self.layers:
      x = layer(x, valid)
    emb = self.out(self.final_norm(x))
    emb = jnp.where(valid[..., None], emb, 0.0).astype(jnp.float32)
    return emb, mask
