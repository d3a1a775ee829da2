"""Ring attention's per-device memory at 64K-4M tokens of context on a TPU slice, and its FLOPs.

Does per-device attention memory fall as 1/N with the context-parallel size N, and what does
block skipping save? Nothing is allocated: every figure comes from compiling ahead of time for
abstract inputs and reading the executable's `memory_analysis()` or `cost_analysis()`.
`--parts=attention` (needs libtpu: pip install -e ".[aot]"): one 24B_base layer's ring attention,
forward + backward, compiled by libtpu for `--topology` (default v5p:8x8x4) on a mesh context N
x fsdp devices / N, per `--layouts` entry. `--parts=flops`: the same attention over 8 chunks on 4
fake CPU devices, loops unrolled, with and without block skipping.

  python benchmarks/context_memory.py                  # both parts: 64K..4M x N = 8..256 x
                                                       # 2 layouts (~15 min), FLOPs (~20 s)
  python benchmarks/context_memory.py --parts=attention --contexts=4M --layouts=zigzag  # ~3 min
  python benchmarks/context_memory.py --quick          # smoke run: v5e:2x2, 8K, N = 2, 4 (~1 min)
  python benchmarks/context_memory.py --parts=flops    # only the FLOP accounting (~20 s)

Output: per layout, a row per context: the compiler's peak GiB per device and the ratio vs the
first N ("no" and its figure where it refuses for memory); then GFLOP per device per pass with
(skip) and without block skipping, their ratio, and the visible chunk pairs per device.
Setup details, measured tables and their discussion: benchmarks/results/context_memory.md.
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
  tokens_per_chunk = min(want, context // (2 * n))
  while tokens_per_chunk > 0 and (context % tokens_per_chunk
                                  or (context // tokens_per_chunk) % (2 * n)):
    tokens_per_chunk -= 1
  if tokens_per_chunk <= 0:
    raise ValueError(f"{context} tokens cannot be cut into 2 x {n} chunks")
  return tokens_per_chunk


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

def attention_program(mesh, *, batch: int, tokens: int, tokens_per_chunk: int, block: int,
                      skip=True, layout="zigzag", unroll=False, mode="fwdbwd"):
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
  B, S, C = batch, tokens, tokens // tokens_per_chunk
  hq, hkv, hd = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
  sh = lambda shape: NamedSharding(mesh, fit_spec(P(("data", "fsdp"), "context"), shape, mesh))
  q = jax.ShapeDtypeStruct((B, S, hq, hd), jnp.bfloat16, sharding=sh((B, S, hq, hd)))
  kv = jax.ShapeDtypeStruct((B, S, hkv, hd), jnp.bfloat16, sharding=sh((B, S, hkv, hd)))
  rs = NamedSharding(mesh, fit_spec(P(("data", "fsdp")), (B, C, 2), mesh))
  ranges = jax.ShapeDtypeStruct((B, C, 2), jnp.int32, sharding=rs)

  def attend(q, k, v, ranges):
    return ring_attention(q, k, v, ChunkMask(ranges, q_block=tokens_per_chunk), scale=hd ** -0.5,
                          mesh=mesh, layout=layout, skip=skip, block_q=block, block_k=block,
                          unroll=unroll)

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
      tokens_per_chunk = chunk_tokens(ctx, n, FLAGS.chunk_tokens)
      for layout in FLAGS.layouts:
        row = dict(context=ctx, cp=n, fsdp=fsdp, tokens_per_chunk=tokens_per_chunk,
                   chunks=ctx // tokens_per_chunk, batch=fsdp, tokens_per_device=ctx // n,
                   layout=layout)
        row.update(measure_attention(mesh, batch=fsdp, tokens=ctx,
                                     tokens_per_chunk=tokens_per_chunk, block=FLAGS.block,
                                     layout=layout))
        print_case(row)
        rows.append(row)
  print_attention(rows, topo)
  return rows


def print_case(r):
  head = (f"  {r['layout']:<10} {fmt_tokens(r['context']):>4} context={r['cp']:<3} x "
          f"fsdp={r['fsdp']:<3} {r['tokens_per_chunk']:>5} tok/chunk "
          f"{r['tokens_per_device']:>9,} tok/device: ")
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
  tokens_per_chunk = FLAGS.flop_chunk_tokens
  out = dict(chunks=FLOP_CHUNKS, context=FLOP_CONTEXT, tokens_per_chunk=tokens_per_chunk,
             flops={}, compile_s={})
  for mode in ("fwd", "bwd", "fwdbwd"):
    for skip in (True, False):
      compiled, sec = compile_attention(mesh, batch=1, tokens=FLOP_CHUNKS * tokens_per_chunk,
                                        tokens_per_chunk=tokens_per_chunk,
                                        block=tokens_per_chunk, skip=skip, unroll=True, mode=mode)
      key = f"{mode}_{'skip' if skip else 'noskip'}"
      out["flops"][key], out["compile_s"][key] = _flops(compiled), sec
  for layout in ("zigzag", "contiguous"):
    out[f"work_{layout}"] = device_work(FLOP_CHUNKS, FLOP_CONTEXT, layout).tolist()
  print(f"  flops: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  print_flops(out)
  return out


def print_flops(r):
  n, c, tokens_per_chunk, f = r["context"], r["chunks"], r["tokens_per_chunk"], r["flops"]
  visible = c * (c + 1) // 2
  print(f"\n== FLOPs: ring attention, {c} chunks x {tokens_per_chunk} tokens over context={n} "
        "(zig-zag), "
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
