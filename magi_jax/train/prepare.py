"""A training config's video folder -> a prepared directory of latents and T5 rows
(`python -m experiments.prepare`), and the checks that a config may train on one.

The same config file describes both jobs: `experiments.prepare` reads `data.video_dir`, the
clip settings (`data.height` / `width` / `clip_frames` / `stride` / `frames_per_chunk`), the VAE
(`vae.*`) and T5 (`text.t5_path`, `text.max_length`), and writes `data.prepared_dir`; training
with `--config.data.kind=prepared` then reads it and never loads the VAE or T5.

Every process of a multi-host job runs `prepare_from_config`: it makes its own shards on its own
devices (`magi_jax.data.prepared.job`), all processes meet at a barrier, and process 0 checks
every shard and writes the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax

from magi_jax.configs import ConfigError
from magi_jax.data.prepared import layout
from magi_jax.data.prepared.job import PrepareSpec, ShardPlan, plan_shards, prepare_shards
from magi_jax.data.prepared.layout import PrepareError


def _need(c, field: str, value):
  if not value:
    raise ConfigError(f"experiments.prepare needs config.{field}")
  return value


def encoder_identity(c, vae, text_encoder) -> dict:
  """What names the encoders in the prepared directory's settings (and the trainer's checks):
  the VAE's kind / path / precision / weights fingerprint and its latent grid, T5's path /
  fingerprint / row width."""
  from magi_jax.text.encoder import directory_fingerprint
  path = c.vae.path if c.vae.kind != "random_tiny" else ""
  vcfg = vae.cfg
  return {
      "vae": {"kind": c.vae.kind, "path": path, "precision": c.vae.precision,
              "seed": int(c.seed) if c.vae.kind == "random_tiny" else None,
              "fingerprint": directory_fingerprint(path) if path else "",
              "channels": int(vcfg.z_chans),
              "dtype": jax.numpy.dtype(vae.precision.compute_dtype).name,
              "time_compression": int(vcfg.patch_length),
              "space_compression": int(vcfg.patch_size)},
      "t5": {"path": c.text.t5_path, "fingerprint": text_encoder.model_id,
             "dim": int(text_encoder.t5.cfg.d_model), "clean": bool(text_encoder.clean)},
  }


def spec_from_config(c, out: str, *, videos_per_shard: int, identity: dict,
                     tfds_dir: str = "") -> PrepareSpec:
  d = c.data
  folder = "" if tfds_dir else _need(c, "data.video_dir", d.video_dir)
  return PrepareSpec(folder=folder, tfds_dir=tfds_dir, out=out, height=d.height,
                     width=d.width, clip_frames=d.clip_frames, frames_per_chunk=d.frames_per_chunk,
                     stride=d.stride, videos_per_shard=videos_per_shard,
                     max_length=c.text.max_length,
                     buckets=tuple(tuple(int(v) for v in b) for b in d.get("buckets", ())),
                     val_fraction=float(d.get("val_fraction", 0.0)), identity=identity)


def prepare_from_config(c, out: str = "", *, videos_per_shard: int = 8,
                        chunks_per_device: int = 2, tfds_dir: str = "",
                        echo: Callable[[str], None] = print,
                        progress: bool = True) -> dict | None:
  """Runs this process's part of the preparation; returns the manifest on process 0 (None on
  the others). out: the directory (default `data.prepared_dir`); tfds_dir: a built
  `video_folder` TFDS dataset (its version directory) to encode instead of data.video_dir
  (its clips; videos_per_shard then counts clips)."""
  out = out or _need(c, "data.prepared_dir (or --out)", c.data.prepared_dir)
  if c.vae.kind == "none":
    raise ConfigError("experiments.prepare encodes latents: config.vae.kind is 'none' (pixel "
                      "space); set vae.kind / vae.path to the VAE the run trains with")
  _need(c, "text.t5_path", c.text.t5_path)
  if tfds_dir:
    if not os.path.isdir(tfds_dir):
      raise ConfigError(f"--tfds_dir={tfds_dir!r} is not a directory (a built video_folder "
                        "dataset's version directory, e.g. <data_dir>/video_folder/custom_*/1.0.0)")
  elif not os.path.isdir(_need(c, "data.video_dir", c.data.video_dir)):
    raise ConfigError(f"config.data.video_dir={c.data.video_dir!r} is not a directory (a folder "
                      "of mp4 files and captions.json)")
  if isinstance(videos_per_shard, bool) or videos_per_shard < 1:
    raise ConfigError(f"videos_per_shard must be >= 1, got {videos_per_shard}")
  from magi_jax.official.t5 import load_text_encoder
  from magi_jax.train.build import frozen_vae
  vae = frozen_vae(c)
  text = load_text_encoder(c.text.t5_path, max_length=c.text.max_length)
  spec = spec_from_config(c, out, videos_per_shard=videos_per_shard,
                          identity=encoder_identity(c, vae, text), tfds_dir=tfds_dir)
  pi, pc = jax.process_index(), jax.process_count()
  plan = plan_shards(spec)
  mine = prepare_shards(spec, vae, text, process_index=pi, process_count=pc,
                        chunks_per_device=chunks_per_device, plan=plan, echo=echo,
                        progress=progress)
  if pc > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("magi_jax prepare: shards written")
  if pi != 0:
    return None
  return finish(spec, plan, mine, echo)


def finish(spec: PrepareSpec, plan: ShardPlan, checked=(),
           echo: Callable[[str], None] = print) -> dict:
  """Process 0: every shard's marker checked, the manifest written. `checked`: markers this
  process has just verified or written (`prepare_shards`), whose files are not read again."""
  known = {m["shard"]: m for m in checked}
  markers, missing = [], []
  for s in range(len(plan.shards)):
    m = known.get(s) or layout.finished_marker(spec.out, s, plan.settings_id)
    (markers.append(m) if m is not None else missing.append(s))
  if missing:
    raise PrepareError(f"{spec.out}: shard(s) {missing[:8]} of {len(plan.shards)} are missing "
                       "or damaged (a process did not finish); run the same command again")
  stray = plan.stray
  manifest = layout.write_manifest(spec.out, plan.settings, markers, unmatched_captions=stray)
  t = manifest["totals"]
  echo(f"prepared {spec.out}: {t['clips']} clips ({t['chunks']} chunks) from {t['videos']} "
       f"videos in {t['shards']} shard(s), {t['bytes'] / 2**20:.1f} MiB; skipped "
       f"{t['skipped']} video(s)" + (f"; {len(stray)} caption(s) name no file" if stray else ""))
  for name, g in sorted(manifest["groups"].items()):
    echo(f"  {name}: {g['clips']} clips, {g['chunks']} chunks")
  for v in manifest["skipped"]:
    echo(f"  skipped {v['video']}: {v['reason']}")
  return manifest


def check_prepared(c, manifest: dict, where: str) -> None:
  """The config trains on this prepared directory: the same clips, VAE grid and T5 rows."""
  s = manifest["settings"]
  vid, vae, t5 = s["video"], s["vae"], s["t5"]
  d = c.data
  problems = []
  for field in ("height", "width", "clip_frames", "frames_per_chunk"):
    if getattr(d, field) != vid[field]:
      problems.append(f"data.{field} is {getattr(d, field)}, the data's is {vid[field]}")
  cw = vid["frames_per_chunk"] // vae["time_compression"]
  if c.objective.chunk_width != cw:
    problems.append(f"objective.chunk_width is {c.objective.chunk_width}, the data's latent "
                    f"chunks are {cw} frames")
  if c.text.kind != "precomputed":
    problems.append(f"text.kind is {c.text.kind!r}; prepared data carries T5 rows "
                    "(text.kind='precomputed')")
  if c.text.max_length != s["text"]["max_length"]:
    problems.append(f"text.max_length is {c.text.max_length}, the data's rows are "
                    f"{s['text']['max_length']}")
  from magi_jax.train.build import model_config
  mcfg = model_config(c)
  if mcfg.in_channels != vae["channels"]:
    problems.append(f"the DiT takes {mcfg.in_channels} latent channels, the data's VAE makes "
                    f"{vae['channels']}")
  if mcfg.caption_channels != t5["dim"]:
    problems.append(f"the DiT takes caption rows of width {mcfg.caption_channels}, the data's "
                    f"T5 rows are {t5['dim']} wide")
  if c.vae.kind != vae["kind"]:
    problems.append(f"vae.kind is {c.vae.kind!r}, the data was encoded by a {vae['kind']!r} VAE")
  if problems:
    raise ConfigError(f"{where} does not fit this config: " + "; ".join(problems))
