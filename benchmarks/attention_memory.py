"""Per-device memory of one MAGI layer's forward + backward, by attention backend, on the TPU
compiler (ahead of time, no TPU needed: `pip install -e ".[aot]"`).

  python benchmarks/attention_memory.py                      # 4.5B layer, 480x832, 4 chunks, v5p
  python benchmarks/attention_memory.py --height=720 --width=1280 --chunks=1 --topology=v6e:1x1

One real `TransformerLayer` (bf16 weights, the official precision policy) on a packed training
row of `--chunks` chunks (block-causal per video, `causal_segments` mask), `jax.grad` with
respect to its parameters and input, compiled for one chip of `--topology`. Backends side by
side, each as a ratio to the first:

  chunk_tiles  the old 'blockwise' geometry: one (heads x chunk x chunk) score tile per
               (query chunk, key chunk) pair, forward differentiated by JAX (no custom VJP)
  flash        the default local backend: hardware-sized tiles, recomputing custom VJP
  splash       the Pallas TPU kernel

A program the compiler refuses is printed with its message ("does not fit").
Measured figures: README.md's Benchmarks section.
"""

from __future__ import annotations

import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "4.5B_base", "model preset whose layer is measured")
flags.DEFINE_integer("height", 480, "video height (pixels)")
flags.DEFINE_integer("width", 832, "video width (pixels)")
flags.DEFINE_integer("chunks", 4, "chunks in the training row (6 latent frames each)")
flags.DEFINE_string("topology", "v5p:1x1x1", "TPU topology; the first chip is used")
flags.DEFINE_list("backends", ["chunk_tiles", "flash", "splash"], "backends to compare")

GIB = 2 ** 30
_UNIT = {"K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 2 ** 10}     # compiler's units -> GiB


def layer_program(m, height, width, chunks, backend, mesh):
  """(jitted grad fn, abstract args) for one layer of model config `m`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  from magi_jax.attention import ChunkMask, caption_ranges
  from magi_jax.models.block import TransformerLayer
  from magi_jax.models.precision import Precision
  from magi_jax.models.rope import default_bands, rope_table

  policy = Precision.bf16()
  layer = nnx.eval_shape(lambda: TransformerLayer(m, policy, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(layer)
  h, w = height // 8 // m.patch_size, width // 8 // m.patch_size
  frames = 6 // m.t_patch_size
  tokens_per_chunk = frames * h * w
  S = chunks * tokens_per_chunk
  ranges = np.stack([np.zeros(chunks), (np.arange(chunks) + 1) * tokens_per_chunk], -1)[None]
  L = m.caption_max_length

  def loss(params, x, cond, feats):
    # Built inside the trace: eager ops would run on the (absent) TPU devices.
    self_mask = ChunkMask(jnp.asarray(ranges, jnp.int32), q_block=tokens_per_chunk,
                          layout="causal_segments")
    xmask = ChunkMask(caption_ranges(jnp.full((chunks,), L // 2)), q_block=tokens_per_chunk,
                      layout="key_prefix")
    sin, cos = rope_table(default_bands(m.rope_head_dim // 8), chunks * frames, h, w)
    lay = nnx.merge(graphdef, params)
    out, _ = lay(x, cond, (sin, cos), self_mask, None, feats, xmask, policy, backend)
    return jnp.sum(out.astype(jnp.float32))

  rep = NamedSharding(mesh, P())
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  args = (jax.tree.map(lambda a: sds(a.shape, a.dtype), params),
          sds((1, S, m.hidden_size), jnp.bfloat16),
          sds((1, chunks, m.cond_hidden_dim), jnp.bfloat16),
          sds((chunks, L, m.hidden_size), jnp.bfloat16))
  return jax.jit(jax.grad(loss, argnums=(0, 1))), args, S


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other compiles may hold libtpu
  import jax
  from jax.experimental import topologies
  from benchmarks import chunk_tiles
  from magi_jax.configs import get_preset
  from magi_jax.parallel.rules import use_mesh

  chunk_tiles.register()
  m = get_preset(FLAGS.preset).model
  single = FLAGS.topology.endswith(("1x1", "1x1x1"))
  kw = dict(chips_per_host_bounds=(1, 1, 1)) if single else {}
  topo = topologies.get_topology_desc(topology_name=FLAGS.topology, platform="tpu", **kw)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=topo.devices[:1])
  rows = []
  for b in FLAGS.backends:
    with use_mesh(mesh):
      fn, args, S = layer_program(m, FLAGS.height, FLAGS.width, FLAGS.chunks, b, mesh)
      t0 = time.perf_counter()
      try:
        mem = fn.lower(*args).compile().memory_analysis()
        rows.append((b, time.perf_counter() - t0, mem.temp_size_in_bytes / GIB,
                     mem.argument_size_in_bytes / GIB, ""))
      except Exception as e:  # the compiler's refusal is the figure
        msg = str(e)
        hit = re.search(r"temporaries \(([\d.]+)([KMGT])\)", msg)
        temp = float(hit.group(1)) * _UNIT[hit.group(2)] if hit else float("nan")
        line = next((x for x in msg.splitlines() if "exceeds" in x), msg.splitlines()[0])
        rows.append((b, time.perf_counter() - t0, temp, float("nan"), line.strip()[:200]))
  print(f"\n== one {FLAGS.preset} layer fwd+bwd, {FLAGS.height}x{FLAGS.width} x {FLAGS.chunks} "
        f"chunks = {S:,} tokens, bf16, one {FLAGS.topology.split(':')[0]} chip ==")
  print(f"{'backend':<12} {'compile s':>9} {'temp GiB':>9} {'args GiB':>9} "
        f"{'vs ' + rows[0][0]:>16}")
  base = rows[0][2]
  for b, sec, temp, args_gib, err in rows:
    ratio = f"{temp / base:.3f}x" if base == base and temp == temp else "-"
    print(f"{b:<12} {sec:9.1f} {temp:9.2f} {args_gib:9.2f} {ratio:>16}"
          + (f"  refused: {err}" if err else ""))


if __name__ == "__main__":
  app.run(main)
