"""One process's share of `experiments.prepare`: its shards' videos and images -> clips -> VAE
latents per chunk on this process's devices + T5 rows per distinct caption -> array_record
shards.

Each video is cut as the `video_folder` training data cuts it (`tfds_video_folder.video_clips`:
resample to fps, stretch to the frame size, clips of clip_frames every stride frames), but read
as ffmpeg decodes it (`media.read.stream_video`) on a background thread that stays a few clips
ahead of the encoder: memory does not grow with a video's length. An image
(png / jpg / jpeg / webp / bmp with a caption) is a one-frame video: one chunk of one frame,
encoded as the VAE encodes a single frame (one latent frame). The frame size is
height x width, or with `buckets` the bucket whose aspect ratio (log w/h) is nearest the
item's own (the first of equals), so one run holds several shapes without padding. With
`val_fraction` a share of the items, chosen by a hash of the file name (stable when the folder
grows), goes to the validation split. Each record belongs to one group,
"<split>/<video|image>/<h>x<w>", which the trainer turns into one stream per group. The
chunks of a video run through `chunk_encoder` under `shard_map` over the local devices,
`chunks_per_device` each per call (the last call padded with black chunks that are dropped),
so the latents are the train step's bit for bit. An item that cannot be read, a video shorter
than one clip, or bad captions is skipped and recorded with the reason in its shard's marker;
the job goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from magi_jax.data.errors import DataError
from magi_jax.data.prepared import layout, records
from magi_jax.data.prepared.layout import PrepareError
from magi_jax.data.tfds_video_folder import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, load_captions,
                                             video_files)
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
  buckets: tuple = ()              # ((h, w), ...); () = ((height, width),)
  val_fraction: float = 0.0
  tfds_dir: str = ""               # instead of `folder`: a built `video_folder` TFDS dataset
  identity: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for h, w in self.sizes:
      if h % 16 or w % 16 or h < 16 or w < 16:
        raise PrepareError(f"bucket {h}x{w}: height and width must be positive multiples of 16")
    if not 0.0 <= self.val_fraction < 1.0:
      raise PrepareError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

  @property
  def sizes(self) -> tuple[tuple[int, int], ...]:
    if not self.buckets:
      return ((int(self.height), int(self.width)),)
    return tuple((int(h), int(w)) for h, w in self.buckets)

  def settings(self, folder_fingerprint: str) -> dict:
    return {"format": layout.FORMAT_VERSION, "folder_fingerprint": folder_fingerprint,
            "video": {"height": self.height, "width": self.width, "fps": self.fps,
                      "clip_frames": self.clip_frames, "stride": self.stride,
                      "frames_per_chunk": self.frames_per_chunk},
            "buckets": [list(b) for b in self.sizes], "val_fraction": self.val_fraction,
            "videos_per_shard": self.videos_per_shard,
            "text": {"max_length": self.max_length},
            **self.identity}


MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS


def settings_of(spec: PrepareSpec) -> dict:
  """The spec's settings with the fingerprint of its folder's media files and captions (or of
  its TFDS dataset's files)."""
  if spec.tfds_dir:
    return dict(spec.settings(tfds_fingerprint(spec)), source="tfds")
  from magi_jax.data.tfds_video_folder import folder_fingerprint
  return spec.settings(folder_fingerprint(os.path.abspath(spec.folder), MEDIA_EXTENSIONS))


def open_tfds(spec: PrepareSpec):
  """The `train` split of the built `video_folder` dataset at spec.tfds_dir (its version
  directory, e.g. <data_dir>/video_folder/custom_1a2b3c4d/1.0.0), checked against the spec."""
  import json
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder_from_directory(spec.tfds_dir)
    params = json.loads(builder.info.config_description or "{}")
  except Exception as e:      # tfds raises many types for a directory that is not a dataset
    raise PrepareError(f"{spec.tfds_dir}: not a built TFDS dataset directory ({e})") from None
  if "frames" not in builder.info.features or "chunk_captions" not in builder.info.features:
    raise PrepareError(f"{spec.tfds_dir}: not a video_folder dataset (no frames / "
                       "chunk_captions features)")
  want = {"height": spec.height, "width": spec.width, "fps": spec.fps,
          "clip_frames": spec.clip_frames, "stride": spec.stride,
          "frames_per_chunk": spec.frames_per_chunk}
  diff = [f"{k} {params.get(k)!r} there, {v!r} in the config" for k, v in want.items()
          if params.get(k) != v]
  if diff:
    raise PrepareError(f"{spec.tfds_dir}: the dataset's clips differ from the config's data "
                       "section: " + "; ".join(diff))
  if spec.buckets:
    raise PrepareError("data.buckets: the clips of a TFDS dataset are already cut to one size; "
                       "prepare from the video folder to bucket them")
  return builder.as_data_source("train")


def tfds_fingerprint(spec: PrepareSpec) -> str:
  h = hashlib.sha256()
  for f in sorted(os.listdir(spec.tfds_dir)):
    path = os.path.join(spec.tfds_dir, f)
    if os.path.isfile(path):
      h.update(f"{f}\0{os.path.getsize(path)}\n".encode())
  return h.hexdigest()


def source_items(spec: PrepareSpec) -> tuple[dict, dict, list[str]]:
  """(items to prepare -> their captions, {item: reason} of items skipped up front, notes on
  captions without a file): a folder's files (`folder_videos`), or a TFDS dataset's records
  by index ("00000042"; each record is one clip with its captions)."""
  if spec.tfds_dir:
    return {f"{i:08d}": (None, None) for i in range(len(open_tfds(spec)))}, {}, []
  return folder_videos(os.path.abspath(spec.folder))


def item_kind(name: str) -> str:
  return "image" if name.lower().endswith(IMAGE_EXTENSIONS) else "video"


def nearest_bucket(height: int, width: int, sizes) -> tuple[int, int]:
  """The size whose aspect ratio is nearest height x width's, in log(w / h) (first of equals)."""
  r = math.log(width / height)
  return min(sizes, key=lambda b: abs(math.log(b[1] / b[0]) - r))


def split_of(name: str, val_fraction: float) -> str:
  """'val' for a stable `val_fraction` share of the file names (by sha256), else 'train'."""
  if val_fraction <= 0:
    return "train"
  u = int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) / 16 ** 12
  return "val" if u < val_fraction else "train"


def group_name(split: str, kind: str, size) -> str:
  return f"{split}/{kind}/{size[0]}x{size[1]}"


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


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """What a preparation makes, computed once per process: the settings (with the source's
  fingerprint) and their id, the items with their captions, the items skipped up front and why,
  notes on captions without a file, and the items of each shard (`layout.shard_plan`)."""
  settings: dict
  settings_id: str
  captions: dict
  bad: dict
  stray: list
  shards: list


def plan_shards(spec: PrepareSpec) -> ShardPlan:
  settings = settings_of(spec)
  captions, bad, stray = source_items(spec)
  return ShardPlan(settings, layout.settings_hash(settings), captions, bad, stray,
                   layout.shard_plan(list(captions) + list(bad), spec.videos_per_shard))


def folder_videos(folder: str) -> tuple[dict, dict, list[str]]:
  """(captions of the usable videos and images, {file: reason} for the media files whose
  captions are bad, reasons for captions of files that are not there)."""
  problems: list = []
  captions = load_captions(folder, problems, MEDIA_EXTENSIONS)
  videos = set(video_files(folder, MEDIA_EXTENSIONS))
  bad = {name: reason for name, reason in problems if name in videos}
  stray = [reason for name, reason in problems if name not in videos]
  return captions, bad, stray


def _video_clips(path: str, size, spec: PrepareSpec, caption: str, chunks):
  """Yields (start_frame, {"frames", "chunk_captions"}) for the clips of one video as ffmpeg
  decodes it (`media.read.stream_video`: a clip and a block of frames in memory, whatever the
  video's length); the cuts of `tfds_video_folder.video_clips`."""
  from magi_jax.media.read import stream_video
  F, L, S = spec.frames_per_chunk, spec.clip_frames, spec.stride
  C = L // F
  buf, offset, start = None, 0, 0             # buf[0] is frame `offset` of the video
  try:
    for block in stream_video(path, size[0], size[1], fps=spec.fps):
      buf = block if buf is None else np.concatenate([buf, block])
      while start + L <= offset + len(buf):
        k = start // F
        texts = chunks[k:k + C] if chunks is not None else [caption] * C
        if len(texts) < C:
          raise DataError(f"{path}: has {len(chunks)} chunk_captions but its clips cover at "
                          f"least {k + C} chunks of {F} frames")
        yield start, {"frames": buf[start - offset:start - offset + L].copy(),
                      "chunk_captions": list(texts)}
        start += S
      drop = min(start - offset, len(buf))
      buf, offset = buf[drop:], offset + drop
  except MediaError as e:
    raise DataError(f"cannot read video: {e}") from e
  if start == 0:
    n = offset + (0 if buf is None else len(buf))
    raise DataError(f"{path}: video has {n} frames at {spec.fps} fps, fewer than clip_frames {L}")


def _open_item(spec: PrepareSpec, folder: str, name: str, caption: str, chunks):
  """(group, frames per chunk, clip iterator) of one file; the iterator decodes lazily."""
  from magi_jax.media.read import frame_size, read_image
  path = os.path.join(folder, name)
  kind = item_kind(name)
  size = spec.sizes[0]
  if len(spec.sizes) > 1:
    size = nearest_bucket(*frame_size(path), spec.sizes)
  group = group_name(split_of(name, spec.val_fraction), kind, size)
  if kind == "image":
    try:
      frames = read_image(path, *size)
    except MediaError as e:
      raise DataError(f"cannot read image: {e}") from e
    return group, 1, iter([(0, {"frames": frames, "chunk_captions": [caption]})])
  return group, spec.frames_per_chunk, _video_clips(path, size, spec, caption, chunks)


def _tfds_item(spec: PrepareSpec, source, name: str):
  """(group, frames per chunk, one clip) of TFDS record `name` (its index)."""
  rec = source[int(name)]
  text = lambda v: v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)
  video = text(rec["video"])
  frames = np.asarray(rec["frames"])
  group = group_name(split_of(video, spec.val_fraction), "video", frames.shape[1:3])
  clip = {"frames": frames, "chunk_captions": [text(t) for t in rec["chunk_captions"]],
          "video": video}
  return group, spec.frames_per_chunk, iter([(int(rec["start_frame"]), clip)])


class _Reader:
  """Decodes the files in order on a background thread into a small queue of events:
  (name, "start", (group, F)), (name, "clip", (start, clip)), (name, "end" | "skip" | "error",
  reason): decoding overlaps encoding, and at most `depth` clips wait in memory."""

  def __init__(self, spec, folder, names, captions, bad, depth: int = 4):
    import queue
    import threading
    self.q = queue.Queue(maxsize=depth)
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._run, args=(spec, folder, names, captions, bad),
                                   daemon=True)
    self.thread.start()

  def _put(self, event) -> bool:
    import queue
    while not self.stop.is_set():
      try:
        self.q.put(event, timeout=0.2)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, spec, folder, names, captions, bad):
    source = open_tfds(spec) if spec.tfds_dir else None
    for name in names:
      if name in bad:
        if not self._put((name, "skip", bad[name])):
          return
        continue
      try:
        if source is not None:
          group, F, clips = _tfds_item(spec, source, name)
        else:
          group, F, clips = _open_item(spec, folder, name, *captions[name])
        if not self._put((name, "start", (group, F))):
          return
        for clip in clips:
          if not self._put((name, "clip", clip)):
            return
        ended = (name, "end", None)
      except (DataError, MediaError) as e:
        ended = (name, "error", str(e))
      except BaseException as e:        # a bug: the consumer re-raises it
        ended = (name, "crash", e)
      if not self._put(ended):
        return

  def events(self, name):
    """The events of file `name` (the next in order), up to its last."""
    while True:
      got, kind, payload = self.q.get()
      if got != name:
        raise RuntimeError(f"prepare: reader out of order ({got} for {name})")
      if kind == "crash":
        raise payload
      yield kind, payload
      if kind in ("end", "skip", "error"):
        return

  def close(self):
    self.stop.set()
    self.thread.join(timeout=10)


def prepare_shards(spec: PrepareSpec, vae, text_encoder, *, process_index: int = 0,
                   process_count: int = 1, devices=None, chunks_per_device: int = 2,
                   plan: ShardPlan | None = None, echo: Callable[[str], None] = print,
                   progress: bool = True) -> list[dict]:
  """Makes this process's unfinished shards of `spec.out`; returns the markers of every shard
  of this process (found intact or just written), by shard.

  vae: the frozen VAE (`models.vae`); text_encoder: encode(list[str]) -> (emb (n, L, D),
  mask (n, L)) with L = spec.max_length (`text.TextEncoder`); devices: the local devices to
  encode on (default: all of this process's); plan: `plan_shards(spec)` (computed when None).
  """
  folder = "" if spec.tfds_dir else os.path.abspath(spec.folder)
  plan = plan or plan_shards(spec)
  sid, captions, bad, shards = plan.settings_id, plan.captions, plan.bad, plan.shards
  layout.claim_directory(spec.out, plan.settings)
  for reason in plan.stray:
    echo(f"prepare: warning: {reason}")
  mine = layout.my_shards(len(shards), process_index, process_count)
  results, todo = [], []
  for s in mine:
    marker = layout.finished_marker(spec.out, s, sid)
    if marker is not None:
      results.append(marker)
    else:
      todo.append(s)
  echo(f"prepare: process {process_index} of {process_count}: {len(mine)} of {len(shards)} "
       f"shard(s), {len(mine) - len(todo)} already done, {len(todo)} to make")
  if not todo:
    return results
  encoder = DeviceChunkEncoder(vae, devices or jax.local_devices(), chunks_per_device)
  names = [name for s in todo for name in shards[s]]
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(names), unit="file", desc=f"prepare p{process_index}",
               dynamic_ncols=True, mininterval=2.0)
  from array_record.python.array_record_module import ArrayRecordWriter
  reader = _Reader(spec, folder, names, captions, bad)
  try:
    for s in todo:
      t0 = time.monotonic()
      layout.remove_leftovers(spec.out, s)
      tmp = layout.shard_path(spec.out, s) + f".tmp{os.getpid()}"
      writer = ArrayRecordWriter(tmp, "group_size:1")
      marker = {"shard": s, "settings": sid, "videos": list(shards[s]), "skipped": [],
                "records": 0, "chunk_counts": [], "groups": [], "process": process_index}
      try:
        for name in shards[s]:
          recs, reason = _encode_item(name, reader.events(name), encoder, text_encoder, spec)
          if reason is not None:
            marker["skipped"].append({"video": name, "reason": reason})
          for group, rec in recs:             # a file's records land together or not at all
            writer.write(records.encode_record(rec))
            marker["records"] += 1
            marker["chunk_counts"].append(len(rec["chunk_captions"]))
            marker["groups"].append(group)
          if bar is not None:
            bar.update(1)
      finally:
        writer.close()
      marker["seconds"] = round(time.monotonic() - t0, 3)
      marker = layout.commit_shard(spec.out, s, tmp, marker)
      results.append(marker)
      msg = (f"shard {s + 1}/{len(shards)}: {marker['records']} clips, "
             f"{sum(marker['chunk_counts'])} chunks, {marker['bytes'] / 2**20:.1f} MiB, "
             f"{marker['seconds']:.1f} s")
      if marker["skipped"]:
        msg += f"; skipped {len(marker['skipped'])}: " + "; ".join(
            f"{v['video']} ({v['reason']})" for v in marker["skipped"])
      (bar.write if bar is not None else echo)(msg)
  finally:
    reader.close()
    if bar is not None:
      bar.close()
  return sorted(results, key=lambda m: m["shard"])


def _encode_item(name, events, encoder, text_encoder, spec: PrepareSpec):
  """([(group, record)], None) for a file's clips, or ([], reason) when it is skipped.

  Clips are encoded in groups of at least the encoder's call size (full device batches); the
  T5 rows of each distinct caption are computed once per file."""
  group, F, recs, pending, rows = None, None, [], [], {}

  def flush():
    if not pending:
      return
    frames = np.stack([clip["frames"] for _, clip in pending])  # (n, clip_frames, H, W, 3)
    n, T = frames.shape[:2]
    z = encoder(frames.reshape((n * (T // F), F) + frames.shape[2:]))
    z = z.reshape((n, T // F) + z.shape[1:])                     # (n, C, z, cw, h, w)
    texts = sorted({t for _, clip in pending for t in clip["chunk_captions"]} - set(rows))
    if texts:
      emb, mask = text_encoder.encode(texts)
      emb, mask = np.asarray(emb), np.asarray(mask)
      if emb.shape[:2] != (len(texts), spec.max_length) or mask.shape != emb.shape[:2]:
        raise PrepareError(f"the text encoder returned rows {emb.shape} / mask {mask.shape} "
                           f"for {len(texts)} captions; expected ({len(texts)}, "
                           f"{spec.max_length}, D)")
      rows.update({t: (emb[k], mask[k]) for k, t in enumerate(texts)})
    for k, (start, clip) in enumerate(pending):
      caps = list(clip["chunk_captions"])
      rec = {"video": clip.get("video", name), "start_frame": int(start),
             "latents": _time_first(z[k])}
      rec.update(records.clip_text(np.stack([rows[t][0] for t in caps]),
                                   np.stack([rows[t][1] for t in caps]), caps,
                                   f"{name}@{start}"))
      recs.append((group, rec))
    pending.clear()

  for kind, payload in events:
    if kind in ("skip", "error"):
      for _ in events:        # drain (nothing follows a skip or an error)
        pass
      return [], payload
    if kind == "start":
      group, F = payload
    elif kind == "clip":
      pending.append(payload)
      if sum(len(clip["chunk_captions"]) for _, clip in pending) >= encoder.group:
        flush()
  flush()
  return recs, None


def _time_first(z: np.ndarray) -> np.ndarray:
  """(C, z, cw, h, w) chunk latents -> (C·cw, h, w, z)."""
  C, zc, cw, h, w = z.shape
  return np.ascontiguousarray(z.transpose(0, 2, 3, 4, 1).reshape(C * cw, h, w, zc))
