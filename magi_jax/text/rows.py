"""The DiT's per-chunk text inputs `y` and `emb_masks` (spec VAE_T5_IO §2.4-2.5), pure numpy.

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

from typing import Sequence

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


def build_text_rows(chunk_embs, chunk_masks, null_caption, *, infer_chunk_num: int,
                    clean_chunk_num: int = 0, special: SpecialTokens | None = None, flags: TextFlags = TextFlags()):
  """y (2, C, L, D) float32 and emb_masks (2, C, L) float32.

  chunk_embs (n, L, D) / chunk_masks (n, L): the T5 rows and mask of the prompt of each of the
  n = infer_chunk_num - clean_chunk_num noisy chunks (a single row is used for all of them).
  null_caption (L, D): the DiT's `null_caption_embedding`.
  """
  embs = np.asarray(chunk_embs, np.float32)
  masks = np.asarray(chunk_masks, np.float32)
  null = np.asarray(null_caption, np.float32)
  if clean_chunk_num < 0 or infer_chunk_num <= clean_chunk_num:
    raise ValueError(f"need at least one noisy chunk: infer_chunk_num {infer_chunk_num}, "
                     f"clean_chunk_num {clean_chunk_num}")
  if embs.ndim != 3 or masks.shape != embs.shape[:2]:
    raise ValueError(f"chunk_embs {embs.shape} / chunk_masks {masks.shape}: expected (n, L, D) / (n, L)")
  n = infer_chunk_num - clean_chunk_num
  if embs.ndim == 3 and embs.shape[0] == 1 and n > 1:
    embs = np.broadcast_to(embs, (n,) + embs.shape[1:])
    masks = np.broadcast_to(masks, (n,) + masks.shape[1:])
  if embs.ndim == 3 and embs.shape[0] != n:
    raise ValueError(f"{embs.shape[0]} caption rows for {n} noisy chunks "
                     f"(infer_chunk_num {infer_chunk_num} - clean_chunk_num {clean_chunk_num})")
  _, length, dim = embs.shape
  if null.shape != (length, dim):
    raise ValueError(f"null_caption {null.shape} does not match the caption rows ({length}, {dim})")
  keys = flags.positive_keys()
  if (keys or flags.neg_prompt) and special is None:
    raise ValueError(f"flags ask for special tokens {keys} but no SpecialTokens were given "
                     "(load special_tokens.npz or use TextFlags.none())")
  if special is not None and special.dim != dim:
    raise ValueError(f"special tokens have dim {special.dim}, the caption rows {dim}")

  cond_y, cond_m = [], []
  for _ in range(clean_chunk_num):
    cond_y.append(null)
    cond_m.append(np.zeros(length, np.float32))
  for i in range(n):
    e, m = embs[i], masks[i]
    for key in keys:   # one prepend per key, in the official order
      tok = special.duration(n - i) if key == "DURATION" else special.token(key)
      e, m = prepend_tokens(e, m, [tok])
    cond_y.append(e)
    cond_m.append(m)
  chunks = clean_chunk_num + n
  neg = null
  if flags.neg_prompt:
    neg, _ = prepend_tokens(null, np.zeros(length, np.float32),
                            [special.token(k) for k in NEGATIVE_KEYS])
  neg_m = np.zeros(length, np.float32)
  neg_m[:NULL_CAPTION_VALID] = 1
  y = np.stack([np.stack(cond_y), np.broadcast_to(neg, (chunks, length, dim))])
  emb_masks = np.stack([np.stack(cond_m), np.broadcast_to(neg_m, (chunks, length))])
  return y.astype(np.float32), emb_masks.astype(np.float32)
