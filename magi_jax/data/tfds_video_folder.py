"""`video_folder`: the user's own mp4 files + captions as a tensorflow_datasets builder.

Why: fine-tuning on your own footage should go through the same array_record + grain path as the
synthetic data. The folder holds `*.mp4` files and `captions.json`:

    {"a.mp4": "a dog runs on the beach",
     "b.mp4": {"caption": "a car", "chunk_captions": ["a car waits", "a car drives off", ...]}}

`chunk_captions` are per chunk of the whole video (chunk k = frames [k F, (k + 1) F) after fps
resampling, F = frames_per_chunk); a clip starting at frame s takes the ones of its chunks. With
a plain caption every chunk of every clip gets that caption.

Each video is decoded with `magi_jax.media.read_video` (the bundled ffmpeg: resample to `fps`,
stretch to width x height, so height and width are multiples of 16), whole, into memory, and cut
into clips of `clip_frames` frames every `stride` frames (both multiples of F, so clips start on
chunk boundaries); a tail shorter than a clip is dropped. An optional encoder
(`encode(list[str]) -> (emb (n, L, D), mask (n, L))`, e.g. `magi_jax.text.TextEncoder`) adds
precomputed caption embeddings per chunk.

Problems raise DataError naming the file: no captions.json, a video without a caption (or a
caption for a missing video), a video shorter than one clip, too few chunk captions, a file ffmpeg
cannot decode.

Storage is TensorFlow-free as in `tfds_bouncing` (strings: `Text`, read back as utf-8 bytes).
Config names end in a hash of the parameters, the encoder's name and a fingerprint of the folder
(file names, sizes, mtimes, captions.json), so changed footage or settings get a new directory
instead of silently reusing the old one.

Record fields (C = clip_frames / frames_per_chunk), split "train" only:
  video bytes (file name); start_frame int64; frames uint8 (clip_frames, H, W, 3);
  caption bytes; chunk_captions C x bytes;
  with an encoder: text_emb float16 (C, L, D), text_mask int32 (C, L).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from magi_jax.data.errors import DataError
from magi_jax.media.errors import MediaError

CAPTIONS_FILE = "captions.json"
VERSION = "1.0.0"


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
  """Where the videos are and how to cut them. Build with `video_folder_config`."""
  folder: str = ""
  height: int = 256
  width: int = 256
  fps: int = 24
  clip_frames: int = 96
  stride: int = 96
  frames_per_chunk: int = 24
  encoder: Any = None
  encoder_name: str = ""

  @property
  def num_chunks(self) -> int:
    return self.clip_frames // self.frames_per_chunk


def _positive_int(field, v):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
    raise DataError(f"video_folder: {field} must be a positive integer, got {v!r}")


VIDEO_EXTENSIONS = (".mp4",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def video_files(folder: str, extensions=VIDEO_EXTENSIONS) -> list[str]:
  """The folder's files whose names end in one of `extensions` (any case), sorted."""
  ends = tuple(extensions)
  return sorted(f for f in os.listdir(folder)
                if f.lower().endswith(ends) and os.path.isfile(os.path.join(folder, f)))


def folder_fingerprint(folder: str, extensions=VIDEO_EXTENSIONS) -> str:
  """Hash of the media file names, sizes and mtimes and of captions.json's bytes."""
  h = hashlib.sha256()
  for f in video_files(folder, extensions):
    st = os.stat(os.path.join(folder, f))
    h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  cap = os.path.join(folder, CAPTIONS_FILE)
  if os.path.isfile(cap):
    with open(cap, "rb") as fh:
      h.update(fh.read())
  return h.hexdigest()


def video_folder_config(folder, *, height: int, width: int, clip_frames: int,
                        frames_per_chunk: int, stride: int | None = None, fps: int = 24,
                        encoder=None, encoder_name: str | None = None,
                        name: str = "custom") -> VideoFolderConfig:
  """A validated VideoFolderConfig named f"{name}_{hash}".

  Args:
    folder: directory with *.mp4 and captions.json.
    height, width: output size, multiples of 16.
    clip_frames: frames per clip, a multiple of frames_per_chunk.
    frames_per_chunk: frames per caption chunk.
    stride: frames between clip starts (default clip_frames), a multiple of frames_per_chunk.
    fps: the rate videos are resampled to.
    encoder: optional object with encode(list[str]) -> (emb (n, L, D), mask (n, L)).
    encoder_name: identifies the encoder in the config hash (default: its class path); change
      it when the encoder's weights change.
    name: config name prefix.
  """
  folder = os.path.abspath(os.fspath(folder))
  if not os.path.isdir(folder):
    raise DataError(f"{folder}: video folder does not exist")
  stride = clip_frames if stride is None else stride
  for field, v in (("height", height), ("width", width), ("clip_frames", clip_frames),
                   ("frames_per_chunk", frames_per_chunk), ("stride", stride), ("fps", fps)):
    _positive_int(field, v)
  for field, v in (("height", height), ("width", width)):
    if v % 16:
      raise DataError(f"video_folder: {field} {v} is not a multiple of 16")
  for field, v in (("clip_frames", clip_frames), ("stride", stride)):
    if v % frames_per_chunk:
      raise DataError(f"video_folder: {field} {v} is not a multiple of frames_per_chunk "
                      f"{frames_per_chunk}")
  if encoder is not None and not callable(getattr(encoder, "encode", None)):
    raise DataError("video_folder: encoder must have encode(list[str]) -> (emb, mask)")
  if encoder is not None and not encoder_name:
    encoder_name = f"{type(encoder).__module__}.{type(encoder).__qualname__}"
  encoder_name = encoder_name or ""
  params = {"folder": folder, "height": height, "width": width, "fps": fps,
            "clip_frames": clip_frames, "stride": stride, "frames_per_chunk": frames_per_chunk,
            "encoder": encoder_name, "version": VERSION}
  blob = json.dumps(params, sort_keys=True) + folder_fingerprint(folder)
  h = hashlib.sha256(blob.encode()).hexdigest()[:8]
  return VideoFolderConfig(name=f"{name}_{h}", description=json.dumps(params, sort_keys=True),
                           folder=folder, height=height, width=width, fps=fps,
                           clip_frames=clip_frames, stride=stride,
                           frames_per_chunk=frames_per_chunk, encoder=encoder,
                           encoder_name=encoder_name)


def load_captions(folder: str, problems: list | None = None,
                  extensions=VIDEO_EXTENSIONS) -> dict:
  """{file: (caption, chunk_captions or None)} for every mp4 (or file of `extensions`) of the
  folder, checked.

  A missing or unreadable captions file always raises. A problem of one video (no caption, a
  caption that is not a string, bad chunk_captions, a caption for a file that is not there)
  raises too, unless `problems` is a list: then (file, reason) is appended to it and that
  video is left out (what `experiments.prepare` lists as skipped)."""
  path = os.path.join(folder, CAPTIONS_FILE)
  if not os.path.isfile(path):
    raise DataError(f"{path}: captions file not found (expected {{\"file.mp4\": \"caption\"}})")
  try:
    with open(path, encoding="utf-8") as fh:
      raw = json.load(fh)
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise DataError(f"{path}: must be a JSON object mapping file names to captions")

  def problem(name, message):
    if problems is None:
      raise DataError(message)
    problems.append((name, message))

  videos = video_files(folder, extensions)
  what = "an mp4 file" if tuple(extensions) == VIDEO_EXTENSIONS else "a video or image file"
  for name in raw:
    if name not in videos:
      problem(name, f"{os.path.join(folder, name)}: has a caption in {CAPTIONS_FILE} but "
              f"is not {what} of the folder")
  out = {}
  for name in videos:
    vpath = os.path.join(folder, name)
    if name not in raw:
      problem(name, f"{vpath}: no caption in {path}")
      continue
    entry = raw[name]
    chunks = None
    if isinstance(entry, dict):
      caption, chunks = entry.get("caption"), entry.get("chunk_captions")
      if chunks is not None and (not isinstance(chunks, list) or
                                 not all(isinstance(c, str) for c in chunks)):
        problem(name, f"{vpath}: chunk_captions must be a list of strings")
        continue
    else:
      caption = entry
    if not isinstance(caption, str):
      problem(name, f"{vpath}: caption must be a string, got {caption!r}")
      continue
    out[name] = (caption, chunks)
  return out


class VideoFolder(tfds.core.GeneratorBasedBuilder):
  """Clips of a folder of captioned mp4 files (pass a config from `video_folder_config`)."""

  VERSION = tfds.core.Version(VERSION)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # See tfds_bouncing: no checksums file, and no need for `importlib_resources`.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    C = cfg.num_chunks
    feats = {
        "video": tfds.features.Text(),
        "start_frame": np.int64,
        "frames": tfds.features.Tensor(shape=(cfg.clip_frames, cfg.height, cfg.width, 3),
                                       dtype=np.uint8),
        "caption": tfds.features.Text(),
        "chunk_captions": tfds.features.Sequence(tfds.features.Text(), length=C),
    }
    if cfg.encoder is not None:
      # L and D are the encoder's; two unknown dimensions need an explicit byte encoding.
      feats["text_emb"] = tfds.features.Tensor(shape=(C, None, None), dtype=np.float16,
                                               encoding="bytes")
      feats["text_mask"] = tfds.features.Tensor(shape=(C, None), dtype=np.int32)
    return tfds.core.DatasetInfo(builder=self, description=__doc__.split("\n")[0],
                                 features=tfds.features.FeaturesDict(feats))

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if not cfg.folder:
      raise DataError("video_folder: no folder given; build the config with "
                      "video_folder_config(folder, ...)")
    captions = load_captions(cfg.folder)   # fail before any video is decoded
    return {"train": self._generate_examples(captions)}

  def _generate_examples(self, captions: dict):
    cfg = self.builder_config
    for name, (caption, chunks) in captions.items():
      for start, rec in video_clips(cfg, name, caption, chunks):
        yield f"{name}@{start}", rec


def video_clips(cfg: VideoFolderConfig, name: str, caption: str, chunks):
  """Yields (start_frame, record) for every clip of one video."""
  from magi_jax.media.read import read_video   # lazy: ffmpeg only when building
  path = os.path.join(cfg.folder, name)
  try:
    video = read_video(path, cfg.height, cfg.width, fps=cfg.fps, max_frames=None)
  except MediaError as e:
    raise DataError(f"cannot read video: {e}") from e
  n, F, C = video.shape[0], cfg.frames_per_chunk, cfg.num_chunks
  if n < cfg.clip_frames:
    raise DataError(f"{path}: video has {n} frames at {cfg.fps} fps, fewer than clip_frames "
                    f"{cfg.clip_frames}")
  starts = list(range(0, n - cfg.clip_frames + 1, cfg.stride))
  if chunks is None:
    chunks = [caption] * ((starts[-1] + cfg.clip_frames) // F)
  needed = (starts[-1] + cfg.clip_frames) // F
  if len(chunks) < needed:
    raise DataError(f"{path}: has {len(chunks)} chunk_captions but its clips cover {needed} "
                    f"chunks of {F} frames")
  clip_texts = [chunks[s // F:s // F + C] for s in starts]
  rows = {}
  if cfg.encoder is not None:
    texts = sorted({t for ts in clip_texts for t in ts})
    emb, mask = cfg.encoder.encode(texts)
    emb, mask = np.asarray(emb), np.asarray(mask)
    if emb.ndim != 3 or mask.shape != emb.shape[:2] or emb.shape[0] != len(texts):
      raise DataError(f"encoder returned emb {emb.shape} and mask {mask.shape} for "
                      f"{len(texts)} texts; expected (n, L, D) and (n, L)")
    rows = {t: i for i, t in enumerate(texts)}
  for s, texts in zip(starts, clip_texts):
    rec = {"video": name, "start_frame": s, "frames": video[s:s + cfg.clip_frames],
           "caption": caption, "chunk_captions": list(texts)}
    if cfg.encoder is not None:
      idx = [rows[t] for t in texts]
      rec["text_emb"] = emb[idx].astype(np.float16)
      rec["text_mask"] = mask[idx].astype(np.int32)
    yield s, rec


def make_builder(data_dir, folder, **config_kwargs) -> VideoFolder:
  """A prepared `video_folder` builder (generated if missing); kwargs: `video_folder_config`."""
  cfg = video_folder_config(folder, **config_kwargs)
  builder = VideoFolder(data_dir=os.fspath(data_dir), config=cfg, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
