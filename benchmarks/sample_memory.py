"""Sampler memory and speed vs video length (issue: "peak memory ... for videos of 2, 4, 8, 16
and 32 chunks on the tiny config; the figure must stay flat (within 10%) as length grows. Also
seconds per chunk").

The tiny preset (2 layers, random weights, fp32, CPU) samples a T2V video of N chunks at a
--latent_hw square latent; every N runs in a fresh subprocess (its own ru_maxrss), after a
warm-up video, loading the step executables from a cache a throw-away child fills first.

  python benchmarks/sample_memory.py                         # 2, 4, 8, 16, 32 chunks (~1 min)
  python benchmarks/sample_memory.py --chunks=2,128 --latent_hw=32

Columns: calls (step calls of the measured video), variants (distinct step functions),
XLA peak/step (memory_analysis() argument + output + temp bytes, max over the variants the
video called), KV max (largest KVCacheStore.nbytes()), peak RSS (the child's ru_maxrss),
sampling peak (VmHWM over the measured video alone), growth (VmRSS after the last chunk -
before the first), s/chunk (median time between chunks; the first and compiling ones left out).

Setup details, full column definitions, expected figures: benchmarks/results/sample_memory.md.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from child_process import (MiB, current_mib, emit, peak_mib, reset_hwm, run_child,  # noqa: E402
                           status_mib, use_compile_cache)

FLAGS = flags.FLAGS
flags.DEFINE_list("chunks", ["2", "4", "8", "16", "32"], "video lengths in chunks")
flags.DEFINE_integer("latent_hw", 16, "latent height = width")
flags.DEFINE_integer("num_steps", 0, "sampler steps (0: the tiny preset's 6; must be a multiple "
                     "of the window, 2)")
flags.DEFINE_string("backend", "blockwise", "attention backend of the step functions")
flags.DEFINE_integer("warmup_chunks", 4, "children first sample a video this long, so every "
                     "step variant is compiled before the measured run (0: no warm-up)")
flags.DEFINE_string("cache_dir", "", "persistent compilation cache shared by the children "
                    "(default: a temp dir primed by a throw-away child; 'none': compile in every "
                    "child)")
flags.DEFINE_bool("malloc_trim", True, "children return freed heap to the OS (glibc malloc_trim) "
                  "after the warm-up, so the compiler's free lists do not set the baseline")
flags.DEFINE_float("limit", 1.10, "flatness limit on max/min peak RSS")
flags.DEFINE_integer("child", 0, "internal: sample this many chunks and print one JSON line")

CAPTION_VALID = 13


def _random_model(seed=0):
  """The tiny VideoDiT with random weights (what the tiny sampling preset uses)."""
  from flax import nnx
  from magi_jax.configs import tiny_config
  from magi_jax.convert.load import random_module
  from magi_jax.models import Precision, VideoDiT
  return random_module(lambda: VideoDiT(tiny_config().model, precision=Precision.fp32(),
                                        rngs=nnx.Rngs(seed)), seed)


def _text_rows(model_cfg, n):
  import numpy as np
  r = np.random.default_rng(0)
  L, D = model_cfg.caption_max_length, model_cfg.caption_channels
  emb = r.standard_normal((1, L, D)).astype(np.float32)
  mask = (np.arange(L) < CAPTION_VALID).astype(np.float32)[None]
  null = r.standard_normal((L, D)).astype(np.float32)
  from magi_jax.text import ChunkTextRows, TextFlags
  return ChunkTextRows(emb, mask, null, infer_chunk_num=n, flags=TextFlags.none())


def child(n):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  from magi_jax.configs import tiny_config
  from magi_jax.models.kv_cache import KVCacheStore
  from magi_jax.diffusion import Sampler, SamplerOptions
  from magi_jax.diffusion import sampler as sampler_module

  use_compile_cache(FLAGS.cache_dir)
  cfg = tiny_config()
  if FLAGS.num_steps:
    cfg = cfg.replace(runtime={"num_steps": FLAGS.num_steps})
  model = _random_model()
  sampler = Sampler(model, cfg, options=SamplerOptions(backend=FLAGS.backend))

  kv_max = [0]

  class _MeasuredStore(KVCacheStore):                 # the sampler's store, with a high-water mark
    def write(self, slice_point, new):
      super().write(slice_point, new)
      kv_max[0] = max(kv_max[0], self.nbytes())

  sampler_module.KVCacheStore = _MeasuredStore

  step, variants, calls = sampler._step, {}, [0]

  def spec(a):
    return None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)

  def recording_step(inputs, options):                # shapes of every (static, shape) signature
    calls[0] += 1
    arrays = jax.tree_util.tree_map(spec, inputs)
    sig = (options, str(jax.tree_util.tree_structure(arrays)),
           tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(arrays)))
    variants.setdefault(sig, (arrays, options))
    return step(inputs, options)

  recording_step.compiled = step.compiled
  recording_step.variants = step.variants
  sampler._step = recording_step

  hw = FLAGS.latent_hw
  if FLAGS.warmup_chunks:                             # compiles every step variant up front
    for ch in sampler.sample(_text_rows(model.cfg, FLAGS.warmup_chunks), latent_hw=(hw, hw),
                             num_chunks=FLAGS.warmup_chunks, key=jax.random.key(1)):
      ch.latent.block_until_ready()
    del ch
  warm_compilations = sampler.compilations()
  if FLAGS.malloc_trim:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  variants.clear()
  calls[0] = kv_max[0] = 0
  text = _text_rows(model.cfg, n)
  peak_before = peak_mib()                           # compilation high-water mark
  base_rss = current_mib()
  hwm_reset = reset_hwm()
  checksum, per_chunk, rss_trace, emitted = 0.0, [], [], 0
  comp = warm_compilations
  t0 = last = time.perf_counter()
  for ch in sampler.sample(text, latent_hw=(hw, hw), num_chunks=n, key=jax.random.key(0)):
    checksum += float(jnp.sum(ch.latent))             # blocks on the chunk
    now, c = time.perf_counter(), sampler.compilations()
    if emitted >= 1 and c == comp:                    # the first chunk also fills the window
      per_chunk.append(now - last)
    comp, last, emitted = c, now, emitted + 1
    rss_trace.append(round(current_mib(), 1))
    del ch
  total = time.perf_counter() - t0
  peak = max(peak_before, peak_mib())
  sample_peak = status_mib("VmHWM") if hwm_reset else float("nan")

  # XLA memory analysis of every step variant called, from the recorded shapes (no arrays kept).
  _, state = __import__("flax").nnx.split(model)
  per_variant = []
  for arrays, options in variants.values():
    ma = step.compiled.lower(state, arrays, options=options).compile().memory_analysis()
    per_variant.append(dict(
        chunks=int(arrays.x.shape[2] // cfg.runtime.chunk_width), refresh=options.refresh,
        nearly_clean=options.nearly_clean,
        cached_tokens=0 if arrays.cache is None else int(arrays.cache.k.shape[2]),
        arg=ma.argument_size_in_bytes, out=ma.output_size_in_bytes, temp=ma.temp_size_in_bytes,
        total=ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes))
  res = dict(n=n, emitted=emitted, calls=calls[0], compilations=sampler.compilations(),
             variants=per_variant, xla_peak=max(v["total"] for v in per_variant),
             warm_compilations=warm_compilations, kv_max=kv_max[0], base_rss=base_rss,
             peak_rss=peak, sample_peak_rss=sample_peak, rss_trace=rss_trace,
             s_per_chunk=statistics.median(per_chunk) if per_chunk else float("nan"),
             timed_chunks=len(per_chunk), total_s=total, checksum=checksum)
  emit(res)


def _run_child(n, cache_dir):
  names = ("latent_hw", "num_steps", "backend", "warmup_chunks", "malloc_trim")
  return run_child(__file__, n, {k: FLAGS[k].value for k in names}, cache_dir)


def _variant_key(v):
  return (v["chunks"], v["refresh"], v["nearly_clean"], v["cached_tokens"])


def main(argv):
  del argv
  if FLAGS.child:
    child(FLAGS.child)
    return
  ns = sorted(int(n) for n in FLAGS.chunks)
  t0 = time.perf_counter()
  cache = FLAGS.cache_dir or tempfile.mkdtemp(prefix="sample_mem_jaxcache_")
  rows = []
  try:
    if cache != "none":
      _run_child(max(ns), cache)                    # primes the compilation cache
    for n in ns:
      r = _run_child(n, cache)
      rows.append(r)
      print(f"  {n} chunks: {r['calls']} step calls, {r['total_s']:.1f} s", file=sys.stderr,
            flush=True)
  finally:
    if not FLAGS.cache_dir:
      shutil.rmtree(cache, ignore_errors=True)
  hw = FLAGS.latent_hw
  tokens_per_chunk = 2 * (hw // 2) ** 2
  steps = FLAGS.num_steps or 6
  print(f"\n== tiny preset, fp32, {steps} steps, window 2, {hw}x{hw} latent "
        f"({tokens_per_chunk} tokens per chunk), {FLAGS.backend} attention, T2V from a PRNG "
        "key ==")
  b = rows[0]
  print(f"{'chunks':>6} {'calls':>5} {'variants':>8} {'XLA peak/step MiB':>17} {'KV max KiB':>10} "
        f"{'peak RSS MiB':>12} {'RSS vs ' + str(b['n']):>9} {'sampling peak MiB':>17} "
        f"{'growth MiB':>10} {'s/chunk':>8}")
  for r in rows:
    tr = r["rss_trace"]
    print(f"{r['n']:>6} {r['calls']:>5} {r['compilations']:>8} {r['xla_peak'] / MiB:>17.3f} "
          f"{r['kv_max'] / 1024:>10.1f} {r['peak_rss']:>12.1f} "
          f"{r['peak_rss'] / b['peak_rss']:>8.3f}x "
          f"{r['sample_peak_rss']:>17.1f} {tr[-1] - r['base_rss']:>10.1f} {r['s_per_chunk']:>8.3f}")
  print("variants: step functions in the child (warm-up included); XLA peak/step: argument + "
        "output + temp bytes\nof the largest step variant the measured run called (model weights "
        "included); peak RSS: ru_maxrss of the\nchild (start-up, warm-up, loading included); "
        "sampling peak: VmHWM over the measured run alone;\ngrowth: VmRSS after the last chunk - "
        "before the first; s/chunk: median, the first chunk and compiling\nchunks left out.")
  longest = rows[-1]
  print(f"\nstep variants of the {longest['n']}-chunk run (XLA memory_analysis, MiB):")
  print(f"{'chunks':>6} {'refresh':>7} {'cached tok':>10} {'args':>7} {'out':>7} {'temp':>7} "
        f"{'total':>7}")
  for v in sorted(longest["variants"], key=_variant_key):
    print(f"{v['chunks']:>6} {str(v['refresh']):>7} {v['cached_tokens']:>10} "
          f"{v['arg'] / MiB:>7.3f} "
          f"{v['out'] / MiB:>7.3f} {v['temp'] / MiB:>7.3f} {v['total'] / MiB:>7.3f}")
  fresh = [r for r in rows if r["compilations"] != r["warm_compilations"]]
  if fresh:
    print("note: step functions compiled during the measured run of "
          + ", ".join(f"{r['n']} chunks" for r in fresh) + " (raise --warmup_chunks)")

  peaks = [r["peak_rss"] for r in rows]
  ratio = max(peaks) / min(peaks)
  sample_peaks = [r["sample_peak_rss"] for r in rows]
  sratio = max(sample_peaks) / min(sample_peaks)
  xla = {r["n"]: r["xla_peak"] for r in rows}
  same = len(set(xla.values())) == 1
  shared = {}
  for r in rows:
    for v in r["variants"]:
      shared.setdefault(_variant_key(v), set()).add(v["total"])
  shared_same = all(len(s) == 1 for s in shared.values())
  note = ""
  if not same:
    top = max(xla.values())
    low = [f"{n} chunks ({(top - x) / MiB:.3f} MiB lower)" for n, x in xla.items() if x != top]
    note = (f" ({', '.join(low)}: fewer variants; every variant shared by two lengths has "
            f"identical memory: {'yes' if shared_same else 'no'})")
  print(f"\nflat: max/min peak RSS = {ratio:.2f} (limit {FLAGS.limit:.2f}), XLA step peak "
        f"identical for all lengths: {'yes' if same else 'no'}{note}")
  print(f"sampling-phase peak (VmHWM) max/min = {sratio:.2f}; KV cache max identical for all "
        f"lengths: {'yes' if len({r['kv_max'] for r in rows}) == 1 else 'no'}")
  print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
