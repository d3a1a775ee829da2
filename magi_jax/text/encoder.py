"""Prompt -> (T5 rows, mask): cleaning, tokenising, the encoder and the on-disk cache in one place.

    enc = load_text_encoder("ckpt/t5/t5-v1_1-xxl", cache_dir="~/.cache/magi_jax/text")
    # (magi_jax.official.t5.load_text_encoder reads a Hugging Face T5 directory)
    emb, mask = enc.encode(["a red ball bounces"])      # (1, 800, 4096) float32, (1, 800) int32

As the official pipeline: the prompt is cleaned twice, tokenised to `max_length` (800), and
encoded one prompt at a time in float32. Rows where the mask is 0 are returned as zeros (the
DiT never reads them; HF's T5 leaves deterministic garbage there). The T5 forward compiles
once per `max_length`.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.errors import MagiError
from magi_jax.text.cache import EmbeddingCache, cache_key
from magi_jax.text.clean_caption import preprocess_prompt
from magi_jax.text.t5 import T5Encoder
from magi_jax.text.tokenizer import T5Tokenizer


def directory_fingerprint(directory: str) -> str:
  """Cheap identity of a checkpoint: config, tokenizer, and each weight file's size + ends."""
  h = hashlib.sha256()
  names = sorted(set(glob.glob(os.path.join(directory, "*.json")))
                 | set(glob.glob(os.path.join(directory, "*.safetensors*")))
                 | set(glob.glob(os.path.join(directory, "spiece.model"))))
  for path in names:
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
      h.update(f.read(1 << 20))
      if size > 2 << 20:
        f.seek(-(1 << 20), os.SEEK_END)
        h.update(f.read())
  return h.hexdigest()


class TextEncoder:
  def __init__(self, t5: T5Encoder, tokenizer: T5Tokenizer, *, max_length: int = 800,
               clean: bool = True, cache_dir: str | None = None, model_id: str = ""):
    self.t5 = t5
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.clean = clean
    self.model_id = model_id
    self.cache = EmbeddingCache(os.path.expanduser(cache_dir)) if cache_dir else None
    graphdef, state = nnx.split(t5)
    self._forward = jax.jit(lambda s, ids, m: nnx.merge(graphdef, s)(ids, m))
    self._state = state
    self.encoder_calls = 0

  def prepare(self, prompt: str) -> str:
    if not isinstance(prompt, str):
      raise TypeError(f"a prompt must be str, got {type(prompt).__name__}")
    return preprocess_prompt(prompt) if self.clean else prompt

  def _key(self, prompt: str) -> str:
    return cache_key(prompt=prompt, clean=self.clean, max_length=self.max_length,
                     model=self.model_id, dtype=str(jnp.dtype(self.t5.dtype)))

  def encode_one(self, prompt: str):
    """(emb (max_length, D) float32, mask (max_length,) int32) of one prompt."""
    key = self._key(prompt) if self.cache is not None else None
    if key is not None:
      hit = self.cache.get(key, self.max_length)
      if hit is not None:
        return hit
    ids, mask = self.tokenizer([self.prepare(prompt)], self.max_length)
    out = np.asarray(self._forward(self._state, jnp.asarray(ids), jnp.asarray(mask)))[0]
    self.encoder_calls += 1
    emb = np.where(mask[0, :, None] == 1, out, 0.0).astype(np.float32)
    if key is not None:
      self.cache.put(key, emb, mask[0])
    return emb, mask[0]

  def encode(self, prompts: Sequence[str]):
    """(emb (B, max_length, D) float32, mask (B, max_length) int32); repeats encoded once."""
    if isinstance(prompts, str):
      prompts = [prompts]
    done = {}
    for p in prompts:
      if p not in done:
        done[p] = self.encode_one(p)
    return (np.stack([done[p][0] for p in prompts]), np.stack([done[p][1] for p in prompts]))


class PromptNotEncodedError(MagiError, KeyError):
  def __str__(self):
    return str(self.args[0])


class EncodedPrompts:
  """A fixed set of prompts encoded once, with the `encode` interface of `TextEncoder`, so the
  encoder itself can be freed before the DiT loads (a memory plan's `text_first`). Asking for
  a prompt that was not encoded is an error naming it."""

  def __init__(self, encoder: TextEncoder, prompts: Sequence[str]):
    prompts = list(dict.fromkeys(prompts))
    emb, mask = encoder.encode(prompts)
    self.rows = {p: (emb[i], mask[i]) for i, p in enumerate(prompts)}
    self.max_length, self.model_id = encoder.max_length, encoder.model_id
    self.encoder_calls = encoder.encoder_calls

  def encode(self, prompts: Sequence[str]):
    if isinstance(prompts, str):
      prompts = [prompts]
    for p in prompts:
      if p not in self.rows:
        raise PromptNotEncodedError(
            f"prompt {p!r} was not encoded before the text encoder was freed (text_first): "
            f"these were: {sorted(self.rows)}; build the components again for new prompts")
    return (np.stack([self.rows[p][0] for p in prompts]),
            np.stack([self.rows[p][1] for p in prompts]))
