"""Tiled VAE decode memory vs frame count (issue: "Memory of a tiled decode must not grow with
frame count beyond one temporal tile plus the output").

The tiny fixture VAE (fp32, CPU) decodes random latents (1, 16, T, 32, 32) -> pixels (1, 3,
4T, 256, 256) with spatial and temporal tiles, each (mode, T) in a fresh subprocess.

  python benchmarks/vae_tiled_memory.py                      # both modes, T = 3,6,12,24,48
                                                             # (~1-2 min on 2 cores)
  python benchmarks/vae_tiled_memory.py --modes=streaming    # just the streaming writer

Modes:
  tiled      out = tiled_decode(vae, z, tc), the whole clip at once, as the library returns it.
             Columns: XLA memory_analysis() of the per-tile decode, jitted for every tile shape
             tiled_decode really called (it calls vae.decode eagerly, tile by tile), max over
             shapes; peak RSS; growth over the T=3 child; growth / float32 output growth.
  streaming  decode --chunk_latents (3 = one temporal tile) latents at a time with
             tiled_decode, to_uint8, append to a magi_jax.media.VideoWriter mp4: only one chunk
             of output is ever in memory.

Setup details, expected and measured figures: benchmarks/results/vae_tiled_memory.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from child_process import MiB, current_mib, emit, peak_mib, run_child, use_compile_cache  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("T", ["3", "6", "12", "24", "48"], "latent frame counts")
flags.DEFINE_list("modes", ["tiled", "streaming"], "tiled and/or streaming")
flags.DEFINE_integer("latent_hw", 32, "latent height = width (pixels are 8x)")
flags.DEFINE_integer("tile_px", 128, "TileConfig tile_sample_min_height/width (pixels)")
flags.DEFINE_integer("tile_frames", 12, "TileConfig tile_sample_min_length (frames)")
flags.DEFINE_integer("chunk_latents", 3, "streaming: latents decoded per chunk")
flags.DEFINE_string("preset", "ultrafast", "x264 preset of the streaming mp4 (speed only)")
flags.DEFINE_float("mmap_threshold_mib", 4, "children: glibc mallopt(M_MMAP_THRESHOLD); "
                   "0 keeps glibc's sliding default")
flags.DEFINE_string("cache_dir", "", "persistent compilation cache (default: a temp dir)")
flags.DEFINE_string("child", "", "internal: 'mode:T' runs one measurement and prints JSON")

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


class _Recording:
  """Passes for the VAE inside tiled_decode and records every tile shape it decodes."""

  def __init__(self, vae):
    self.cfg, self._vae, self.shapes = vae.cfg, vae, set()

  def decode(self, z):
    self.shapes.add(tuple(z.shape))
    return self._vae.decode(z)


def _per_tile_analysis(vae, shapes):
  """XLA memory_analysis of the jitted per-tile decode for each shape; maxima over shapes."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  graphdef, state = nnx.split(vae)
  fn = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z))
  temp = out = arg = 0
  for s in sorted(shapes):
    ma = fn.lower(state, jax.ShapeDtypeStruct(s, jnp.float32)).compile().memory_analysis()
    temp = max(temp, ma.temp_size_in_bytes)
    out = max(out, ma.output_size_in_bytes)
    arg = max(arg, ma.argument_size_in_bytes)     # the tile + the decoder weights it reads
  return dict(tile_temp=temp / MiB, tile_out=out / MiB, tile_args=arg / MiB)


def _set_mmap_threshold(mib):
  """Buffers from `mib` up are mmapped and unmapped when freed, so RSS follows live buffers."""
  if mib > 0:
    import ctypes
    ctypes.CDLL("libc.so.6").mallopt(-3, int(mib * MiB))     # -3: M_MMAP_THRESHOLD


def child(mode, T):
  _set_mmap_threshold(FLAGS.mmap_threshold_mib)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  from magi_jax.official.vae import load_official_vae
  from magi_jax.media import VideoWriter, to_uint8
  from magi_jax.models.vae import load_vae_config
  from magi_jax.models.vae_tiling import TileConfig, tiled_decode

  use_compile_cache(FLAGS.cache_dir)
  vae = load_official_vae(os.path.join(FIXTURES, "vae_weights.safetensors"),
                          load_vae_config(os.path.join(FIXTURES, "vae_config.json")))
  tc = TileConfig(FLAGS.tile_px, FLAGS.tile_px, FLAGS.tile_frames, 0.25, 0.0, True)
  hw, tl = FLAGS.latent_hw, FLAGS.tile_frames // vae.cfg.patch_length
  rng = np.random.default_rng(0)
  warm = rng.normal(size=(1, vae.cfg.z_chans, tl, hw, hw)).astype(np.float32)
  jax.block_until_ready(tiled_decode(vae, warm, tc))
  del warm
  z = rng.normal(size=(1, vae.cfg.z_chans, T, hw, hw)).astype(np.float32)
  base_cur, base_peak = current_mib(), peak_mib()
  rec = _Recording(vae)
  t0 = time.perf_counter()
  if mode == "tiled":
    out = tiled_decode(rec, z, tc)
    jax.block_until_ready(out)
    frames, H, W = out.shape[2:]
  else:
    path = os.path.join(tempfile.mkdtemp(prefix="vae_mem_"), "clip.mp4")
    H = W = hw * vae.cfg.patch_size
    frames = 0
    try:
      with VideoWriter(path, H, W, fps=24, preset=FLAGS.preset) as w:
        for s in range(0, T, FLAGS.chunk_latents):
          x = np.asarray(tiled_decode(rec, z[:, :, s:s + FLAGS.chunk_latents], tc))
          w.append(to_uint8(x[0]).transpose(1, 2, 3, 0))
          frames += x.shape[2]
          del x
    finally:
      shutil.rmtree(os.path.dirname(path), ignore_errors=True)
  sec = time.perf_counter() - t0
  peak = peak_mib()
  res = dict(mode=mode, T=T, frames=int(frames), H=int(H), W=int(W), seconds=sec,
             base_cur=base_cur, base_peak=base_peak, peak=peak, tile_shapes=len(rec.shapes),
             out_f32=frames * H * W * 3 * 4 / MiB, out_u8=frames * H * W * 3 / MiB)
  if mode == "tiled":
    res.update(_per_tile_analysis(vae, rec.shapes))
  emit(res)


def _run_child(spec, cache_dir):
  names = ("latent_hw", "tile_px", "tile_frames", "chunk_latents", "preset", "mmap_threshold_mib")
  return run_child(__file__, spec, {k: FLAGS[k].value for k in names}, cache_dir)


def _table(mode, rows):
  b = rows[0]
  print(f"\n== {mode}: latents (1,16,T,{FLAGS.latent_hw},{FLAGS.latent_hw}) -> "
        f"{b['H']}x{b['W']} px, tiles {FLAGS.tile_px}px x {FLAGS.tile_frames} frames"
        + (f", {FLAGS.chunk_latents}-latent chunks -> mp4" if mode == "streaming" else "")
        + f"; {b['tile_shapes']} tile shapes ==")
  tile_cols = mode == "tiled"
  head = (f"{'T':>3} {'frames':>6} {'out f32 MiB':>11} {'out u8 MiB':>10} "
          + (f"{'tile temp MiB':>13} {'tile out MiB':>12} " if tile_cols else "")
          + f"{'pre RSS MiB':>11} {'peak RSS MiB':>12} {'RSS-T3 MiB':>10} {'ratio':>6} {'sec':>6}")
  print(head)
  for r in rows:
    growth = r["peak"] - b["peak"]
    d_out = r["out_f32"] - b["out_f32"]
    ratio = f"{growth / d_out:6.2f}" if d_out > 0 else f"{'-':>6}"
    print(f"{r['T']:>3} {r['frames']:>6} {r['out_f32']:>11.1f} {r['out_u8']:>10.1f} "
          + (f"{r['tile_temp']:>13.2f} {r['tile_out']:>12.2f} " if tile_cols else "")
          + f"{r['base_cur']:>11.1f} {r['peak']:>12.1f} {growth:>10.1f} {ratio} "
          f"{r['seconds']:>6.1f}")
  if tile_cols:
    print(f"(tile temp / out: XLA memory_analysis of the jitted vae.decode for each tile shape "
          f"tiled_decode called, max over shapes; arguments, tile + decoder weights: "
          f"{b['tile_args']:.2f} MiB)")
  print("ratio = (peak RSS - T=3 peak RSS) / (float32 output - T=3 float32 output)")


def main(argv):
  del argv
  if FLAGS.child:
    mode, T = FLAGS.child.split(":")
    child(mode, int(T))
    return
  Ts = sorted(int(t) for t in FLAGS.T)
  cache = FLAGS.cache_dir or tempfile.mkdtemp(prefix="vae_mem_jaxcache_")
  t0 = time.perf_counter()
  try:
    _run_child(f"{FLAGS.modes[0]}:{Ts[0]}", cache)        # primes the compilation cache
    for mode in FLAGS.modes:
      _table(mode, [_run_child(f"{mode}:{T}", cache) for T in Ts])
  finally:
    if not FLAGS.cache_dir:
      shutil.rmtree(cache, ignore_errors=True)
  print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
