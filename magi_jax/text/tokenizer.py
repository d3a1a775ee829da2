"""The T5 tokenizer with MAGI-1's call conventions (official inference/pipeline/prompt_process.py).

Official call: `tokenizer(prompts, max_length=800, padding="max_length", truncation=True,
add_special_tokens=True, return_attention_mask=True)` on a `T5TokenizerFast` converted from
`spiece.model`. That is: SentencePiece pieces, cut to `max_length - 1`, then `</s>` (id 1),
then right-padding with `<pad>` (id 0); the mask is 1 on the pieces and on `</s>`. The
SentencePiece model is read with `sentencepiece`; a directory that only has a `tokenizer.json`
is read with `tokenizers` instead. Literal special-token strings in a prompt (`</s>`,
`<extra_id_0>`) are tokenized as text; MAGI's caption cleaner removes them before this anyway.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from magi_jax.errors import MagiError

SPIECE = "spiece.model"
TOKENIZER_JSON = "tokenizer.json"


class TokenizerError(MagiError, ValueError):
  pass


class T5Tokenizer:
  """`tokenizer(texts, max_length)` -> (ids, mask), int32 arrays of shape
  (len(texts), max_length)."""

  def __init__(self, directory: str):
    self.directory = directory
    spiece = os.path.join(directory, SPIECE)
    tok_json = os.path.join(directory, TOKENIZER_JSON)
    if os.path.exists(spiece):
      import sentencepiece
      self._sp = sentencepiece.SentencePieceProcessor()
      try:
        self._sp.Load(spiece)
      except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{spiece}: not a valid SentencePiece model ({e})") from None
      self._encode = lambda text: list(self._sp.encode(text))
      self.eos_id, self.pad_id = self._sp.eos_id(), self._sp.pad_id()
    elif os.path.exists(tok_json):
      try:
        import tokenizers
      except ImportError:
        raise TokenizerError(f"{directory} has only {TOKENIZER_JSON}: pip install tokenizers "
                             f"(or add the {SPIECE} of the checkpoint)") from None
      tok = tokenizers.Tokenizer.from_file(tok_json)
      self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
      self.eos_id, self.pad_id = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
    else:
      raise TokenizerError(f"{directory}: no {SPIECE} or {TOKENIZER_JSON} (a T5 checkpoint "
                           "directory carries its tokenizer)")
    if self.eos_id is None or self.eos_id < 0 or self.pad_id is None or self.pad_id < 0:
      raise TokenizerError(f"{directory}: the tokenizer defines no </s> or <pad> id")

  def pieces(self, text: str) -> list[int]:
    """Token ids of `text` without `</s>` and without truncation."""
    if not isinstance(text, str):
      raise TypeError(f"prompts must be str, got {type(text).__name__}")
    return self._encode(text)

  def __call__(self, texts: Sequence[str], max_length: int = 800):
    if isinstance(texts, str):
      texts = [texts]
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      toks = self.pieces(text)[:max_length - 1] + [self.eos_id]
      ids[row, :len(toks)] = toks
      mask[row, :len(toks)] = 1
    return ids, mask


class ByteTokenizer:
  """UTF-8 bytes as tokens (id = byte + 3; 0 pad, 1 </s>, 2 unk), ByT5-style.

  Needs no vocabulary file: the `tiny` preset's random text encoder uses it so that sampling
  runs with no download. Same call convention as `T5Tokenizer`.
  """

  vocab_size = 259
  eos_id, pad_id = 1, 0

  def pieces(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"prompts must be str, got {type(text).__name__}")
    return [b + 3 for b in text.encode("utf-8")]

  __call__ = T5Tokenizer.__call__
