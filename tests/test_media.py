"""magi_jax.media: frame arithmetic (the official video_generate.py arithmetic), ffmpeg reading /
writing round trips on clips the tests make themselves, and the error messages."""

import os
import subprocess

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from magi_jax.media import (MediaError, VideoWriter, decoded_frames, plan_frames,
                            prefix_latent_frames_for_video, read_image, read_video, to_uint8,
                            validate_num_frames, validate_size, write_video)
from magi_jax.media.read import container_kind
from magi_jax.media.write import gif_delays_ms


def colour(i):
  return (i * 20 % 256, 255 - i * 20 % 256, 100)


def flat_frames(n, h=48, w=64, offset=0):
  """Frame i is one flat colour (distinguishable after a lossy codec)."""
  return np.stack([np.full((h, w, 3), colour(i + offset), np.uint8) for i in range(n)])


def moving_squares(n, h=48, w=64):
  """Grey background, a red square moving right and a green one moving down."""
  out = np.full((n, h, w, 3), 128, np.uint8)
  for i in range(n):
    out[i, 4:14, 2 + 3 * i:12 + 3 * i] = (255, 0, 0)
    out[i, 2 + 2 * i:12 + 2 * i, w - 14:w - 4] = (0, 255, 0)
  return out


# --------------------------------------------------------------------------- frame arithmetic

@pytest.mark.parametrize("prefix,clean,infer,t_lat,out", [
    (0, 0, 4, 24, 96),      # T2V
    (1, 0, 5, 30, 120),     # I2V
    (8, 1, 6, 36, 109),     # V2V, 32-frame prefix
])
def test_spec_table(prefix, clean, infer, t_lat, out):
  p = plan_frames(96, prefix)
  assert (p.latent_frames, p.clean_chunk_num, p.infer_chunk_num) == (24, clean, infer)
  assert p.total_latent_frames == t_lat
  assert p.output_frames == out == sum(p.chunk_output_frames)


def test_emitted_ranges():
  assert plan_frames(96, 0).emitted_latent_ranges == ((0, 6), (6, 12), (12, 18), (18, 24))
  i2v = plan_frames(96, 1)
  assert i2v.emitted_latent_ranges[0] == (0, 6)          # the image slot is emitted too
  assert i2v.emitted_latent_ranges[1:] == ((6, 12), (12, 18), (18, 24), (24, 30))
  v2v = plan_frames(96, 8)
  assert v2v.emitted_chunks == (1, 2, 3, 4, 5)
  assert v2v.emitted_latent_ranges[0] == (8, 12)
  assert v2v.chunk_output_frames == (13, 24, 24, 24, 24)  # 4 latents -> tiles 3 + 1 -> 12 + 1
  t2v72 = plan_frames(72, 0)
  assert (t2v72.infer_chunk_num, t2v72.output_frames) == (3, 72)


def test_decoded_frames_tile_rule():
  assert [decoded_frames(n) for n in range(1, 8)] == [1, 8, 12, 13, 20, 24, 25]


def test_prefix_latents():
  assert prefix_latent_frames_for_video(32) == 8     # 12/12/8 -> 3+3+2
  assert prefix_latent_frames_for_video(48) == 12    # 4 x 12
  assert prefix_latent_frames_for_video(25) == 7     # 12/12/1 -> 3+3+1
  assert prefix_latent_frames_for_video(1) == 1
  assert plan_frames(96, prefix_latent_frames_for_video(48)).output_frames == 96


@pytest.mark.parametrize("n", [2, 3, 14, 26, 27])
def test_prefix_short_trailing_tile(n):
  with pytest.raises(MediaError, match="2 or 3 frames gives no latent"):
    prefix_latent_frames_for_video(n)


def test_validators():
  validate_size(720, 1280)
  validate_num_frames(96)
  with pytest.raises(MediaError, match="height 270 is not divisible by 16"):
    validate_size(270, 480)
  with pytest.raises(MediaError, match="width 100 is not divisible by 16"):
    validate_size(96, 100)
  with pytest.raises(MediaError, match="positive"):
    validate_size(0, 64)
  for bad in (30, 97, 95):
    with pytest.raises(MediaError, match="use a multiple of 4"):
      validate_num_frames(bad)
  with pytest.raises(MediaError, match="positive multiple of 4"):
    validate_num_frames(0)
  with pytest.raises(MediaError, match="multiple of 4"):
    plan_frames(97, 0)
  with pytest.raises(MediaError, match="prefix_latent_frames"):
    plan_frames(96, -1)


def test_to_uint8():
  x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(to_uint8(x), [0, 0, 127, 254, 255, 255])   # truncation


# --------------------------------------------------------------------------- writing + reading

def test_mp4_streaming_roundtrip(tmp_path):
  path = tmp_path / "clip.mp4"
  frames = flat_frames(24)
  with VideoWriter(path, 48, 64, fps=24) as w:
    for k in range(3):
      w.append(frames[8 * k:8 * k + 8])
    assert w.num_frames == 24
  back = read_video(path, 48, 64, max_frames=None)
  assert back.shape == (24, 48, 64, 3) and back.dtype == np.uint8
  err = np.abs(back.astype(np.int16) - frames).mean(axis=(1, 2, 3))
  assert err.max() < 8, err
  gen = imageio_ffmpeg.read_frames(str(path))
  meta = next(gen)
  gen.close()
  assert meta["codec"] == "h264"
  assert meta["pix_fmt"].startswith("yuv420p")
  assert meta["fps"] == 24 and meta["size"] == (64, 48)


def test_mp4_moving_squares_and_max_frames(tmp_path):
  path = tmp_path / "squares.mp4"
  frames = moving_squares(12)
  write_video(path, frames)
  full = read_video(path, 48, 64, max_frames=None)
  assert full.shape[0] == 12
  assert np.abs(full.astype(np.int16) - frames).mean() < 8
  first = read_video(path, 48, 64, max_frames=5)           # the FIRST frames are kept
  np.testing.assert_array_equal(first, full[:5])
  assert read_video(path, 48, 64).shape[0] == 12           # default 32 > available


def test_read_video_resamples_fps(tmp_path):
  path = tmp_path / "slow.mp4"
  write_video(path, flat_frames(12), fps=12)                # 1 s at 12 fps
  v = read_video(path, 48, 64, fps=24, max_frames=None)
  assert v.shape == (24, 48, 64, 3)                         # ffmpeg 9: every frame twice
  src = [int(round(f[..., 0].astype(np.float32).mean() / 20)) for f in v]
  assert src == [i // 2 for i in range(24)]
  assert read_video(path, 48, 64, fps=24, max_frames=3).shape[0] == 3


def test_exception_in_with_block_keeps_playable_prefix(tmp_path):
  path = tmp_path / "partial.mp4"
  with pytest.raises(RuntimeError, match="boom"):
    with VideoWriter(path, 48, 64) as w:
      w.append(flat_frames(8))
      raise RuntimeError("boom")
  assert read_video(path, 48, 64, max_frames=None).shape[0] == 8


def test_gif_roundtrip(tmp_path):
  path = tmp_path / "anim.gif"
  frames = moving_squares(10, 32, 48)
  with VideoWriter(path, 32, 48, fps=24) as w:
    w.append(frames[:4])
    w.append(frames[4:])
  back = iio.imread(path)
  assert back.shape[:3] == (10, 32, 48)
  assert np.abs(back[..., :3].astype(np.int16) - frames).mean() < 8
  with Image.open(path) as im:
    assert im.n_frames == 10 and im.info["loop"] == 0
  assert sum(gif_delays_ms(24, 24)) == 1000
  assert set(gif_delays_ms(24, 24)) == {40, 50}


def test_read_image_policies(tmp_path):
  path = tmp_path / "halves.png"
  img = np.zeros((30, 40, 3), np.uint8)
  img[:, :20] = (255, 0, 0)
  img[:, 20:] = (0, 0, 255)
  Image.fromarray(img).save(path)
  fit = read_image(path, 32, 64)                            # stretch, aspect ignored
  assert fit.shape == (1, 32, 64, 3) and fit.dtype == np.uint8
  assert (fit[0, :, :28] == (255, 0, 0)).all()
  assert (fit[0, :, 36:] == (0, 0, 255)).all()
  pad = read_image(path, 64, 64, policy="pad")              # 64x48 inside, black bars
  assert (pad[0, :6] == 0).all() and (pad[0, -6:] == 0).all()
  assert (pad[0, 12:52, :24] == (255, 0, 0)).all()
  crop = read_image(path, 32, 32, policy="crop")
  assert crop.shape == (1, 32, 32, 3)
  assert (crop[0, :, :10] == (255, 0, 0)).all() and (crop[0, :, -10:] == (0, 0, 255)).all()


# --------------------------------------------------------------------------- errors

def test_read_errors(tmp_path):
  missing = tmp_path / "missing.png"
  with pytest.raises(MediaError, match="missing.png: no such file"):
    read_image(missing, 32, 32)
  with pytest.raises(MediaError, match="nowhere.mp4: no such file"):
    read_video(tmp_path / "nowhere.mp4", 32, 32)
  rng = np.random.default_rng(0)
  for name, fn, what in (("cat.png", read_image, "an image"), ("junk.mp4", read_video, "a video")):
    bad = tmp_path / name
    bad.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match=rf"{name}: cannot be decoded as {what} \(ffmpeg: .+\)"):
      fn(bad, 32, 32)
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  with pytest.raises(MediaError, match="empty.mp4: file is empty"):
    read_video(empty, 32, 32)


def test_an_image_is_not_a_video_and_a_video_is_not_an_image(tmp_path):
  png = tmp_path / "still.png"
  Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(png)
  jpg = tmp_path / "still.jpg"
  Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(jpg)
  for path, name in ((png, "PNG"), (jpg, "JPEG")):
    with pytest.raises(MediaError, match=rf"{path.name}: is an image \({name}\), not a video: "
                                         r"a V2V prefix needs a video .*--config.mode=i2v"):
      read_video(path, 48, 64)
  mp4 = tmp_path / "clip.mp4"
  write_video(mp4, flat_frames(4))
  assert container_kind(mp4) == ("video", "MP4/MOV")
  with pytest.raises(MediaError, match=r"clip.mp4: is a video \(MP4/MOV\), not an image: I2V "
                                       r"starts from one image .*--config.mode=v2v"):
    read_image(mp4, 48, 64)
  assert read_image(png, 48, 64).shape == (1, 48, 64, 3)      # each still reads as itself
  assert read_video(mp4, 48, 64).shape[0] == 4


def test_zero_frame_video(tmp_path):
  path = tmp_path / "prefix.mp4"           # a valid mp4 with no frames, made by ffmpeg itself
  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "rawvideo",
                  "-pix_fmt", "rgb24", "-s", "64x48", "-r", "24", "-i", "-", "-vcodec", "libx264",
                  "-pix_fmt", "yuv420p", str(path)], stdin=subprocess.DEVNULL, check=True)
  with pytest.raises(MediaError, match="prefix.mp4: video has 0 frames"):
    read_video(path, 48, 64)


def test_read_argument_errors(tmp_path):
  path = tmp_path / "ok.mp4"
  write_video(path, flat_frames(4))
  with pytest.raises(MediaError, match="height 100 is not divisible by 16"):
    read_video(path, 100, 100)
  with pytest.raises(MediaError, match="max_frames 0"):
    read_video(path, 48, 64, max_frames=0)
  with pytest.raises(MediaError, match="aspect policy 'zoom'"):
    png = tmp_path / "x.png"
    Image.fromarray(flat_frames(1)[0]).save(png)
    read_image(png, 48, 64, policy="zoom")


def test_write_errors(tmp_path):
  frames = flat_frames(4)
  with pytest.raises(MediaError, match="a.mp4: frames must be uint8"):
    write_video(tmp_path / "a.mp4", frames.astype(np.float32))
  with pytest.raises(MediaError, match="3 channels"):
    write_video(tmp_path / "a.mp4", frames[..., :2])
  with pytest.raises(MediaError, match="odd.mp4: width 63 is odd"):
    write_video(tmp_path / "odd.mp4", np.zeros((2, 48, 63, 3), np.uint8))
  with pytest.raises(MediaError, match="out.avi: unknown video extension '.avi'"):
    write_video(tmp_path / "out.avi", frames)
  with pytest.raises(MediaError, match="no such directory"):
    write_video(tmp_path / "nope" / "a.mp4", frames)
  with pytest.raises(MediaError, match="frames are 64x48 but the video is 32x32"):
    with VideoWriter(tmp_path / "b.mp4", 32, 32) as w:
      w.append(frames)
  with pytest.raises(MediaError, match="c.gif: no frames were appended"):
    with VideoWriter(tmp_path / "c.gif", 32, 32):
      pass
  assert not os.path.exists(tmp_path / "c.gif")
