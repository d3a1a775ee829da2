"""An on-disk cache of text embeddings, keyed by prompt and every setting that changes them.

T5-XXL is 4.7B parameters; one prompt costs seconds to minutes on a host. Sampling and
training look embeddings up here first. One `.npz` per entry (no pickles), named by the
SHA-256 of the key, holding the valid rows only (pad rows are zero in every embedding this
package returns, so nothing is lost). Writes are atomic (temp file + rename), so concurrent
processes and interrupted runs never leave a half-written entry; an unreadable entry is
reported, ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile

import numpy as np

log = logging.getLogger(__name__)


def cache_key(**settings) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class EmbeddingCache:
  def __init__(self, directory: str):
    self.directory = directory
    os.makedirs(directory, exist_ok=True)
    self.hits = 0
    self.misses = 0

  def _path(self, key: str) -> str:
    return os.path.join(self.directory, key[:2], key + ".npz")

  def get(self, key: str, length: int):
    """(emb (length, D) float32, mask (length,) int32) or None."""
    path = self._path(key)
    if not os.path.exists(path):
      self.misses += 1
      return None
    try:
      with np.load(path, allow_pickle=False) as z:
        rows = z["rows"].astype(np.float32)
        valid = int(z["valid"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
      log.warning("text-embedding cache entry %s is unreadable (%s); recomputing", path, e)
      self.misses += 1
      return None
    if rows.ndim != 2 or rows.shape[0] != valid or valid > length:
      log.warning("text-embedding cache entry %s has shape %s for %d valid rows of %d; recomputing",
                  path, rows.shape, valid, length)
      self.misses += 1
      return None
    emb = np.zeros((length, rows.shape[1]), np.float32)
    emb[:valid] = rows
    mask = np.zeros(length, np.int32)
    mask[:valid] = 1
    self.hits += 1
    return emb, mask

  def put(self, key: str, emb: np.ndarray, mask: np.ndarray) -> None:
    valid = int(np.asarray(mask).sum())
    if not np.all(np.asarray(mask)[:valid] == 1):
      raise ValueError("the mask must be 1 on a prefix of the rows")
    path = self._path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, rows=np.asarray(emb, np.float32)[:valid], valid=np.int64(valid))
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
