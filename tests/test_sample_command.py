"""`python -m experiments.sample`: every mode end to end with the tiny preset (random weights),
per-chunk prompt files, GIF output, the input errors raised before any model work, and seeds.

Runs in-process through `magi_jax.generate.build_from_config` + `generate`, as the
command does (one subprocess smoke test covers the command line itself). Runs are kept small
(64x64, 2 sampler steps, 2-4 chunks of 2 latent frames). Compilation dominates: the sampler
jits a fresh step function per `generate` call, so the module shares a persistent JAX
compilation cache (also handed to the subprocess) and later runs skip XLA compiles of shapes
already seen.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.configs import tiny
from magi_jax.configs import ConfigError
from magi_jax.generate import RequestError, build_from_config, generate
from magi_jax.media import (plan_frames, prefix_latent_frames_for_video, read_video,
                            write_video)
from magi_jax.media.write import VideoWriter
from magi_jax.text.prompts import PromptScheduleError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK_WIDTH = 2             # the tiny preset's chunk_width (latent frames per chunk)
SIZE = 64                   # the tiny preset's video size
NUM_FRAMES = 16             # 4 latent frames: 2 chunks
NUM_STEPS = 2               # divisible by window_size 2 and len(noise2clean_kvrange) 2


pytestmark = pytest.mark.usefixtures("compile_cache")


def _config(out_dir, name="out.mp4", **overrides):
  c = tiny.get_config()
  c.num_frames = NUM_FRAMES
  c.num_steps = NUM_STEPS
  c.progress = False
  c.output = str(out_dir / name)
  for k, v in overrides.items():
    setattr(c, k, v)              # ConfigDict: a misspelt field or a wrong type raises here
  return c


class _Recorder:
  """Wraps VideoWriter.append to keep the uint8 frames handed to the encoder (per path)."""

  def __init__(self):
    self.frames = {}

  def install(self, mp):
    orig = VideoWriter.append
    rec = self

    def append(writer, frames):
      rec.frames.setdefault(os.fspath(writer.path), []).append(np.array(frames))
      return orig(writer, frames)
    mp.setattr(VideoWriter, "append", append)

  def get(self, path):
    return np.concatenate(self.frames[os.fspath(path)])


def _run(c, components=None, **request_changes):
  """build_from_config(c) (or reuse `components`) + generate; returns (result, request,
  components, frames handed to the writer)."""
  comp, req, flags, opts = build_from_config(c)
  if components is not None:
    comp = components
  if request_changes:
    req = dataclasses.replace(req, **request_changes)
  rec = _Recorder()
  with pytest.MonkeyPatch.context() as mp:
    rec.install(mp)
    res = generate(comp, req, flags=flags, options=opts, progress=False)
  return res, req, comp, rec.get(req.output)


def _check_mp4(path, expected_frames, size=SIZE):
  import imageio_ffmpeg
  gen = imageio_ffmpeg.read_frames(str(path))
  meta = next(gen)
  gen.close()
  assert meta["size"] == (size, size)
  assert meta["fps"] == 24
  video = read_video(str(path), size, size, max_frames=None)
  assert video.dtype == np.uint8
  assert video.shape == (expected_frames, size, size, 3)
  return video


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
  out = tmp_path_factory.mktemp("t2v")
  res, req, comp, frames = _run(_config(out, "t2v.mp4"))
  return res, req, comp, frames


# ---------------------------------------------------------------------------- modes

def test_t2v_mp4(t2v):
  res, req, _, frames = t2v
  expected = plan_frames(NUM_FRAMES, 0, CHUNK_WIDTH).output_frames
  assert expected == NUM_FRAMES
  assert (res.frames, res.chunks) == (expected, NUM_FRAMES // 4 // CHUNK_WIDTH)
  assert frames.shape == (expected, SIZE, SIZE, 3) and frames.dtype == np.uint8
  _check_mp4(res.output, expected)


def test_t2v_random_weights_are_not_a_flat_frame(t2v):
  frames = t2v[3]
  assert frames.astype(np.float32).std() > 8, (
      f"pixel values {frames.min()}..{frames.max()}: the random-weight video is flat")


def test_i2v(tmp_path):
  from PIL import Image
  img = np.zeros((48, 80, 3), np.uint8)       # another size and aspect: stretched to 64x64
  img[..., 0] = np.linspace(0, 255, 80, dtype=np.uint8)[None]
  img[12:36, 20:60, 2] = 255
  Image.fromarray(img).save(tmp_path / "in.png")
  c = _config(tmp_path, "i2v.mp4", mode="i2v", image=str(tmp_path / "in.png"))
  res, _, _, frames = _run(c)
  expected = plan_frames(NUM_FRAMES, 1, CHUNK_WIDTH).output_frames   # the image slot adds frames
  assert expected == 24
  assert res.frames == frames.shape[0] == expected
  _check_mp4(res.output, expected)


def test_v2v(tmp_path):
  n = 12                                      # one 12-frame encode tile -> 3 prefix latents
  yy, xx = np.mgrid[:SIZE, :SIZE]
  clip = np.stack([np.stack([(xx * 4 + 8 * i) % 256, yy * 4 % 256,
                             np.full_like(xx, 96)], axis=-1) for i in range(n)]).astype(np.uint8)
  write_video(tmp_path / "prefix.mp4", clip)
  p = prefix_latent_frames_for_video(n)
  assert p == 3                               # 1 whole clean chunk + a partial one
  c = _config(tmp_path, "v2v.mp4", mode="v2v", video=str(tmp_path / "prefix.mp4"),
              prefix_frames=n)
  res, _, _, frames = _run(c)
  plan = plan_frames(NUM_FRAMES, p, CHUNK_WIDTH)
  assert plan.output_frames == 1 + 8 + 8      # the partial chunk's 1 new latent, then 2 chunks
  assert res.frames == frames.shape[0] == plan.output_frames
  _check_mp4(res.output, plan.output_frames)


def test_prompt_file(tmp_path):
  path = tmp_path / "prompts.json"
  path.write_text(json.dumps([{"prompt": "a red ball rolls in", "start": 0, "end": 1},
                              {"prompt": "the red ball hits the floor", "start": 1, "end": 2}]))
  c = _config(tmp_path, prompt="", prompt_file=str(path))
  res, _, _, _ = _run(c)
  assert res.frames == plan_frames(NUM_FRAMES, 0, CHUNK_WIDTH).output_frames
  _check_mp4(res.output, res.frames)


def test_prompt_file_with_a_gap_names_the_chunk(tmp_path):
  path = tmp_path / "gap.json"
  path.write_text(json.dumps([{"prompt": "a red ball rolls in", "start": 0, "end": 1}]))
  c = _config(tmp_path, prompt="", prompt_file=str(path))
  with pytest.raises(PromptScheduleError, match=r"chunk\(s\) \[1\] have no prompt"):
    build_from_config(c)                       # checked before any weights load
  assert not os.path.exists(c.output)


def test_gif_output(tmp_path, t2v):
  from PIL import Image
  c = _config(tmp_path, "out.gif")
  res, _, _, frames = _run(c, components=t2v[2])
  assert res.frames == frames.shape[0] == NUM_FRAMES
  with Image.open(res.output) as im:
    assert im.format == "GIF" and im.size == (SIZE, SIZE)
    # Pillow merges a frame identical to the previous one, so the file holds at most as many.
    assert 1 <= im.n_frames <= NUM_FRAMES
  if len({f.tobytes() for f in frames}) == NUM_FRAMES:       # all distinct: none merged
    with Image.open(res.output) as im:
      assert im.n_frames == NUM_FRAMES


# ---------------------------------------------------------------------------- seeds

def test_same_seed_same_video_other_seed_differs(tmp_path, t2v):
  _, _, _, first = t2v
  # A fresh build: random weights and noise both come from the seed.
  res, req, comp, again = _run(_config(tmp_path, "again.mp4"))
  np.testing.assert_array_equal(again, first)
  np.testing.assert_array_equal(read_video(res.output, SIZE, SIZE, max_frames=None),
                                read_video(t2v[0].output, SIZE, SIZE, max_frames=None))
  # Same weights, another sampling seed: other noise, other frames.
  _, _, _, other = _run(_config(tmp_path, "other.mp4"), components=comp, seed=req.seed + 1)
  assert other.shape == first.shape
  assert not np.array_equal(other, first)


# ---------------------------------------------------------------------------- input errors

@pytest.fixture
def no_model_work(monkeypatch):
  """Any model construction fails the test: errors must come before it."""
  import magi_jax.convert.load as load

  def refuse(*a, **k):
    raise AssertionError("a model was constructed before the input error was raised")
  for name in ("VideoDiT", "ViTVAE", "T5Encoder"):
    monkeypatch.setattr(load, name, refuse)


ERROR_CASES = {
    "unknown mode": (dict(mode="x2v"), RequestError, r"unknown mode 'x2v'.*t2v, i2v, v2v"),
    "height not /16": (dict(height=72), (ConfigError, RequestError),
                       r"video_size_h.*multiple of 16|height 72 is not divisible by 16"),
    "width not /16": (dict(width=40), (ConfigError, RequestError),
                      r"video_size_w.*multiple of 16|width 40 is not divisible by 16"),
    "num_frames not /4": (dict(num_frames=18), RequestError,
                          r"num_frames 18 is not a multiple of 4"),
    "num_steps vs window": (dict(num_steps=3), ConfigError,
                            r"num_steps \(3\) must be divisible by window_size"),
    "i2v without image": (dict(mode="i2v"), RequestError, r"i2v needs an image.*config\.image"),
    "i2v missing image": (dict(mode="i2v", image="{tmp}/nope.png"), RequestError,
                          r"nope\.png: image not found"),
    "v2v missing video": (dict(mode="v2v", video="{tmp}/nope.mp4"), RequestError,
                          r"nope\.mp4: video not found"),
    "image in t2v": (dict(image="{tmp}/x.png"), RequestError, r"only used by mode i2v"),
    "missing dit_checkpoint": (dict(dit_checkpoint="{tmp}/no_such_dir"), ConfigError,
                               r"config\.dit_checkpoint=.*no_such_dir.* does not exist"),
    "random weights, real preset": (dict(preset="4.5B_base", num_steps=0, height=0, width=0),
                                    ConfigError,
                                    r"dit_checkpoint.*vae_checkpoint.*t5_checkpoint.*tiny preset"),
    "unknown preset": (dict(preset="7B"), ConfigError, r"unknown preset '7B'"),
    "unknown special token flag": (dict(special_token_flags="hq,sparkles"), ConfigError,
                                   r"special_token_flags.*sparkles"),
    "bad output extension": (dict(output="{tmp}/out.avi"), RequestError,
                             r"out\.avi.*\.mp4, \.gif"),
    "missing output directory": (dict(output="{tmp}/no/such/dir/out.mp4"), RequestError,
                                 r"output directory .* does not exist"),
    "no prompt": (dict(prompt=""), RequestError, r"give a prompt"),
    "missing prompt file": (dict(prompt="", prompt_file="{tmp}/p.json"), RequestError,
                            r"p\.json: prompt file not found"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_input_errors_before_model_work(case, tmp_path, no_model_work):
  overrides, exc, pattern = ERROR_CASES[case]
  overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
               for k, v in overrides.items()}
  c = _config(tmp_path, **overrides)
  t0 = time.perf_counter()
  with pytest.raises(exc, match=pattern):
    build_from_config(c)
  assert time.perf_counter() - t0 < 10
  assert not os.path.exists(c.output)


# ---------------------------------------------------------------------------- the command

def test_command_line(tmp_path, t2v, compile_cache):
  out = tmp_path / "cli.mp4"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, "-m", "experiments.sample", "--config=experiments/configs/tiny.py",
         f"--config.output={out}", f"--config.num_frames={NUM_FRAMES}",
         f"--config.num_steps={NUM_STEPS}", "--config.progress=false"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"wrote {out}: {NUM_FRAMES} frames, {SIZE}x{SIZE}, 2 chunks" in proc.stdout
  video = _check_mp4(out, NUM_FRAMES)
  # Same config and seed as the in-process T2V run: the same video.
  np.testing.assert_array_equal(video, read_video(t2v[0].output, SIZE, SIZE, max_frames=None))


def test_command_line_bad_input_is_a_usage_error(tmp_path):
  """A MagiError from build_from_config leaves the command as a usage error (magi_jax/cli.py):
  one line on stderr, exit status 2, no traceback."""
  out = tmp_path / "never.mp4"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.sample", "--config=experiments/configs/tiny.py",
         f"--config.output={out}", "--config.special_token_flags=hq,sparkles"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "--config.special_token_flags: unknown ['sparkles']" in errors[0]
  assert "Traceback" not in proc.stderr
  assert not out.exists()
