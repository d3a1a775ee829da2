"""One prepared clip as bytes (msgpack through flax.serialization), and the grain source that
reads the shards of a finished directory.

A record (C chunks, cw latent frames per chunk, U distinct captions among the C chunks):
  video str; start_frame int; chunk_captions C x str;
  latents (C·cw, h, w, z): the VAE's posterior means, unscaled, in the VAE's compute dtype
    (bfloat16 for the official VAE); the train step scales them (`models.vae_chunks.scaled`)
    exactly as it scales its own encoding;
  text_emb bfloat16 (U, Lu, D): the T5 rows of the distinct captions, cut after the longest
    one's last valid token (rows past a caption's length are zeros, as T5 returns them);
  text_len int32 (U,): valid tokens per caption; chunk_text int32 (C,): each chunk's caption.

`PreparedSource` gives the pipeline (`magi_jax.data.pipeline`) examples with "latents" and
"text_emb" float32 (C, L, D) + "text_mask" (C, L) padded back to the manifest's max_length.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
from flax import serialization

from magi_jax.data.prepared import layout
from magi_jax.data.prepared.layout import PrepareError

TEXT_DTYPE = ml_dtypes.bfloat16
FIELDS = ("video", "start_frame", "chunk_captions", "latents", "text_emb", "text_len",
          "chunk_text")


def clip_text(emb: np.ndarray, mask: np.ndarray, captions: list[str], where: str) -> dict:
  """Per-chunk T5 rows -> the record's text fields (distinct captions, cut to their length).

  emb (C, L, D) and mask (C, L) are the rows of `captions` (one per chunk)."""
  lengths = mask.sum(axis=1).astype(np.int32)
  if not np.array_equal(mask, np.arange(mask.shape[1])[None] < lengths[:, None]):
    raise PrepareError(f"{where}: a T5 mask is not a run of valid tokens then padding")
  distinct = list(dict.fromkeys(captions))
  first = [captions.index(t) for t in distinct]
  cut = max(int(lengths[first].max()), 1)
  return {"chunk_captions": list(captions),
          "text_emb": emb[first, :cut].astype(TEXT_DTYPE),
          "text_len": lengths[first],
          "chunk_text": np.array([distinct.index(t) for t in captions], np.int32)}


def encode_record(rec: dict) -> bytes:
  missing = [f for f in FIELDS if f not in rec]
  if missing:
    raise PrepareError(f"a prepared record needs {missing}")
  return serialization.msgpack_serialize({f: rec[f] for f in FIELDS})


def decode_record(data: bytes, where: str = "record") -> dict:
  try:
    rec = serialization.msgpack_restore(data)
  except Exception as e:      # msgpack raises several unrelated types on corrupt input
    raise PrepareError(f"{where}: not a prepared record ({type(e).__name__}: {e})") from None
  if not isinstance(rec, dict) or any(f not in rec for f in FIELDS):
    raise PrepareError(f"{where}: not a prepared record (fields {sorted(rec)!r})")
  return rec


def text_rows(rec: dict, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """The record's per-chunk rows padded to max_length: float32 (C, L, D), int32 (C, L)."""
  emb, lengths, idx = rec["text_emb"], rec["text_len"], rec["chunk_text"]
  U, cut, D = emb.shape
  rows = np.zeros((U, max_length, D), np.float32)
  rows[:, :cut] = emb.astype(np.float32)
  mask = (np.arange(max_length)[None] < lengths[:, None]).astype(np.int32)
  return rows[idx], mask[idx]


class PreparedSource:
  """Random access to the clips of a finished prepared directory, in shard order.

  Attributes: manifest (the directory's manifest.json), chunk_counts (chunks per example, for
  the pipeline's `num_chunks`), max_length (T5 rows per chunk). `verify=True` also checks every
  shard's sha256 (reads all bytes once)."""

  def __init__(self, directory: str, *, verify: bool = False):
    import grain   # lazy: writing shards needs no grain
    self.directory = os.fspath(directory)
    self.manifest = layout.load_manifest(self.directory)
    if verify:
      bad = layout.verify(self.directory, self.manifest)
      if bad:
        raise PrepareError(f"{bad[0]}: sha256 differs from the manifest ({len(bad)} shard(s)); "
                           "delete them and run experiments.prepare again")
    shards = [m for m in self.manifest["shards"] if m["records"]]
    if not shards:
      raise PrepareError(f"{self.directory}: holds no clips (every video was skipped: see "
                         f"{layout.MANIFEST_FILE})")
    self.max_length = int(self.manifest["settings"]["text"]["max_length"])
    self.chunk_counts = [c for m in shards for c in m["chunk_counts"]]
    self.record_groups = [g for m in shards for g in m["groups"]]
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(self.record_groups):
      groups.setdefault(g, []).append(i)
    self._groups = dict(sorted(groups.items()))
    self._paths = [layout.shard_path(self.directory, m["shard"]) for m in shards]
    self._source = grain.sources.ArrayRecordDataSource(self._paths)
    if len(self._source) != len(self.chunk_counts):
      raise PrepareError(f"{self.directory}: the shards hold {len(self._source)} records, the "
                         f"manifest lists {len(self.chunk_counts)}")

  def __len__(self) -> int:
    return len(self.chunk_counts)

  def record(self, i: int) -> dict:
    return decode_record(self._source[i], f"{self.directory} record {i}")

  def __getitem__(self, i: int) -> dict:
    rec = self.record(i)
    emb, mask = text_rows(rec, self.max_length)
    return {"latents": rec["latents"], "chunk_captions": rec["chunk_captions"],
            "text_emb": emb, "text_mask": mask}

  def groups(self) -> dict[str, list[int]]:
    """Group name ("<split>/<video|image>/<h>x<w>") -> the indices of its records."""
    return {g: list(idx) for g, idx in self._groups.items()}

  def subset(self, group: str) -> Subset:
    idx = self._groups.get(group)
    if not idx:
      raise PrepareError(f"{self.directory}: no records in group {group!r}; it has "
                         f"{sorted(self._groups)}")
    return Subset(self, idx, group)

  def __repr__(self):
    return f"PreparedSource({self.directory!r}, {len(self)} clips)"


class Subset:
  """The records of one group of a PreparedSource (random access, like the source)."""

  def __init__(self, source: PreparedSource, indices: list[int], name: str):
    self.source, self.indices, self.name = source, list(indices), name
    self.chunk_counts = [source.chunk_counts[i] for i in self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[self.indices[i]]

  def __repr__(self):
    return f"Subset({self.source.directory!r}, {self.name!r}, {len(self)} clips)"
