"""Compile time of one sampler step for a TPU chip: the DiT's layers unrolled vs scanned.

The DiT's stacked layers (magi_jax/models/stack.py) run as a scan (`VideoDiT.scan_layers =
True`, the default: XLA compiles one layer body) or unrolled over the same weights (`False`).
Both programs are built in one process for the same abstract inputs (ShapeDtypeStructs on a
one-chip mesh) and compiled ahead of time by libtpu's compiler for `--topology` on this host (no
TPU needed, nothing is allocated). `--program`: 'step' (default) is the sampler's jitted guided
step (`make_step(model).compiled`, static ranges); 'forward' is `jit_forward(model).compiled`.

  python benchmarks/compile_time.py                           # 4.5B_distill, 480x832, v5p chip
                                                              # (~4 min on a 2-core CPU)
  python benchmarks/compile_time.py --program=forward --modes=scanned   # jit_forward only

Output: per mode, seconds to trace + lower and to compile (wall, and the process's CPU seconds
over all threads), and XLA's memory analysis of the executable (arguments, temporaries, peak),
then the unrolled / scanned ratios.

Setup details, measured figures and their discussion: benchmarks/results/compile_time.md.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "4.5B_distill", "magi_jax.configs preset")
flags.DEFINE_integer("height", 480, "video height in pixels (latent = height / 8)")
flags.DEFINE_integer("width", 832, "video width in pixels (latent = width / 8)")
flags.DEFINE_integer("chunks", 1, "denoised chunks in the step's call")
flags.DEFINE_integer("cache_chunks", 3, "chunks in the KV cache the call reads")
flags.DEFINE_enum("program", "step", ["step", "forward"], "step: the sampler's jitted step "
                  "(make_step, static self-attention ranges); forward: jit_forward (traced "
                  "ranges)")
flags.DEFINE_enum("cfg", "1", ["1", "3"], "guidance passes of the step (cfg_number)")
flags.DEFINE_bool("refresh", False, "the call's first chunk is a clean refresh chunk whose K/V "
                  "the step returns (step: one of --chunks; forward: return_kv)")
flags.DEFINE_string("topology", "v5p:1x1x1", "TPU topology name (one chip is used)")
flags.DEFINE_string("backend", "auto", "attention backend")
flags.DEFINE_list("modes", ["unrolled", "scanned"], "layer modes, in compile order; the first "
                  "is the baseline of the ratios")

GIB = 2 ** 30


def call_geometry(cfg):
  """(chunk width, latent h, latent w, tokens per chunk) of the flags' video."""
  m, chunk_width = cfg.model, cfg.runtime.chunk_width
  h, w = FLAGS.height // 8, FLAGS.width // 8
  tokens_per_chunk = (chunk_width // m.t_patch_size) * (h // m.patch_size) * (w // m.patch_size)
  return chunk_width, h, w, tokens_per_chunk


def abstract_inputs(cfg, mesh):
  """Replicated ShapeDtypeStructs of the call: x, per-chunk rows, the KV cache, scalars."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from magi_jax.models import KVCache, Precision

  m = cfg.model
  rep = NamedSharding(mesh, P())
  a = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  chunk_width, h, w, tokens_per_chunk = call_geometry(cfg)
  n, L, Cc = FLAGS.chunks, m.caption_max_length, m.caption_channels
  cache = None
  if FLAGS.cache_chunks:
    shape = (m.num_layers, 1, FLAGS.cache_chunks * tokens_per_chunk, m.num_query_groups, m.head_dim)
    dtype = Precision.bf16().compute_dtype
    cache = KVCache(a(shape, dtype), a(shape, dtype))
  return dict(a=a, x=a((1, m.latent_channels, n * chunk_width, h, w)), y=a((n, L, Cc)),
              mask=a((n, L)),
              kv_range=a((n, 2), jnp.int32), slice_point=a((), jnp.int32), cache=cache,
              step_size=a(()) if cfg.engine.distill else None)


def lower_program(model, cfg, mesh):
  """The flags' program for `model`, lowered inside `use_mesh` (nothing runs eagerly)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from magi_jax.official.forward import jit_forward
  from magi_jax.parallel.rules import use_mesh
  from magi_jax.diffusion.step import StepInputs, StepOptions, make_step

  rep = NamedSharding(mesh, P())
  i = abstract_inputs(cfg, mesh)
  a, n = i["a"], FLAGS.chunks
  chunk_width, _, _, tokens_per_chunk = call_geometry(cfg)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                       nnx.state(model))
  with use_mesh(mesh):
    if FLAGS.program == "forward":
      fn = jit_forward(model, backend=FLAGS.backend, return_kv=FLAGS.refresh).compiled
      return fn.lower(state, i["x"], a((1, n)), i["y"], i["mask"], i["kv_range"],
                      a((1,), jnp.bool_), i["slice_point"], i["step_size"], i["cache"], chunk_width)
    # The sampler step: chunk j (after the cached chunks) sees [cache; itself and earlier].
    c = FLAGS.cache_chunks
    local = tuple((0, (c + j + 1) * tokens_per_chunk) for j in range(n))
    fn = make_step(model, backend=FLAGS.backend).compiled
    d = n - int(FLAGS.refresh)
    inputs = StepInputs(x=i["x"], t=a((n,)), dt=a((d,)), y_cond=i["y"], m_cond=i["mask"],
                        y_null=a((1,) + i["y"].shape[1:]), m_null=a((1,) + i["mask"].shape[1:]),
                        ranges=i["kv_range"], first_chunk=i["slice_point"], cache=i["cache"],
                        scale_prev=a((d,)), scale_text=a((d,)), blend=a(()),
                        step_size=i["step_size"])
    options = StepOptions(cfg_number=int(FLAGS.cfg), refresh=FLAGS.refresh, ranges=local)
    return fn.lower(state, inputs, options=options)


def compile_program(model, cfg, mesh):
  """(trace + lower s, compile s, compile CPU s, compiled) of the flags' program.

  CPU seconds are this process's, all threads: less sensitive than wall time to other work on
  a shared host."""
  from magi_jax.parallel.rules import use_mesh

  t0 = time.perf_counter()
  lowered = lower_program(model, cfg, mesh)
  t1, c1 = time.perf_counter(), time.process_time()
  with use_mesh(mesh):
    compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  return t1 - t0, t2 - t1, c2 - c1, compiled


def main(_):
  import jax
  from flax import nnx
  from jax.experimental import topologies

  from magi_jax.configs import get_preset
  from magi_jax.models import Precision, VideoDiT

  if FLAGS.program == "forward" and FLAGS.cfg != "1":
    raise app.UsageError("--program=forward is one DiT call (cfg 1); --cfg=3 needs the step")
  cfg = get_preset(FLAGS.preset)
  topo = topologies.get_topology_desc(topology_name=FLAGS.topology, platform="tpu",
                                      chips_per_host_bounds=(1, 1, 1))
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=topo.devices[:1])
  tokens_per_chunk = call_geometry(cfg)[3]
  print(f"== {FLAGS.program} compile time: {FLAGS.preset} ({cfg.model.num_layers} layers), "
        f"{FLAGS.chunks} chunk(s) of {FLAGS.height}x{FLAGS.width} ({tokens_per_chunk} tokens "
        "each), "
        f"{FLAGS.cache_chunks}-chunk KV cache, cfg {FLAGS.cfg}, refresh {FLAGS.refresh}, "
        f"backend {FLAGS.backend}, bf16 weights, one {topo.devices[0].device_kind} chip "
        f"({FLAGS.topology}) ==")
  rows = {}
  for mode in FLAGS.modes:
    if mode not in ("unrolled", "scanned"):
      raise app.UsageError(f"--modes: unrolled | scanned, got {mode!r}")
    model = nnx.eval_shape(lambda: VideoDiT(cfg.model, precision=Precision.bf16(),
                                            distill=cfg.engine.distill, rngs=nnx.Rngs(0)))
    model.scan_layers = mode == "scanned"
    lower_s, compile_s, cpu_s, compiled = compile_program(model, cfg, mesh)
    ma = compiled.memory_analysis()
    rows[mode] = dict(lower=lower_s, compile=compile_s, total=lower_s + compile_s, cpu=cpu_s,
                      args=ma.argument_size_in_bytes / GIB, temp=ma.temp_size_in_bytes / GIB,
                      peak=ma.peak_memory_in_bytes / GIB)
    print(f"  ({mode} done: {lower_s + compile_s:.1f} s)", flush=True)
  print(f"\n  {'mode':<10} {'lower s':>8} {'compile s':>10} {'total s':>8} "
        f"{'compile CPU s':>14} {'args GiB':>9} {'temp GiB':>9} {'peak GiB':>9}")
  for mode, r in rows.items():
    print(f"  {mode:<10} {r['lower']:>8.1f} {r['compile']:>10.1f} {r['total']:>8.1f} "
          f"{r['cpu']:>14.1f} {r['args']:>9.2f} {r['temp']:>9.2f} {r['peak']:>9.2f}")
  if len(rows) > 1:
    base, *others = FLAGS.modes
    for mode in others:
      b, o = rows[base], rows[mode]
      print(f"  {base} / {mode}: lower {b['lower'] / o['lower']:.1f}x, compile "
            f"{b['compile'] / o['compile']:.1f}x, total {b['total'] / o['total']:.1f}x, compile "
            f"CPU {b['cpu'] / o['cpu']:.1f}x; peak memory {b['peak'] / o['peak']:.2f}x")


if __name__ == "__main__":
  app.run(main)
