"""Offline encoding (`experiments.prepare`): a folder of mp4 files -> array_record shards of
per-chunk VAE latents and T5 rows, read back by the trainer without the VAE or T5.

The folder mixes good videos with a corrupt file, a video shorter than a clip, a video without
a caption and a caption without a video. Checked: the skipped videos are listed with their
reasons and never stop the job; the shards' latents are the train step's own encoding bit for
bit; 2 processes x 4 CPU devices write byte-identical shards to 1 process with 1 device; a job
killed mid-way resumes without touching finished shards, and a damaged shard is remade; a
config trains on the shards; mismatched settings and unfinished directories are refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from conftest import XLA_OPT_FLAG
from magi_jax.configs import ConfigError
from magi_jax.data.prepared import layout
from magi_jax.data.prepared.layout import PrepareError
from magi_jax.data.prepared.records import PreparedSource
from magi_jax.media.write import write_video
from magi_jax.train import build
from magi_jax.train.prepare import prepare_from_config
from magi_jax.train.step import model_batch
from test_train_video_folder import FPC, SIZE, T5_TINY, make_config, moving_square

pytestmark = pytest.mark.usefixtures("compile_cache")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"blue.mp4": 2, "green.mp4": 3, "red.mp4": 2}       # clips of FPC frames per video
SKIPPED = {"broken.mp4": "cannot read video", "nocap.mp4": "no caption",
           "short.mp4": "fewer than clip_frames"}


def _frames(colour, seed, n):
  f = moving_square(colour, seed)
  return np.concatenate([f, f[::-1]])[:n] if n > len(f) else f[:n]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  d = tmp_path_factory.mktemp("prep_videos")
  write_video(str(d / "red.mp4"), _frames((230, 40, 40), 0, 16), fps=24)
  write_video(str(d / "blue.mp4"), _frames((60, 90, 255), 1, 16), fps=24)
  write_video(str(d / "green.mp4"), _frames((40, 220, 60), 2, 24), fps=24)
  write_video(str(d / "short.mp4"), _frames((200, 200, 40), 3, 4), fps=24)
  write_video(str(d / "nocap.mp4"), _frames((200, 40, 200), 4, 16), fps=24)
  (d / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(2048))
  with open(d / "captions.json", "w") as f:
    json.dump({"red.mp4": "a red square moves right",
               "blue.mp4": {"caption": "a blue square",
                            "chunk_captions": ["a blue square enters", "a blue square leaves"]},
               "green.mp4": "a green square", "short.mp4": "too short",
               "broken.mp4": "not a video", "ghost.mp4": "a caption without a file"}, f)
  return str(d)


def prep_config(folder, out):
  c = make_config(folder, "")
  c.data.prepared_dir = out
  return c


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prepared") / "data")
  lines = []
  manifest = prepare_from_config(prep_config(folder, out), videos_per_shard=2,
                                 echo=lines.append, progress=False)
  return out, manifest, lines


def test_manifest_lists_clips_checksums_and_skipped_videos(prepared):
  out, manifest, lines = prepared
  t = manifest["totals"]
  assert (t["shards"], t["videos"], t["clips"], t["chunks"], t["skipped"]) == (3, 6, 7, 7, 3)
  assert sorted(m["videos"] for m in manifest["shards"]) == [
      ["blue.mp4", "broken.mp4"], ["green.mp4", "nocap.mp4"], ["red.mp4", "short.mp4"]]
  reasons = {v["video"]: v["reason"] for v in manifest["skipped"]}
  assert set(reasons) == set(SKIPPED)
  for name, why in SKIPPED.items():
    assert why in reasons[name] and name in reasons[name], reasons[name]
    assert any(name in line and why in line for line in lines), lines
  assert "ghost.mp4" in manifest["unmatched_captions"][0]
  for m in manifest["shards"]:
    assert layout.file_sha256(layout.shard_path(out, m["shard"])) == m["sha256"]
  src = PreparedSource(out, verify=True)
  clips = [(src.record(i)["video"], src.record(i)["start_frame"]) for i in range(len(src))]
  assert sorted(clips) == sorted((v, k * FPC) for v, n in GOOD.items() for k in range(n))


def test_streamed_frames_are_read_videos(folder):
  from magi_jax.media.read import read_video, stream_video
  path = os.path.join(folder, "green.mp4")
  blocks = list(stream_video(path, SIZE, SIZE, block=5))
  assert [len(b) for b in blocks] == [5, 5, 5, 5, 4]
  np.testing.assert_array_equal(np.concatenate(blocks),
                                read_video(path, SIZE, SIZE, max_frames=None))
  from magi_jax.media.errors import MediaError
  with pytest.raises(MediaError, match="broken.mp4: cannot be decoded as a video"):
    list(stream_video(os.path.join(folder, "broken.mp4"), SIZE, SIZE))


def test_latents_and_text_rows_are_the_train_steps(prepared, folder):
  """A packed batch of 2 rows x 2 chunks: x1 from the prepared latents equals the in-step
  encoding of the same clips' frames, bit for bit; text rows are T5's rounded to bf16."""
  from magi_jax.media.read import read_video
  from magi_jax.official.t5 import load_text_encoder
  out, _, _ = prepared
  src = PreparedSource(out)
  recs = [src.record(i) for i in range(4)]
  c = make_config(folder, "")
  frames = np.stack([
      np.concatenate([read_video(os.path.join(folder, r["video"]), SIZE, SIZE,
                                 max_frames=None)[r["start_frame"]:r["start_frame"] + FPC]
                      for r in recs[2 * b:2 * b + 2]]) for b in range(2)])
  in_step = jax.jit(lambda f: model_batch({"frames": f}, build.frame_encoder(c))["x1"])(frames)
  lat = np.stack([np.concatenate([r["latents"] for r in recs[2 * b:2 * b + 2]])
                  for b in range(2)])
  offline = jax.jit(lambda z: model_batch({"latents": z}, None, c.vae.scale_factor)["x1"])(lat)
  chex.assert_shape(offline, (2, 16, 2 * FPC // 4, SIZE // 8, SIZE // 8))
  np.testing.assert_array_equal(np.asarray(offline), np.asarray(in_step))

  enc = load_text_encoder(T5_TINY, max_length=c.text.max_length)
  ex = src[0]
  emb, mask = enc.encode(list(recs[0]["chunk_captions"]))
  np.testing.assert_array_equal(ex["text_mask"], np.asarray(mask))
  want = np.asarray(emb).astype(src.record(0)["text_emb"].dtype).astype(np.float32)
  np.testing.assert_array_equal(ex["text_emb"], want)


def test_trains_on_prepared_shards_without_the_vae(prepared, folder, tmp_path, monkeypatch):
  from magi_jax.train.data import train_iterator
  from magi_jax.train.trainer import train
  out, _, _ = prepared
  c = prep_config(folder, out)
  c.data.kind = "prepared"

  def no_vae(*a, **k):
    raise AssertionError("training on prepared data loaded the VAE")
  monkeypatch.setattr(build, "frozen_vae", no_vae)
  batch = next(train_iterator(c, None, str(tmp_path), num_threads=0))
  chex.assert_shape(batch["latents"], (2, 2 * FPC // 4, SIZE // 8, SIZE // 8, 16))
  assert "frames" not in batch
  # with the official special tokens before every chunk's rows (random ones of T5's width)
  rng = np.random.default_rng(0)
  c.text.special_tokens = str(tmp_path / "special_tokens.npz")
  np.savez(c.text.special_tokens, caption_token=rng.normal(size=(1, 64)),
           logo_token=rng.normal(size=(1, 64)), other_tokens=rng.normal(size=(100, 64)))
  result = train(c, str(tmp_path / "work"), echo=lambda s: None)
  assert result.step == 2 and np.isfinite(float(result.last_metrics["loss"]))


def test_config_and_directory_mismatches_are_refused(prepared, folder, tmp_path):
  from magi_jax.train.data import train_iterator
  out, _, _ = prepared
  c = prep_config(folder, out)
  c.data.kind = "prepared"
  c.objective.chunk_width = FPC
  c.data.height = c.data.width = 64
  with pytest.raises(ConfigError, match=r"does not fit this config: data\.height is 64.*"
                                        r"objective\.chunk_width is 8"):
    train_iterator(c, None, str(tmp_path), num_threads=0)
  c = prep_config(folder, out)
  c.data.kind = "prepared"
  c.data.image_ratio = 4.0
  with pytest.raises(ConfigError, match=r"data\.image_ratio is 4\.0 but .* holds no train images"):
    train_iterator(c, None, str(tmp_path), num_threads=0)
  c = prep_config(folder, out)
  c.data.height = c.data.width = 64
  with pytest.raises(PrepareError, match=r"prepared with other settings \(.*height"):
    prepare_from_config(c, videos_per_shard=2, echo=lambda s: None, progress=False)
  c = prep_config(folder, str(tmp_path / "nothing"))
  c.data.kind = "prepared"
  with pytest.raises(PrepareError, match="does not exist.*experiments.prepare"):
    train_iterator(c, None, str(tmp_path), num_threads=0)


def test_a_built_video_folder_dataset_prepares_to_the_same_clips(prepared, folder, tmp_path):
  """The TFDS dataset `data.kind=video_folder` builds (frames + captions per clip) as the source:
  the same latents and rows as preparing the folder itself; a dataset of other clips is refused."""
  import shutil
  from magi_jax.data.tfds_video_folder import make_builder
  out1, _, _ = prepared
  good = tmp_path / "good"
  good.mkdir()
  with open(os.path.join(folder, "captions.json")) as f:
    caps = json.load(f)
  for name in GOOD:
    shutil.copy(os.path.join(folder, name), good / name)
  (good / "captions.json").write_text(json.dumps({n: caps[n] for n in GOOD}))
  builder = make_builder(tmp_path / "tfds", str(good), height=SIZE, width=SIZE,
                         clip_frames=FPC, frames_per_chunk=FPC)
  out = str(tmp_path / "from_tfds")
  c = prep_config(folder, out)
  manifest = prepare_from_config(c, videos_per_shard=3, tfds_dir=builder.data_dir,
                                 echo=lambda s: None, progress=False)
  assert manifest["settings"]["source"] == "tfds" and manifest["totals"]["clips"] == 7
  ref = PreparedSource(out1)
  by_clip = {(r["video"], r["start_frame"]): r for r in map(ref.record, range(len(ref)))}
  src = PreparedSource(out)
  for i in range(len(src)):
    rec = src.record(i)
    want = by_clip[(rec["video"], rec["start_frame"])]
    for k in ("latents", "text_emb", "text_len", "chunk_text"):
      np.testing.assert_array_equal(rec[k], want[k])
    assert rec["chunk_captions"] == want["chunk_captions"]
  c.data.stride = 2 * FPC
  with pytest.raises(PrepareError, match=r"clips differ from the config's data section: stride "
                                         r"8 there, 16 in the config"):
    prepare_from_config(c, str(tmp_path / "other"), tfds_dir=builder.data_dir,
                        echo=lambda s: None, progress=False)


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("MAGI_", "SLURM_", "TPU_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
             XLA_FLAGS=f"{XLA_OPT_FLAG} --xla_force_host_platform_device_count=4")
  env.update(extra)
  return env


def _config_file(tmp_path, folder, out, name="prep_config.py"):
  """The test's config as a file for the command (make_config, importable from tests/)."""
  path = tmp_path / name
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
      "from test_prepare import prep_config\n\n\n"
      f"def get_config():\n  return prep_config({folder!r}, {out!r})\n")
  return str(path)


def _command(config, per_shard):
  return [sys.executable, "-m", "experiments.prepare", f"--config={config}",
          f"--videos_per_shard={per_shard}", "--noprogress"]


def test_two_processes_of_four_devices_write_the_same_shards(prepared, folder, tmp_path):
  import socket
  out1, manifest1, _ = prepared
  out2 = str(tmp_path / "two")
  config = _config_file(tmp_path, folder, out2)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(_command(config, 2), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=_env(MAGI_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                     MAGI_NUM_PROCESSES="2", MAGI_PROCESS_ID=str(i)))
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert "4 of 8 devices" in logs[1] and "prepared " in logs[0], logs
  with open(os.path.join(out2, layout.MANIFEST_FILE)) as f:
    manifest2 = json.load(f)
  assert sorted(m["process"] for m in manifest2["shards"]) == [0, 0, 1]
  strip = lambda m: {k: v for k, v in m.items() if k not in ("process", "seconds")}
  assert [strip(m) for m in manifest2["shards"]] == [strip(m) for m in manifest1["shards"]]
  for s in range(3):
    with open(layout.shard_path(out1, s), "rb") as a, open(layout.shard_path(out2, s), "rb") as b:
      assert a.read() == b.read()


def test_killed_job_resumes_and_remakes_a_damaged_shard(folder, tmp_path):
  out = str(tmp_path / "resume")
  config = _config_file(tmp_path, folder, out)
  proc = subprocess.Popen(_command(config, 1), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=_env())
  first = layout.marker_path(out, 0)
  deadline = time.monotonic() + 240
  while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = {s for s in range(6) if layout.finished_marker(out, s, _settings_id(out))}
  assert 0 in done and len(done) < 6, done           # killed mid-way
  assert not os.path.exists(os.path.join(out, layout.MANIFEST_FILE))
  kept = {s: os.stat(layout.shard_path(out, s)).st_mtime_ns for s in done}

  lines = []
  c = prep_config(folder, out)
  manifest = prepare_from_config(c, videos_per_shard=1, echo=lines.append, progress=False)
  assert any(f"{len(done)} already done, {6 - len(done)} to make" in l for l in lines), lines
  assert {s: os.stat(layout.shard_path(out, s)).st_mtime_ns for s in done} == kept
  assert manifest["totals"]["clips"] == 7 and manifest["totals"]["skipped"] == 3

  with open(layout.shard_path(out, 0), "r+b") as f:      # damage a finished shard
    f.truncate(os.path.getsize(layout.shard_path(out, 0)) // 2)
  lines = []
  manifest2 = prepare_from_config(c, videos_per_shard=1, echo=lines.append, progress=False)
  assert any("5 already done, 1 to make" in l for l in lines), lines
  assert manifest2["shards"] == [dict(m, seconds=m2["seconds"]) for m, m2 in
                                 zip(manifest["shards"], manifest2["shards"])]
  src = PreparedSource(out, verify=True)
  clips = sorted((src.record(i)["video"], src.record(i)["start_frame"]) for i in range(len(src)))
  assert clips == sorted((v, k * FPC) for v, n in GOOD.items() for k in range(n))


def _settings_id(out):
  with open(os.path.join(out, layout.SETTINGS_FILE)) as f:
    return layout.settings_hash(json.load(f))
