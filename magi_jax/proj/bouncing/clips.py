"""A folder of bouncing-shapes clips in the `video_folder` layout (mp4 files + captions.json with
per-chunk captions): footage to rehearse the real-video recipe on (docs/finetune.md) without
downloading any.

    python -m magi_jax.proj.bouncing.clips --out=clips --num=8 --size=32 --frames=16 \\
        --frames_per_chunk=8

writes clips/clip_000.mp4 ... and clips/captions.json, each entry
{"caption": <the episode's caption>, "chunk_captions": [<one per chunk>]}. Episodes are
`world.simulate(cfg, seed)` for seeds --seed, --seed + 1, ...: the same flags write the same
frames.
"""

from __future__ import annotations

import json
import os

from magi_jax.proj.bouncing.world import WorldConfig, simulate


def write_clips(out: str, *, num: int, size: int, frames: int, frames_per_chunk: int,
                seed: int = 0, fps: int = 24) -> list[str]:
  """Writes `num` episodes as mp4 + captions.json into `out`; returns the file names."""
  from magi_jax.media.write import write_video
  radius = max(size / 10, 2.0)
  cfg = WorldConfig(height=size, width=size, num_frames=frames,
                    frames_per_chunk=frames_per_chunk, min_radius=radius,
                    max_radius=radius * 1.4, max_speed=max(1.5, size / 24))
  os.makedirs(out, exist_ok=True)
  captions, names = {}, []
  for k in range(num):
    ep = simulate(cfg, seed + k)
    name = f"clip_{k:03d}.mp4"
    write_video(os.path.join(out, name), ep.frames, fps=fps)
    captions[name] = {"caption": ep.caption, "chunk_captions": list(ep.chunk_captions)}
    names.append(name)
  with open(os.path.join(out, "captions.json"), "w", encoding="utf-8") as f:
    json.dump(captions, f, indent=1)
  return names


def main(argv=None):
  from absl import app, flags
  flags.DEFINE_string("out", None, "folder to write (created)", required=True)
  flags.DEFINE_integer("num", 8, "clips", lower_bound=1)
  flags.DEFINE_integer("size", 32, "frame height and width (a multiple of 16)", lower_bound=16)
  flags.DEFINE_integer("frames", 16, "frames per clip", lower_bound=1)
  flags.DEFINE_integer("frames_per_chunk", 8, "frames per caption chunk", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "first episode seed", lower_bound=0)
  FLAGS = flags.FLAGS

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.size % 16 or FLAGS.frames % FLAGS.frames_per_chunk:
      raise app.UsageError("--size must be a multiple of 16 and --frames a multiple of "
                           "--frames_per_chunk")
    names = write_clips(FLAGS.out, num=FLAGS.num, size=FLAGS.size, frames=FLAGS.frames,
                        frames_per_chunk=FLAGS.frames_per_chunk, seed=FLAGS.seed)
    print(f"wrote {len(names)} clips and captions.json to {FLAGS.out}")

  from magi_jax import cli
  cli.run(run)


if __name__ == "__main__":
  main()
