"""The DiT's per-chunk text inputs `y` and `emb_masks` (official
inference/pipeline/prompt_process.py), pure numpy.

Row layout, with C = `infer_chunk_num` chunks of which the first `clean_chunk_num` are clean:

  y[0, c]  (cond)   clean chunk: the null caption, mask all 0
                    noisy chunk: its prompt's T5 rows with the special tokens prepended (the
                    key applied last ends up first: [DURATION_k, HQ, t5_0, ...]), mask 1 on the
                    tokens, truncated to the caption length
  y[1, c]  (uncond) the learned null caption (not T5 of ""), mask 1 on its first 50 rows only;
                    with `neg_prompt`, [BORDERNESS, TRANS, LOGO, CAPTION, null_0, ...] under the
                    same 50-row mask

DURATION for the i-th of n noisy chunks is DURATION_{min(n - i, 8)}. `emb_masks` is float32
(the official code's dtype whenever a token is prepended). The official code truncates to 800,
its caption length; here it is the length of the given rows (800 for the official models).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from magi_jax.text.special_tokens import NEGATIVE_KEYS, SpecialTokens, TextFlags

NULL_CAPTION_VALID = 50


def prepend_tokens(emb: np.ndarray, mask: np.ndarray, tokens: Sequence[np.ndarray]):
  """Prepends each token in turn (so the last ends up first) with mask 1; keeps the length."""
  length = emb.shape[0]
  if not tokens:
    return emb, mask
  head = np.stack(list(tokens)[::-1]).astype(emb.dtype)
  emb = np.concatenate([head, emb])[:length]
  mask = np.concatenate([np.ones(len(tokens), mask.dtype), mask])[:length]
  return emb, mask


@dataclasses.dataclass(frozen=True, eq=False)
class TokenHead:
  """The special-token rows sampling puts in front of a noisy chunk's caption, for training
  to put there too (`train.objective.caption_rows`): `rows` (P, D) in their final order, with
  zeros at `duration_at` (-1: no DURATION), where DURATION_k of `durations` (8, D) goes, k =
  min(chunks left in the video including this one, 8) (for the i-th of n noisy chunks n - i,
  as `ChunkTextRows.cond`)."""
  rows: np.ndarray
  durations: np.ndarray
  duration_at: int

  @classmethod
  def build(cls, special: SpecialTokens, flags: TextFlags) -> TokenHead:
    keys = flags.positive_keys()[::-1]      # prepend_tokens: the key applied last ends first
    rows = np.stack([np.zeros(special.dim, np.float32) if k == "DURATION" else
                     np.asarray(special.token(k), np.float32) for k in keys]) if keys else \
        np.zeros((0, special.dim), np.float32)
    durations = np.stack([special.duration(k) for k in range(1, 9)]).astype(np.float32)
    return cls(rows, durations, keys.index("DURATION") if "DURATION" in keys else -1)


class ChunkTextRows:
  """Per-chunk text rows, built on demand (so memory does not grow with the video length).

  embs (k, L, D) / masks (k, L): T5 rows of k distinct prompts; `prompt_of_chunk` (n ints, or
  None when k == 1) says which prompt each of the n = infer_chunk_num - clean_chunk_num noisy
  chunks uses. `cond(c)` / `null()` give (row (L, D), mask (L,)) float32.
  """

  def __init__(self, embs, masks, null_caption, *, infer_chunk_num: int, clean_chunk_num: int = 0,
               special: SpecialTokens | None = None, flags: TextFlags = TextFlags(),
               prompt_of_chunk=None):
    self.embs = np.asarray(embs, np.float32)
    self.masks = np.asarray(masks, np.float32)
    self.null_caption = np.asarray(null_caption, np.float32)
    self.infer_chunk_num, self.clean_chunk_num = infer_chunk_num, clean_chunk_num
    self.special, self.flags = special, flags
    n = infer_chunk_num - clean_chunk_num
    if clean_chunk_num < 0 or n < 1:
      raise ValueError(f"need at least one noisy chunk: infer_chunk_num {infer_chunk_num}, "
                       f"clean_chunk_num {clean_chunk_num}")
    if self.embs.ndim != 3 or self.masks.shape != self.embs.shape[:2]:
      raise ValueError(f"caption rows {self.embs.shape} / masks {self.masks.shape}: expected "
                       "(k, L, D) / (k, L)")
    k, length, dim = self.embs.shape
    if prompt_of_chunk is None:
      if k not in (1, n):
        raise ValueError(f"{k} caption rows for {n} noisy chunks (infer_chunk_num "
                         f"{infer_chunk_num} - clean_chunk_num {clean_chunk_num})")
      prompt_of_chunk = [0] * n if k == 1 else list(range(n))
    self.prompt_of_chunk = [int(i) for i in prompt_of_chunk]
    if len(self.prompt_of_chunk) != n or not all(0 <= i < k for i in self.prompt_of_chunk):
      raise ValueError(f"prompt_of_chunk must give one of {k} prompts for each of {n} chunks")
    if self.null_caption.shape != (length, dim):
      raise ValueError(f"null_caption {self.null_caption.shape} does not match the caption rows "
                       f"({length}, {dim})")
    if (flags.positive_keys() or flags.neg_prompt) and special is None:
      raise ValueError(f"flags ask for special tokens {flags.positive_keys()} but no "
                       "SpecialTokens were given (load special_tokens.npz or use TextFlags.none())")
    if special is not None and special.dim != dim:
      raise ValueError(f"special tokens have dim {special.dim}, the caption rows {dim}")
    neg, length = self.null_caption, self.null_caption.shape[0]
    if flags.neg_prompt:
      neg, _ = prepend_tokens(neg, np.zeros(length, np.float32),
                              [special.token(k) for k in NEGATIVE_KEYS])
    neg_m = np.zeros(length, np.float32)
    neg_m[:NULL_CAPTION_VALID] = 1
    self._null = (neg, neg_m)

  def null(self):
    return self._null

  def cond(self, chunk: int):
    """Row and mask of absolute chunk `chunk` in the conditional half."""
    if not 0 <= chunk < self.infer_chunk_num:
      raise IndexError(f"chunk {chunk} outside [0, {self.infer_chunk_num})")
    if chunk < self.clean_chunk_num:
      return self.null_caption, np.zeros(self.null_caption.shape[0], np.float32)
    n = self.infer_chunk_num - self.clean_chunk_num
    i = chunk - self.clean_chunk_num
    p = self.prompt_of_chunk[i]
    tokens = [self.special.duration(n - i) if key == "DURATION" else self.special.token(key)
              for key in self.flags.positive_keys()]     # in the official order
    return prepend_tokens(self.embs[p], self.masks[p], tokens)


class ArrayTextRows:
  """Text rows given as the official arrays y (2, C, L, D) and emb_masks (2, C, L)."""

  def __init__(self, y, emb_masks):
    self.y = np.asarray(y, np.float32)
    self.emb_masks = np.asarray(emb_masks, np.float32)
    if self.y.ndim != 4 or self.y.shape[0] != 2 or self.emb_masks.shape != self.y.shape[:3]:
      raise ValueError(f"y {self.y.shape} / emb_masks {self.emb_masks.shape}: expected "
                       "(2, chunks, L, D) / (2, chunks, L)")
    self.infer_chunk_num = self.y.shape[1]

  def cond(self, chunk: int):
    return self.y[0, chunk], self.emb_masks[0, chunk]

  def null(self):
    return self.y[1, 0], self.emb_masks[1, 0]


def build_text_rows(chunk_embs, chunk_masks, null_caption, *, infer_chunk_num: int,
                    clean_chunk_num: int = 0, special: SpecialTokens | None = None,
                    flags: TextFlags = TextFlags()):
  """y (2, C, L, D) float32 and emb_masks (2, C, L) float32, the official arrays.

  chunk_embs (n, L, D) / chunk_masks (n, L): the T5 rows and mask of the prompt of each of the
  n = infer_chunk_num - clean_chunk_num noisy chunks (a single row is used for all of them).
  null_caption (L, D): the DiT's `null_caption_embedding`.
  """
  rows = ChunkTextRows(chunk_embs, chunk_masks, null_caption, infer_chunk_num=infer_chunk_num,
                       clean_chunk_num=clean_chunk_num, special=special, flags=flags)
  cond = [rows.cond(c) for c in range(infer_chunk_num)]
  neg, neg_m = rows.null()
  y = np.stack([np.stack([e for e, _ in cond]),
                np.broadcast_to(neg, (infer_chunk_num,) + neg.shape)])
  m = np.stack([np.stack([k for _, k in cond]),
                np.broadcast_to(neg_m, (infer_chunk_num,) + neg_m.shape)])
  return y.astype(np.float32), m.astype(np.float32)
