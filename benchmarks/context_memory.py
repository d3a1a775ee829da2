"""Ring attention's per-device memory at 64K-4M tokens of context on a TPU slice, and its FLOPs.

The context-parallel issue asks whether per-device attention memory falls as 1/N with the
context-parallel size N, and what block skipping saves in ring attention. (Whether the whole
24B train step fits at 4M tokens is the capacity planner's question: `python -m magi_jax.aot
--job=train --preset=24B_base --tokens=4194304 --topology=v5p:8x8x4 --mesh=context:128,fsdp:2`
compiles the project's own train step.) Nothing here allocates an array: every figure comes
from compiling ahead of time for abstract inputs (`jax.jit(f, out_shardings=...).lower(
*ShapeDtypeStructs with NamedShardings).compile()`) and reading the executable's
`memory_analysis()` (bytes per device) or `cost_analysis()` (FLOPs per device).

  python benchmarks/context_memory.py                  # both parts: 64K..4M x N = 8..256 x
                                                       # 2 layouts (~15 min), FLOPs (~20 s)
  python benchmarks/context_memory.py --parts=attention --contexts=4M --layouts=zigzag  # ~3 min
  python benchmarks/context_memory.py --quick          # smoke run: v5e:2x2, 8K, N = 2, 4 (~1 min)
  python benchmarks/context_memory.py --parts=flops    # only the FLOP accounting (~20 s)

Attention memory (`--parts=attention`, needs libtpu: pip install -e ".[aot]"): ring attention
alone at one 24B_base layer's shape, forward + backward in one program (jax.vjp): q (B, S, 48,
128), k/v (B, S, 8, 128) bf16 and dout in, dq/dk/dv out, block-causal chunk masks (chunk c sees
chunks 0..c), `--block` tiles. It is compiled by the TPU compiler (libtpu) for the devices of
`--topology` (default v5p:8x8x4, 256 chips; `jax.experimental.topologies`, as the planner gets
them: magi_jax/aot/topology.py), in this process, inside `use_mesh(mesh, rules)`. Mesh: context
N x fsdp = devices / N (data, tensor 1); the batch is one video per fsdp rank (B = fsdp, sharded
over fsdp), its S tokens split over 'context' (S / N tokens per device). The figure is the
compiler's `peak_memory_in_bytes` (its live maximum, arguments included; args + out - alias +
temp where it reports none); a program it refuses for memory prints as "no" with the figure of
its message (magi_jax/aot/compile.py's `is_out_of_memory` / `refusal_message`).

Ring layouts (`--layouts`, one table each): 'zigzag' is what the 'ring' backend's 'auto' picks
when the chunk count is a multiple of 2N (always here); 'contiguous' keeps each device's own
slice. Chunks: MAGI-24B's 720p chunk (6 latent frames x 45 x 80 = 21,600 tokens) does not cut
2^k-token contexts into 2N chunk groups, so a chunk is `--chunk_tokens` = 8192 tokens (2 latent
frames of 64 x 64 tokens, a 1024 x 1024 video): 4M tokens = 512 chunks = 2 x 256. Where a
context holds fewer than 2N such chunks, chunks shrink to S / 2N tokens. Memory depends on the
tokens per device, not on the chunk size.

Measured (libtpu 0.0.42.1 via jax 0.10.2, v5p:8x8x4 = 256 devices of 95.74 GiB; the full default
grid, 48 compiles of 6-50 s each, ~15 min on a busy 2-core CPU host; peak GiB per device, ratio
vs N = 8):

  layout zigzag
  context        N=8         N=16         N=32         N=64        N=128        N=256
      64K  1.26 1.000x 0.637 0.505x 0.355 0.281x 0.176 0.140x 0.069 0.054x 0.031 0.025x
     256K  4.75 1.000x  2.43 0.511x  1.26 0.265x 0.637 0.134x 0.355 0.075x 0.176 0.037x
       1M 18.68 1.000x  9.40 0.503x  4.75 0.254x  2.43 0.130x  1.26 0.067x 0.637 0.034x
       4M 74.42 1.000x 37.26 0.501x 18.68 0.251x  9.40 0.126x  4.75 0.064x  2.43 0.033x
  layout contiguous
      64K  1.19 1.000x 0.619 0.520x 0.360 0.302x 0.230 0.193x 0.123 0.104x 0.043 0.036x
     256K  4.76 1.000x  2.38 0.500x  1.19 0.250x 0.619 0.130x 0.360 0.076x 0.230 0.048x
       1M 19.05 1.000x  9.52 0.500x  4.76 0.250x  2.38 0.125x  1.19 0.063x 0.619 0.032x
       4M 76.19 1.000x 38.09 0.500x 19.05 0.250x  9.52 0.125x  4.76 0.063x  2.38 0.031x
    ideal       1.000x       0.500x       0.250x       0.125x       0.062x       0.031x

  Every program fits. Per-device memory falls as 1/N and depends only on the tokens per
  device: ~149 KiB per token (4M at N = 8, 512K tokens per device: 74.4 GiB; 32K tokens per
  device: 4.75 GiB at 256K / 8, 1M / 32 and 4M / 128). At 4M tokens and N = 128 (the planner's
  context:128 x fsdp:2 mesh) one layer's ring attention needs 4.75 GiB (args 0.88, temp 6.15).
  From 8K tokens per device up, zig-zag and contiguous agree within 6% (4M, N = 8: zig-zag 2%
  lower). At 2,048 tokens per device or fewer (64K at N >= 32, 256K at N >= 128) the chunks
  shrink (1,024 tokens or fewer) and per-device buffers that do not scale with the slice show:
  the ratios stray from 1/N both ways (64K zig-zag: 0.140x at N = 64, 0.054x at N = 128).
  The compiler's temp figure exceeds its peak (4M, N = 8: args 14.0 + temp 100.8 GiB against a
  peak of 74.4): the temporaries figure sums the temporary allocation, which the live maximum
  need not fill; the compiler accepted that program under 95.74 GiB, so the peak is what it
  checks against HBM.

  Near the HBM limit the compiler works to fit (rematerialisation, rescheduling), so figures
  there are not the unconstrained ones: on v5e:2x2 (15.75 GiB), contiguous, 256K tokens at
  N = 2 plan 15.11 GiB (v5p: 19.05 at the same 128K tokens per device) and 1M tokens are
  refused ("no 54.47" at N = 2: its message counts HLO temporaries only).

FLOP accounting (`--parts=flops`): ring attention over 8 chunks of `--flop_chunk_tokens` (512)
tokens on a context=4 mesh of 4 fake CPU devices (`--xla_force_host_platform_device_count`,
set before JAX starts), zig-zag, compiled by XLA:CPU with `unroll=True` (XLA's cost analysis
counts a while-loop body once; unrolled, every ring step and tile is counted; of a cond it
counts the larger branch, here exactly one branch's pairs since both compute as many).
skip=True is the balanced ring with block skipping; skip=False computes every (query group,
key group) pair: the same attention without skipping. Forward and backward are compiled apart
(the backward alone from the VJP's residuals) and as one program:

  pass                       skip GFLOP no-skip GFLOP skip / no-skip
  forward                        59.135       104.980        0.5633x
  backward                      146.373       259.871        0.5633x
  forward + backward            205.508       364.851        0.5633x
  fwd+bwd as one program        205.470       364.795        0.5632x
  device_work(8, 4, 'zigzag'): visible chunk pairs per device [9, 9, 9, 9], max/min 1.00
  device_work(8, 4, 'contiguous'): visible chunk pairs per device [3, 7, 11, 15], max/min 5.00

Target: at most 0.6x; block-causal attention over 8 chunks sees 36 of 64 chunk pairs (0.5625).

Limitations: one layer's attention alone (no projections, MLP, weights or optimizer state: the
planner compiles those). Collectives are planned, never run; the runtime's own reservations
are not included.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("contexts", ["64K", "256K", "1M", "4M"], "context lengths in tokens "
                  "(K = 1024, M = 1024^2)")
flags.DEFINE_list("cp_sizes", ["8", "16", "32", "64", "128", "256"], "context-parallel sizes N")
flags.DEFINE_string("topology", "v5p:8x8x4", "TPU slice to compile for (libtpu's name, as "
                    "python -m magi_jax.aot takes it); mesh context N x fsdp devices/N")
flags.DEFINE_integer("chunk_tokens", 8192, "tokens per chunk (fewer where a context holds "
                     "fewer than 2N chunks)")
flags.DEFINE_list("layouts", ["zigzag", "contiguous"], "ring attention layouts of the memory "
                  "tables (one table each): zigzag (what the model's 'auto' picks), contiguous")
flags.DEFINE_integer("block", 512, "ring attention query/key tile (block_q = block_k)")
flags.DEFINE_list("parts", ["attention", "flops"], "attention and/or flops")
flags.DEFINE_integer("flop_chunk_tokens", 512, "tokens per chunk of the FLOP accounting")
flags.DEFINE_bool("quick", False, "smoke run: v5e:2x2, 8K tokens, N = 2, 4, zigzag; FLOPs at "
                  "128 tokens per chunk")
flags.DEFINE_string("json_out", "", "also write every figure to this JSON file")

GiB = 2 ** 30
PRESET = "24B_base"
FLOP_CHUNKS, FLOP_CONTEXT = 8, 4


def parse_tokens(s: str) -> int:
  m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", s)
  if not m:
    raise ValueError(f"context length {s!r}: use a number with an optional K or M suffix")
  return int(m.group(1)) * {"": 1, "k": 2 ** 10, "m": 2 ** 20}[m.group(2).lower()]


def fmt_tokens(n: int) -> str:
  for div, suffix in ((2 ** 20, "M"), (2 ** 10, "K")):
    if n % div == 0:
      return f"{n // div}{suffix}"
  return str(n)


def chunk_tokens(context: int, n: int, want: int) -> int:
  """Tokens per chunk: `want`, or fewer so that the context holds a multiple of 2N chunks."""
  tok = min(want, context // (2 * n))
  while tok > 0 and (context % tok or (context // tok) % (2 * n)):
    tok -= 1
  if tok <= 0:
    raise ValueError(f"{context} tokens cannot be cut into 2 x {n} chunks")
  return tok


def _start_jax(num_cpu_devices: int):
  """Sets JAX's host device count (the FLOP accounting's fake CPU mesh) and the environment
  for compiling for a TPU topology on this host; call before JAX starts a backend."""
  flag = f"--xla_force_host_platform_device_count={num_cpu_devices}"
  old = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = (old + " " + flag).strip()
  # As python -m magi_jax.aot: no TPU here, and libtpu must not query a metadata server.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  import jax
  if jax.device_count() != num_cpu_devices:
    raise RuntimeError(f"wanted {num_cpu_devices} CPU devices, JAX started with "
                       f"{jax.device_count()} (was JAX started before main?)")
  return jax


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


# ---------------------------------------------------------------------------------------------
# Ring attention at one 24B layer's shape, for abstract inputs.

def attention_program(mesh, *, batch: int, tokens: int, tok: int, block: int, skip=True,
                      layout="zigzag", unroll=False, mode="fwdbwd"):
  """Ring attention at one 24B layer's shape: (jitted function, abstract arguments).

  mode: 'fwd' (q, k, v -> out), 'fwdbwd' (q, k, v, dout -> dq, dk, dv in one program) or
  'bwd' (the backward pass alone: the VJP's residuals and dout -> dq, dk, dv).
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from magi_jax.attention import ChunkMask
  from magi_jax.configs import get_preset
  from magi_jax.attention.ring import ring_attention
  from magi_jax.parallel.rules import fit_spec

  cfg = get_preset(PRESET).model
  B, S, C = batch, tokens, tokens // tok
  hq, hkv, hd = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
  sh = lambda shape: NamedSharding(mesh, fit_spec(P(("data", "fsdp"), "context"), shape, mesh))
  q = jax.ShapeDtypeStruct((B, S, hq, hd), jnp.bfloat16, sharding=sh((B, S, hq, hd)))
  kv = jax.ShapeDtypeStruct((B, S, hkv, hd), jnp.bfloat16, sharding=sh((B, S, hkv, hd)))
  rs = NamedSharding(mesh, fit_spec(P(("data", "fsdp")), (B, C, 2), mesh))
  ranges = jax.ShapeDtypeStruct((B, C, 2), jnp.int32, sharding=rs)

  def attend(q, k, v, ranges):
    return ring_attention(q, k, v, ChunkMask(ranges, q_block=tok), scale=hd ** -0.5, mesh=mesh,
                          layout=layout, skip=skip, block_q=block, block_k=block, unroll=unroll)

  def vjp_of(q, k, v, ranges):
    return jax.vjp(lambda q, k, v: attend(q, k, v, ranges), q, k, v)[1]

  if mode == "fwd":
    return jax.jit(attend, out_shardings=q.sharding), (q, kv, kv, ranges)
  if mode == "fwdbwd":
    return (jax.jit(lambda q, k, v, ranges, do: vjp_of(q, k, v, ranges)(do),
                    out_shardings=(q.sharding, kv.sharding, kv.sharding)),
            (q, kv, kv, ranges, q))
  if mode == "bwd":
    # The VJP closure is a pytree of residual arrays: compile its application alone, so
    # nothing of the forward pass is in the program.
    residuals = jax.eval_shape(vjp_of, q, kv, kv, ranges)
    return (jax.jit(lambda f, do: f(do), out_shardings=(q.sharding, kv.sharding, kv.sharding)),
            (residuals, q))
  raise ValueError(f"mode {mode!r}")


def compile_attention(mesh, **kw):
  """AOT-compiles `attention_program` for the mesh's devices; (compiled, seconds)."""
  jitted, args = attention_program(mesh, **kw)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def measure_attention(mesh, **kw) -> dict:
  """Fwd + bwd of ring attention compiled by the TPU compiler for `mesh`: its per-device
  memory, or its refusal ("no" with the compiler's figure)."""
  from magi_jax.aot.compile import _AVAILABLE, _REQUIRED, _gib, is_out_of_memory, refusal_message
  from magi_jax.parallel.rules import ShardingRules, use_mesh

  jitted, args = attention_program(mesh, **kw)
  t0 = time.perf_counter()
  with use_mesh(mesh, ShardingRules()):       # target_platform() is the topology's: 'tpu'
    lowered = jitted.lower(*args)
    try:
      compiled = lowered.compile()
    except Exception as e:                    # refused for memory: reported; others raised
      if not is_out_of_memory(e):
        raise
      msg = refusal_message(e)
      return dict(fits=False, peak=(_gib(_REQUIRED, msg) or float("nan")) * GiB,
                  hbm=(_gib(_AVAILABLE, msg) or float("nan")) * GiB, error=msg,
                  compile_s=time.perf_counter() - t0)
  ma = compiled.memory_analysis()
  arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
  alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
  peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
  return dict(fits=True, arg=arg, out=out, alias=alias, temp=temp,
              peak=peak or arg + out - alias + temp, peak_reported=bool(peak),
              compile_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Per-device memory on the topology.

def run_attention() -> list[dict]:
  from magi_jax.aot.topology import get_topology
  from magi_jax.parallel.mesh import MeshConfig, make_mesh

  topo = get_topology(FLAGS.topology)
  devices = topo.num_devices
  sizes = [int(c) for c in FLAGS.cp_sizes]
  for n in sizes:
    if n < 1 or devices % n:
      sys.exit(f"context size {n} does not divide the {devices} devices of {topo.name}")
  rows = []
  for n in sizes:
    fsdp = devices // n
    mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, context=n, tensor=1), topo.devices)
    for ctx in (parse_tokens(c) for c in FLAGS.contexts):
      tok = chunk_tokens(ctx, n, FLAGS.chunk_tokens)
      for layout in FLAGS.layouts:
        row = dict(context=ctx, cp=n, fsdp=fsdp, tok=tok, chunks=ctx // tok, batch=fsdp,
                   tokens_per_device=ctx // n, layout=layout)
        row.update(measure_attention(mesh, batch=fsdp, tokens=ctx, tok=tok, block=FLAGS.block,
                                     layout=layout))
        print_case(row)
        rows.append(row)
  print_attention(rows, topo)
  return rows


def print_case(r):
  head = (f"  {r['layout']:<10} {fmt_tokens(r['context']):>4} context={r['cp']:<3} x "
          f"fsdp={r['fsdp']:<3} {r['tok']:>5} tok/chunk {r['tokens_per_device']:>9,} tok/device: ")
  if r["fits"]:
    kind = "peak" if r["peak_reported"] else "args + out - alias + temp"
    body = (f"{kind} {r['peak'] / GiB:.2f} GiB (args {r['arg'] / GiB:.2f}, temp "
            f"{r['temp'] / GiB:.2f})")
  else:
    body = f"refused: {r['error']}"
  print(head + body + f"  [{r['compile_s']:.0f} s]", flush=True)


def _cell(r, base) -> str:
  if r is None:
    return "-"
  ratio = f"{r['peak'] / base:.3f}x" if base and not math.isnan(base) else "-"
  gib = r["peak"] / GiB
  gib = f"{gib:.2f}" if gib >= 1 else f"{gib:.3f}"
  return f"{gib} {ratio}" if r["fits"] else f"no {gib} {ratio}"


def print_attention(rows, topo):
  sizes = sorted({r["cp"] for r in rows})
  for layout in FLAGS.layouts:
    mine = {(r["context"], r["cp"]): r for r in rows if r["layout"] == layout}
    if not mine:
      continue
    print(f"\n== per-device memory, ring attention fwd + bwd (jax.vjp), layout {layout}: one "
          f"{PRESET} layer (q 48 / kv 8 heads x 128, bf16), {topo.name} ({topo.num_devices} "
          f"devices, {topo.chip.usable_gib:g} GiB HBM each), mesh context N x fsdp "
          f"{topo.num_devices}/N, batch = fsdp; TPU compiler peak GiB, ratio vs N={sizes[0]} ==")
    width = 17
    print(f"{'context':>7} " + " ".join(f"{'N=' + str(n):>{width}}" for n in sizes))
    for ctx in sorted({c for c, _ in mine}):
      first = mine.get((ctx, sizes[0]))
      base = first["peak"] if first else None
      print(f"{fmt_tokens(ctx):>7} " + " ".join(f"{_cell(mine.get((ctx, n)), base):>{width}}"
                                                  for n in sizes))
    print(f"{'ideal':>7} " + " ".join(f"{f'{sizes[0] / n:.3f}x':>{width}}" for n in sizes))
  print("GiB: the compiler's peak per device (arguments q, k, v, dout and ranges, outputs dq, dk, "
        "dv, temporaries); 'no': refused\nfor memory, with the compiler's required figure. "
        "Ratio: against the smallest N of the same context and layout.")


# ---------------------------------------------------------------------------------------------
# FLOP accounting (fake CPU devices).

def run_flops() -> dict:
  import jax
  from magi_jax.parallel.mesh import MeshConfig, make_mesh
  from magi_jax.attention.ring import device_work
  t0 = time.perf_counter()
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, context=FLOP_CONTEXT, tensor=1),
                   jax.devices("cpu")[:FLOP_CONTEXT])
  tok = FLAGS.flop_chunk_tokens
  out = dict(chunks=FLOP_CHUNKS, context=FLOP_CONTEXT, tok=tok, flops={}, compile_s={})
  for mode in ("fwd", "bwd", "fwdbwd"):
    for skip in (True, False):
      compiled, sec = compile_attention(mesh, batch=1, tokens=FLOP_CHUNKS * tok, tok=tok,
                                        block=tok, skip=skip, unroll=True, mode=mode)
      key = f"{mode}_{'skip' if skip else 'noskip'}"
      out["flops"][key], out["compile_s"][key] = _flops(compiled), sec
  for layout in ("zigzag", "contiguous"):
    out[f"work_{layout}"] = device_work(FLOP_CHUNKS, FLOP_CONTEXT, layout).tolist()
  print(f"  flops: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  print_flops(out)
  return out


def print_flops(r):
  n, c, tok, f = r["context"], r["chunks"], r["tok"], r["flops"]
  visible = c * (c + 1) // 2
  print(f"\n== FLOPs: ring attention, {c} chunks x {tok} tokens over context={n} (zig-zag), "
        f"24B heads (48 q / 8 kv x 128), unrolled; XLA cost analysis per device ==")
  print(f"{'pass':<26} {'skip GFLOP':>10} {'no-skip GFLOP':>13} {'skip / no-skip':>14}")
  rows = [("forward", f["fwd_skip"], f["fwd_noskip"]),
          ("backward", f["bwd_skip"], f["bwd_noskip"]),
          ("forward + backward", f["fwd_skip"] + f["bwd_skip"],
           f["fwd_noskip"] + f["bwd_noskip"]),
          ("fwd+bwd as one program", f["fwdbwd_skip"], f["fwdbwd_noskip"])]
  for label, a, b in rows:
    print(f"{label:<26} {a / 1e9:>10.3f} {b / 1e9:>13.3f} {a / b:>13.4f}x")
  print(f"block-causal attention over {c} chunks sees {visible}/{c * c} chunk pairs = "
        f"{visible / c / c:.4f}; target: at most 0.6x.")
  for layout in ("zigzag", "contiguous"):
    w = r[f"work_{layout}"]
    print(f"device_work({c}, {n}, '{layout}'): visible chunk pairs per device {w}, "
          f"max/min {max(w) / min(w):.2f}")


def main(argv):
  del argv
  if FLAGS.quick:
    FLAGS.topology, FLAGS.contexts, FLAGS.cp_sizes = "v5e:2x2", ["8K"], ["2", "4"]
    FLAGS.layouts, FLAGS.flop_chunk_tokens = ["zigzag"], 128
  unknown = set(FLAGS.parts) - {"attention", "flops"}
  if unknown:
    sys.exit(f"unknown --parts {sorted(unknown)}; use attention, flops")
  _start_jax(FLOP_CONTEXT)
  results = {}
  if "attention" in FLAGS.parts:
    results["attention"] = run_attention()
  if "flops" in FLAGS.parts:
    results["flops"] = run_flops()
  if FLAGS.json_out:
    names = ("contexts", "cp_sizes", "topology", "chunk_tokens", "layouts", "block",
             "flop_chunk_tokens")
    with open(FLAGS.json_out, "w") as f:
      json.dump(dict(flags={k: FLAGS[k].value for k in names}, **results), f, indent=1)


if __name__ == "__main__":
  app.run(main)
