"""One process's share of `experiments.prepare`: its shards' videos -> clips -> VAE latents per
chunk on this process's devices + T5 rows per distinct caption -> array_record shards.

Each video is decoded and cut as the `video_folder` training data cuts it
(`tfds_video_folder.video_clips`: resample to fps, stretch to height x width, clips of
clip_frames every stride frames), while the next video decodes in a background thread. The
chunks of a video run through `chunk_encoder` under `shard_map` over the local devices,
`chunks_per_device` each per call (the last call padded with black chunks that are dropped),
so the latents are the train step's bit for bit. A video that cannot be read, is shorter than
one clip, or has bad captions is skipped and recorded with the reason in its shard's marker;
the job goes on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from magi_jax.data.errors import DataError
from magi_jax.data.prepared import layout, records
from magi_jax.data.prepared.layout import PrepareError
from magi_jax.data.tfds_video_folder import load_captions, video_clips, video_folder_config
from magi_jax.media.errors import MediaError
from magi_jax.models.vae_chunks import chunk_encoder


@dataclasses.dataclass(frozen=True)
class PrepareSpec:
  """What to prepare and how. `identity` names the VAE and T5 (kind, path, precision, a
  fingerprint) so that a directory is only continued with the same encoders."""
  folder: str
  out: str
  height: int
  width: int
  clip_frames: int
  frames_per_chunk: int
  stride: int
  fps: int = 24
  videos_per_shard: int = 8
  max_length: int = 800
  identity: dict = dataclasses.field(default_factory=dict)

  def settings(self, folder_fingerprint: str) -> dict:
    return {"format": layout.FORMAT_VERSION, "folder_fingerprint": folder_fingerprint,
            "video": {"height": self.height, "width": self.width, "fps": self.fps,
                      "clip_frames": self.clip_frames, "stride": self.stride,
                      "frames_per_chunk": self.frames_per_chunk},
            "videos_per_shard": self.videos_per_shard,
            "text": {"max_length": self.max_length},
            **self.identity}


class DeviceChunkEncoder:
  """Chunks uint8 (N, F, H, W, 3) -> posterior means (N, z, F/4, h, w) as numpy, split over
  `devices` (this process's own), `chunks_per_device` per device per call."""

  def __init__(self, vae, devices, chunks_per_device: int = 2):
    if chunks_per_device < 1:
      raise PrepareError(f"chunks_per_device must be >= 1, got {chunks_per_device}")
    P = jax.sharding.PartitionSpec
    mesh = jax.sharding.Mesh(np.array(devices), ("chunks",))
    self.group = len(devices) * chunks_per_device
    self.sharding = jax.sharding.NamedSharding(mesh, P("chunks"))
    self.fn = jax.jit(jax.shard_map(chunk_encoder(vae), mesh=mesh, in_specs=P("chunks"),
                                    out_specs=P("chunks")))

  def __call__(self, chunks: np.ndarray) -> np.ndarray:
    n, outs = chunks.shape[0], []
    for i in range(0, n, self.group):
      g = chunks[i:i + self.group]
      if g.shape[0] < self.group:
        g = np.concatenate([g, np.zeros((self.group - g.shape[0],) + g.shape[1:], g.dtype)])
      outs.append(self.fn(jax.device_put(g, self.sharding)))     # dispatched, not awaited
    return np.concatenate([np.asarray(o) for o in outs])[:n]


@dataclasses.dataclass
class ShardResult:
  marker: dict
  reused: bool


def folder_videos(folder: str) -> tuple[dict, dict, list[str]]:
  """(captions of the usable videos, {video: reason} for the mp4 files whose captions are
  bad, reasons for captions of files that are not there)."""
  from magi_jax.data.tfds_video_folder import video_files
  problems: list = []
  captions = load_captions(folder, problems)
  videos = set(video_files(folder))
  bad = {name: reason for name, reason in problems if name in videos}
  stray = [reason for name, reason in problems if name not in videos]
  return captions, bad, stray


def _decode(cfg, name, caption, chunks):
  """(clips, None) or (None, reason): every clip of one video, decoded."""
  try:
    return list(video_clips(cfg, name, caption, chunks)), None
  except (DataError, MediaError) as e:
    return None, str(e)


def prepare_shards(spec: PrepareSpec, vae, text_encoder, *, process_index: int = 0,
                   process_count: int = 1, devices=None, chunks_per_device: int = 2,
                   echo: Callable[[str], None] = print, progress: bool = True) -> list[ShardResult]:
  """Makes this process's unfinished shards of `spec.out`; returns every shard of this process.

  vae: the frozen VAE (`models.vae`); text_encoder: encode(list[str]) -> (emb (n, L, D),
  mask (n, L)) with L = spec.max_length (`text.TextEncoder`); devices: the local devices to
  encode on (default: all of this process's).
  """
  from magi_jax.data.tfds_video_folder import folder_fingerprint
  folder = os.path.abspath(spec.folder)
  cfg = video_folder_config(folder, height=spec.height, width=spec.width,
                            clip_frames=spec.clip_frames, frames_per_chunk=spec.frames_per_chunk,
                            stride=spec.stride, fps=spec.fps)
  settings = spec.settings(folder_fingerprint(folder))
  sid = layout.settings_hash(settings)
  layout.claim_directory(spec.out, settings)
  captions, bad, stray = folder_videos(folder)
  for reason in stray:
    echo(f"prepare: warning: {reason}")
  plan = layout.shard_plan(list(captions) + list(bad), spec.videos_per_shard)
  mine = layout.my_shards(len(plan), process_index, process_count)
  results, todo = [], []
  for s in mine:
    marker = layout.finished_marker(spec.out, s, sid)
    if marker is not None:
      results.append(ShardResult(marker, True))
    else:
      todo.append(s)
  echo(f"prepare: process {process_index} of {process_count}: {len(mine)} of {len(plan)} "
       f"shard(s), {len(mine) - len(todo)} already done, {len(todo)} to make")
  if not todo:
    return results
  encoder = DeviceChunkEncoder(vae, devices or jax.local_devices(), chunks_per_device)
  videos = [(s, name) for s in todo for name in plan[s]]
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(videos), unit="video", desc=f"prepare p{process_index}",
               dynamic_ncols=True, mininterval=2.0)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

  def submit(i):
    if i >= len(videos) or videos[i][1] not in captions:
      return None
    name = videos[i][1]
    return pool.submit(_decode, cfg, name, *captions[name])

  try:
    pending = submit(0)
    i = 0
    for s in todo:
      t0 = time.monotonic()
      layout.remove_leftovers(spec.out, s)
      tmp = layout.shard_path(spec.out, s) + f".tmp{os.getpid()}"
      from array_record.python.array_record_module import ArrayRecordWriter
      writer = ArrayRecordWriter(tmp, "group_size:1")
      marker = {"shard": s, "settings": sid, "videos": list(plan[s]), "skipped": [],
                "records": 0, "chunk_counts": [], "process": process_index}
      try:
        for name in plan[s]:
          future, pending = pending, submit(i + 1)
          i += 1
          clips, reason = (None, bad.get(name)) if future is None else future.result()
          if clips is None:
            marker["skipped"].append({"video": name, "reason": reason})
          else:
            for rec in _encode_video(name, clips, encoder, text_encoder, spec):
              writer.write(records.encode_record(rec))
              marker["records"] += 1
              marker["chunk_counts"].append(len(rec["chunk_captions"]))
          if bar is not None:
            bar.update(1)
      finally:
        writer.close()
      marker["seconds"] = round(time.monotonic() - t0, 3)
      marker = layout.commit_shard(spec.out, s, tmp, marker)
      results.append(ShardResult(marker, False))
      msg = (f"shard {s + 1}/{len(plan)}: {marker['records']} clips, "
             f"{sum(marker['chunk_counts'])} chunks, {marker['bytes'] / 2**20:.1f} MiB, "
             f"{marker['seconds']:.1f} s")
      if marker["skipped"]:
        msg += f"; skipped {len(marker['skipped'])}: " + "; ".join(
            f"{v['video']} ({v['reason']})" for v in marker["skipped"])
      (bar.write if bar is not None else echo)(msg)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    if bar is not None:
      bar.close()
  return sorted(results, key=lambda r: r.marker["shard"])


def _encode_video(name, clips, encoder, text_encoder, spec: PrepareSpec):
  """Yields the records of one video's clips (latents and text rows)."""
  F = spec.frames_per_chunk
  frames = np.stack([rec["frames"] for _, rec in clips])            # (n, clip_frames, H, W, 3)
  n, T = frames.shape[:2]
  z = encoder(frames.reshape((n * (T // F), F) + frames.shape[2:]))  # (n C, z, cw, h, w)
  z = z.reshape((n, T // F) + z.shape[1:])
  texts = sorted({t for _, rec in clips for t in rec["chunk_captions"]})
  emb, mask = text_encoder.encode(texts)
  emb, mask = np.asarray(emb), np.asarray(mask)
  if emb.shape[:2] != (len(texts), spec.max_length) or mask.shape != emb.shape[:2]:
    raise PrepareError(f"the text encoder returned rows {emb.shape} / mask {mask.shape} for "
                       f"{len(texts)} captions; expected ({len(texts)}, {spec.max_length}, D)")
  row = {t: k for k, t in enumerate(texts)}
  for k, (start, rec) in enumerate(clips):
    caps = list(rec["chunk_captions"])
    idx = [row[t] for t in caps]
    # (C, z, cw, h, w) -> (C·cw, h, w, z): time first, as the pipeline packs it.
    out = {"video": name, "start_frame": int(start), "latents": _time_first(z[k])}
    out.update(records.clip_text(emb[idx], mask[idx], caps, f"{name}@{start}"))
    yield out


def _time_first(z: np.ndarray) -> np.ndarray:
  """(C, z, cw, h, w) chunk latents -> (C·cw, h, w, z)."""
  C, zc, cw, h, w = z.shape
  return np.ascontiguousarray(z.transpose(0, 2, 3, 4, 1).reshape(C * cw, h, w, zc))
