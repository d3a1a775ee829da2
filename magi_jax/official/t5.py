"""Hugging Face T5 checkpoint directory <-> `T5Encoder`.

A directory holds `config.json` and `model.safetensors` or shards listed in
`model.safetensors.index.json` (what `save_pretrained` writes), or else the old PyTorch layout
of MAGI-1's `ckpt/t5/t5-v1_1-xxl` download: `pytorch_model.bin` or shards listed in
`pytorch_model.bin.index.json`, read without torch by `torch_bin` (zip-format `torch.save`
files only; pickled globals other than tensors and dicts are refused). Loading is strict over
the encoder's tensors; the decoder and LM head of a full encoder-decoder checkpoint are skipped
by name, and `encoder.embed_tokens.weight` is accepted as the tied copy of `shared.weight`.
"""

from __future__ import annotations

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.official import t5_layout
from magi_jax.formats.checkpoint_dir import (BIN_INDEX, BIN_SINGLE, INDEX, SINGLE,
                                             ShardedCheckpoint)
from magi_jax.official.dit import save_sharded
from magi_jax.formats.safetensors_io import CheckpointFormatError
from magi_jax.official.strict import CheckpointMismatchError, export_state_dict, load_strict
from magi_jax.text.encoder import TextEncoder, directory_fingerprint
from magi_jax.text.t5 import T5Config, T5Encoder, load_t5_config, t5_config_to_dict
from magi_jax.text.tokenizer import T5Tokenizer


class _EncoderView:
  """The encoder's tensors of a T5 checkpoint (decoder / LM head hidden, tied copy resolved)."""

  def __init__(self, source):
    self.source = source
    keys = [k for k in source.keys() if not k.startswith(t5_layout.IGNORED_PREFIXES)]
    self.alias = {}
    if t5_layout.TIED_EMBEDDING in keys:
      keys.remove(t5_layout.TIED_EMBEDDING)
      if "shared.weight" not in keys:
        self.alias["shared.weight"] = t5_layout.TIED_EMBEDDING
        keys.append("shared.weight")
    self._keys = keys

  def keys(self):
    return list(self._keys)

  def __contains__(self, key):
    return key in self._keys

  def shape(self, key):
    return self.source.shape(self.alias.get(key, key))

  def get(self, key):
    return self.source.get(self.alias.get(key, key))


def _check_directory(directory: str) -> None:
  if not os.path.isdir(directory):
    raise CheckpointFormatError(f"{directory}: T5 checkpoint directory not found")
  names = (SINGLE, INDEX, SINGLE + ".zst", BIN_SINGLE, BIN_INDEX)
  if not any(os.path.exists(os.path.join(directory, n)) for n in names) and not glob.glob(
      os.path.join(directory, "pytorch_model*.bin")):
    raise CheckpointFormatError(f"{directory}: no T5 weights (expected one of {', '.join(names)})")


def load_t5(directory: str, *, dtype=jnp.float32, cfg: T5Config | None = None) -> T5Encoder:
  """A `T5Encoder` with the weights of a Hugging Face T5 directory, loaded strictly."""
  _check_directory(directory)
  source = _EncoderView(ShardedCheckpoint(directory))
  cfg = cfg or load_t5_config(directory)
  abstract = nnx.eval_shape(lambda: T5Encoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  try:
    return load_strict(source, t5_layout.layout(cfg), abstract)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f"{directory}: {e}") from None


def t5_state_dict(model: T5Encoder, dtype=None) -> dict[str, np.ndarray]:
  return export_state_dict(model, t5_layout.layout(model.cfg), dtype)


def save_t5(model: T5Encoder, directory: str, *, dtype=None, max_shard_bytes: int | None = None):
  """Writes `config.json` + `model.safetensors` (or shards + index) in the Hugging Face layout."""
  os.makedirs(directory, exist_ok=True)
  save_sharded(t5_state_dict(model, dtype), directory, max_shard_bytes=max_shard_bytes or 2 ** 62)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(t5_config_to_dict(model.cfg), f, indent=2)


def load_text_encoder(directory: str, *, max_length: int = 800, clean: bool = True,
                      cache_dir: str | None = None, dtype=jnp.float32) -> TextEncoder:
  """The prompt -> T5 rows encoder of a Hugging Face T5 directory (weights and tokenizer), as
  the official pipeline uses it; the embedding cache is keyed by the directory's fingerprint."""
  return TextEncoder(load_t5(directory, dtype=dtype), T5Tokenizer(directory),
                     max_length=max_length, clean=clean, cache_dir=cache_dir,
                     model_id=directory_fingerprint(directory))
