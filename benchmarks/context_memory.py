"""Per-device memory of the 24B train step at 64K-4M tokens of context, and ring attention FLOPs.

The context-parallel issue asks how long a video the 24B model can train on: which mesh makes
4M tokens of one video fit in 95 GiB per device, whether per-device attention memory falls as
1/N with the context-parallel size N, and what block skipping saves in ring attention. Nothing
here allocates a weight or an activation: every figure comes from XLA compiling the step ahead
of time for abstract inputs (`jax.jit(f, in_shardings=..., out_shardings=...).lower(
*ShapeDtypeStructs).compile()`) on a fake mesh of CPU devices
(`--xla_force_host_platform_device_count`), then reading the executable's `memory_analysis()`
(bytes per device) and `cost_analysis()` (FLOPs per device).

  python benchmarks/context_memory.py                     # 64K..4M x context 8..256 (~16 min)
  python benchmarks/context_memory.py --quick             # smoke run: 64K, 8 devices (~45 s)
  python benchmarks/context_memory.py --contexts=4M --cp_sizes=64,128 --layouts=contiguous
  python benchmarks/context_memory.py --parts=flops       # only the FLOP accounting (~15 s)

What is compiled (`--parts=memory`), for every (context length, mesh, ring layout):

  train step  the 24B_base preset's TransformerLayer (the model's own layer class: hidden
              6144, 48 heads / 8 kv groups of 128, SwiGLU 16384, parallel self + cross
              attention, q/k norms, RoPE, gates) stacked `--layers` deep (default 48, the
              full model, no extrapolation) and run with `jax.lax.scan` over the stacked
              parameters (the body compiles once: 48 layers compile as fast as 2), each layer
              rematerialised (`jax.checkpoint`). Self-attention is the 'ring' backend (ring
              attention over the mesh's 'context' axis, block-causal masks: chunk c sees
              chunks 0..c); cross-attention (blockwise, local to a device) sees a
              `--caption_tokens` caption per chunk. bf16 compute from fp32 master weights
              (the trainer's compute-dtype cast), the trainer's optimizer
              (magi_jax.train.optim: global-norm clipping + AdamW, fp32 moments), weights and
              moments donated. The loss is mean(h_out^2) of the stack's output. Left out: the
              patch / timestep / caption embedders and the final layer (about 0.1% of the
              weights; their activations are one (tokens, 6144) array or less).
  attention   ring attention alone at one layer's shape, forward + backward (jax.vjp):
              q (B, S, 48, 128), k/v (B, S, 8, 128) bf16 and dout in, dq/dk/dv out: what one
              layer's self-attention needs, apart from the weights.

Meshes: `--devices` fake devices (default 256) as context N x fsdp = `--devices` / N; data
and tensor are 1. Each mesh is compiled in its own child process started with exactly
`--devices` host devices. The batch is one video per fsdp rank (B = fsdp, sharded over fsdp),
its S tokens split over 'context' (S / N tokens per device). Weights follow the project's
parameter table (`magi_jax.parallel.rules.tree_shardings`, the layer dim of the stacked
weights unsharded); a kernel's model-width dim is the logical axis 'embed'.
`--param_axes=fsdp+context` (the default, and the project's default rule) maps 'embed' to
('fsdp', 'context'): ZeRO-3 over all 256 devices. `--param_axes=fsdp` shards weights over
'fsdp' only (replicated across 'context'): at context 128 x fsdp 2 the arguments (weights,
moments) are then 134 GiB per device (4M tokens: 276 GiB in all).

Ring layouts (`--layouts`, one table each): 'zigzag' is what the 'ring' backend's 'auto' picks
when the chunk count is a multiple of 2N (always here); 'contiguous' keeps each device's own
slice. Chunks: MAGI-24B's 720p chunk (6 latent frames x 45 x 80 = 21,600 tokens) does not cut
2^k-token contexts into 2N chunk groups, so a chunk is `--chunk_tokens` = 8192 tokens (2 latent
frames of 64 x 64 tokens, a 1024 x 1024 video): 4M tokens = 512 chunks = 2 x 256. Where a
context holds fewer than 2N such chunks, chunks shrink to S / 2N tokens (column tok/chunk).
Memory depends on the tokens per device, not on the chunk size.

Scan and the ring's custom VJP: the self-attention ranges enter each scanned layer as a scanned
input (`xs`). Closed over (or carried), JAX differentiates ring attention's forward loops
instead of using its custom VJP (every tile's probabilities are kept: 151 GiB of temporaries
instead of 12 for 2 layers at 8K tokens per device); the model's own layer scan
(magi_jax/models/stack.py) passes its masks the same way.

Output (per layout; numbers from a 2-core CPU, 256 devices, 48 layers):

  == per-device memory, ring layout zigzag: 24B_base layer stack x 48 (scanned, remat per
     layer), fwd + bwd + AdamW, bf16 compute / fp32 masters, 256 devices, weights over
     fsdp+context; XLA:CPU memory analysis ==
  context tok/chunk mesh ctx x fsdp tok/device args GiB temp GiB total GiB fits 95 attn GiB
      attn vs ctx=8 ideal compile s
       4M      8192          8 x 32    524,288     7.31  1192.76   1200.07      no   151.57
          1.000x  1.000        13
  ...
       4M      8192         128 x 2     32,768     1.47    75.41     76.88     yes     9.47
          0.063x  0.062        12
  4M tokens (zigzag) fit in 95 GiB per device on context x fsdp = 128 x 2, 256 x 1;
  smallest mesh: context=128 x fsdp=2 (256 devices, 76.9 GiB).

  Attention memory falls as 1/N in both layouts (4M, zig-zag: 151.6, 75.8, 37.9, 19.0, 9.47,
  4.74 GiB for N = 8..256) and the step's memory depends only on the tokens per device (32K
  tokens per device: 76.9 GiB at 1M / 32 and at 4M / 128). Zig-zag costs ~10% more attention
  memory than contiguous (the half-slice buffers of its point-to-point re-deal) and buys equal
  work on every device.

  args = the executable's argument bytes (master weights + AdamW moments + inputs: one layer
  input, captions, RoPE tables, masks); temp = XLA's temporary buffers (the remat checkpoint of
  every layer, one layer's recomputed activations and gradients, gathered weights, workspace);
  total = args + outputs - aliased (donated) + temp: the per-device peak XLA plans; fits:
  total <= `--budget_gib`. attn = the attention-alone total; "attn vs ctx=8" is that against
  the same context and layout at the first context size; "ideal" is the 1/N ratio.

FLOP accounting (`--parts=flops`): ring attention over 8 chunks of `--flop_chunk_tokens` (512)
tokens on a context=4 mesh (4 fake devices), zig-zag, compiled with `unroll=True` (XLA's cost
analysis counts a while-loop body once; unrolled, every ring step and tile is counted; of a
cond it counts the larger branch, here exactly one branch's pairs since both compute as many).
skip=True is the balanced ring with block skipping; skip=False computes every (query group,
key group) pair: the same attention without skipping. Forward and backward are compiled apart
(the backward alone from the VJP's residuals) and as one program:

  pass                       skip GFLOP no-skip GFLOP skip / no-skip
  forward                        59.135       104.980        0.5633x
  backward                      146.648       260.305        0.5634x
  forward + backward            205.783       365.285        0.5633x
  fwd+bwd as one program        205.745       365.229        0.5633x
  device_work(8, 4, 'zigzag'): visible chunk pairs per device [9, 9, 9, 9], max/min 1.00
  device_work(8, 4, 'contiguous'): visible chunk pairs per device [3, 7, 11, 15], max/min 5.00

Target: at most 0.6x; block-causal attention over 8 chunks sees 36 of 64 chunk pairs (0.5625).

Limitations: XLA:CPU's buffer assignment and fusion are not TPU's or GPU's. CPU keeps f32
copies around bf16 GEMMs and collectives (e.g. the (tokens, 32768) f32 SwiGLU input, 4 GiB at
32K tokens per device, several live at once; bf16 k/v travel the ring as f32), so the absolute
GiB overstate what an accelerator compile would plan; the 1/N trend and the comparisons carry
over. Collectives are planned, never run; the runtime's own reservations are not included.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from child_process import emit, run_child  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("contexts", ["64K", "256K", "1M", "4M"], "context lengths in tokens "
                  "(K = 1024, M = 1024^2)")
flags.DEFINE_list("cp_sizes", ["8", "16", "32", "64", "128", "256"], "context-parallel sizes N")
flags.DEFINE_integer("devices", 256, "devices of every mesh (context N x fsdp devices/N)")
flags.DEFINE_integer("layers", 48, "layers in the scanned stack (24B: 48)")
flags.DEFINE_integer("chunk_tokens", 8192, "tokens per chunk (fewer where a context holds "
                     "fewer than 2N chunks)")
flags.DEFINE_integer("caption_tokens", 64, "caption tokens per chunk (cross-attention keys)")
flags.DEFINE_enum("param_axes", "fsdp+context", ["fsdp+context", "fsdp"], "mesh axes of the "
                  "weights' model-width dim")
flags.DEFINE_list("layouts", ["zigzag", "contiguous"], "ring attention layouts of the memory "
                  "tables (one table each): zigzag (what the model's 'auto' picks), contiguous")
flags.DEFINE_integer("block", 512, "ring attention query/key tile (block_q = block_k)")
flags.DEFINE_float("budget_gib", 95.0, "per-device memory that counts as fitting")
flags.DEFINE_list("parts", ["memory", "flops"], "memory and/or flops")
flags.DEFINE_integer("flop_chunk_tokens", 512, "tokens per chunk of the FLOP accounting")
flags.DEFINE_bool("quick", False, "smoke run: 64K tokens, 8 devices (context 8 x fsdp 1), "
                  "2 layers, FLOPs at 128 tokens per chunk")
flags.DEFINE_string("json_out", "", "also write every figure to this JSON file")
flags.DEFINE_string("cache_dir", "none", "internal (child_process interface; never used: every "
                    "compile is real)")
flags.DEFINE_string("child", "", "internal: 'memory:N' or 'flops'; prints one RESULT line")

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


def _start_jax(num_devices: int):
  """Sets the host device count before JAX starts (a child process starts it here)."""
  flag = f"--xla_force_host_platform_device_count={num_devices}"
  old = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = (old + " " + flag).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  if jax.device_count() != num_devices:
    raise RuntimeError(f"wanted {num_devices} devices, JAX started with {jax.device_count()}")
  return jax


def _memory(compiled) -> dict:
  ma = compiled.memory_analysis()
  arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
  alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
  return dict(arg=arg, out=out, alias=alias, temp=temp, total=arg + out - alias + temp)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def _rules(param_axes: str):
  from magi_jax.parallel.rules import LOGICAL_RULES, ShardingRules
  axes = tuple(param_axes.split("+"))
  logical = tuple((k, (axes if len(axes) > 1 else axes[0]) if k == "embed" else v)
                  for k, v in LOGICAL_RULES)
  return ShardingRules(logical=logical)


# ---------------------------------------------------------------------------------------------
# The train step and the attention alone, compiled for abstract inputs.

def compile_stack(mesh, rules, *, batch: int, tokens: int, tok: int, layers: int,
                  caption: int, block: int, layout: str = "zigzag"):
  """AOT-compiles fwd + bwd + AdamW of `layers` scanned 24B layers; (compiled, seconds)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from magi_jax.attention import ChunkMask, caption_ranges
  from magi_jax.configs import get_preset
  from magi_jax.models.block import TransformerLayer
  from magi_jax.models.precision import Precision
  from magi_jax.parallel.rules import constrain, fit_spec, path_string, tree_shardings, use_mesh
  from magi_jax.train import optim

  F32 = jnp.float32
  cfg = get_preset(PRESET).model
  policy = Precision.named("bf16")
  D, Dc = cfg.hidden_size, cfg.cond_hidden_dim
  B, S, L, C = batch, tokens, layers, tokens // tok
  abstract = nnx.eval_shape(lambda: TransformerLayer(cfg, policy, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  one = nnx.to_pure_dict(params)                         # one layer: {"q": {"kernel": ...}}
  dtypes = jax.tree.map(lambda x: x.dtype, one)          # compute dtypes (bf16, f32 norms)
  masters = jax.tree.map(lambda x: jax.ShapeDtypeStruct((L,) + x.shape, F32), one)
  # Shardings from the project's parameter table: the model's stacked paths
  # ("layers/<name>/kernel", leading layer dim unsharded).
  p_sh = tree_shardings({"layers": masters}, mesh, rules)["layers"]
  by_path = {path_string(p): s for p, s in jax.tree_util.tree_flatten_with_path(p_sh)[0]}
  replicated = NamedSharding(mesh, P())

  tx = optim.make_optimizer(optim.learning_rate(1e-4, 0, 1000))
  opt = jax.eval_shape(tx.init, masters)

  masters_shape = {path_string(p): x.shape
                   for p, x in jax.tree_util.tree_flatten_with_path(masters)[0]}

  def opt_sharding(path, x):       # a moment leaf's path ends with its parameter's path
    s = path_string(path)
    for name, sh in by_path.items():
      if (s == name or s.endswith("/" + name)) and x.shape == masters_shape[name]:
        return sh
    return replicated
  o_sh = jax.tree_util.tree_map_with_path(opt_sharding, opt)

  act = lambda shape, spec: NamedSharding(mesh, fit_spec(P(*spec), shape, mesh))
  batch_axes = ("data", "fsdp")
  rope = 3 * (cfg.rope_head_dim // 8)                    # sin/cos columns per token
  shapes = dict(h=(B, S, D), cond=(B, C, Dc), y=(B * C, caption, D), sin=(S, rope),
                cos=(S, rope), ranges=(B, C, 2), valid=(B * C,))
  specs = dict(h=(batch_axes, "context", None), cond=(batch_axes, None, None),
               y=(("data", "fsdp", "context"), None, None), sin=("context", None),
               cos=("context", None), ranges=(batch_axes, None, None),
               valid=(("data", "fsdp", "context"),))
  dt = dict(h=jnp.bfloat16, cond=jnp.bfloat16, y=jnp.bfloat16, sin=F32, cos=F32,
            ranges=jnp.int32, valid=jnp.int32)
  names = ("h", "cond", "y", "sin", "cos", "ranges", "valid")
  in_sh = {k: act(shapes[k], specs[k]) for k in names}

  def loss_fn(master, h, cond, y, sin, cos, ranges, valid):
    weights = jax.tree.map(lambda p, d: p.astype(d), master, dtypes)
    xmask = ChunkMask(caption_ranges(valid), q_block=tok)

    def body(h, xs):
      w, r = xs
      layer = nnx.merge(graphdef, w)
      mask = ChunkMask(r, q_block=tok)
      h, _ = layer(h, cond, (sin, cos), mask, None, y, xmask, policy, "ring")
      return constrain(h, ("batch", "length", "act_embed")), None

    # The self-attention ranges enter each layer as a scanned input, not a closed-over
    # constant: with them closed over, the ring's custom VJP is bypassed under scan and the
    # backward pass differentiates the forward loops (every tile's probabilities kept).
    per_layer_ranges = jnp.broadcast_to(ranges, (L,) + ranges.shape)
    h, _ = jax.lax.scan(jax.checkpoint(body), h, (weights, per_layer_ranges))
    return jnp.mean(jnp.square(h.astype(F32)))

  def step(master, opt_state, *inputs):
    import optax
    loss, grads = jax.value_and_grad(loss_fn)(master, *inputs)
    updates, opt_state = tx.update(grads, opt_state, master)
    return optax.apply_updates(master, updates), opt_state, loss

  # The layer calls the 'ring' backend with its defaults; register ours (tiles, layout).
  _register_ring(block, layout)
  fn = jax.jit(step, donate_argnums=(0, 1),
               in_shardings=(p_sh, o_sh) + tuple(in_sh[k] for k in names),
               out_shardings=(p_sh, o_sh, replicated))
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  args = (jax.tree.map(sds, masters, p_sh), jax.tree.map(sds, opt, o_sh))
  args += tuple(jax.ShapeDtypeStruct(shapes[k], dt[k], sharding=in_sh[k]) for k in names)
  t0 = time.perf_counter()
  with use_mesh(mesh, rules):
    compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def _register_ring(block: int, layout: str):
  """Registers the 'ring' backend with tiles of `block` tokens and the given layout."""
  import functools
  from magi_jax.attention import register_backend
  from magi_jax.parallel.ring_attention import ring_attention
  register_backend("ring", functools.partial(ring_attention, block_q=block, block_k=block,
                                             layout=layout))


def compile_attention(mesh, *, batch: int, tokens: int, tok: int, block: int, skip=True,
                      layout="zigzag", unroll=False, mode="fwdbwd"):
  """AOT-compiles ring attention at one 24B layer's shape; (compiled, seconds).

  mode: 'fwd' (q, k, v -> out), 'fwdbwd' (q, k, v, dout -> dq, dk, dv in one program) or
  'bwd' (the backward pass alone: the VJP's residuals and dout -> dq, dk, dv).
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from magi_jax.attention import ChunkMask
  from magi_jax.configs import get_preset
  from magi_jax.parallel.ring_attention import ring_attention
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
    jitted = jax.jit(attend, out_shardings=q.sharding)
    args = (q, kv, kv, ranges)
  elif mode == "fwdbwd":
    jitted = jax.jit(lambda q, k, v, ranges, do: vjp_of(q, k, v, ranges)(do),
                     out_shardings=(q.sharding, kv.sharding, kv.sharding))
    args = (q, kv, kv, ranges, q)
  elif mode == "bwd":
    # The VJP closure is a pytree of residual arrays: compile its application alone, so
    # nothing of the forward pass is in the program.
    residuals = jax.eval_shape(vjp_of, q, kv, kv, ranges)
    jitted = jax.jit(lambda f, do: f(do), out_shardings=(q.sharding, kv.sharding, kv.sharding))
    args = (residuals, q)
  else:
    raise ValueError(f"mode {mode!r}")
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Children: one mesh each.

def memory_child(n: int):
  jax = _start_jax(FLAGS.devices)
  from magi_jax.parallel.mesh import MeshConfig, make_mesh
  devices, fsdp = FLAGS.devices, FLAGS.devices // n
  mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, context=n, tensor=1), jax.devices())
  rules = _rules(FLAGS.param_axes)
  rows = []
  for ctx in (parse_tokens(c) for c in FLAGS.contexts):
    tok = chunk_tokens(ctx, n, FLAGS.chunk_tokens)
    for layout in FLAGS.layouts:
      row = dict(context=ctx, cp=n, fsdp=fsdp, devices=devices, tok=tok, chunks=ctx // tok,
                 batch=fsdp, tokens_per_device=ctx // n, layout=layout)
      t0 = time.perf_counter()
      try:
        compiled, row["stack_compile_s"] = compile_stack(
            mesh, rules, batch=fsdp, tokens=ctx, tok=tok, layers=FLAGS.layers,
            caption=FLAGS.caption_tokens, block=FLAGS.block, layout=layout)
        row["stack"] = _memory(compiled)
        del compiled
      except Exception as e:  # an impossible case is reported, the others go on
        row["stack_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      try:
        compiled, row["attn_compile_s"] = compile_attention(
            mesh, batch=fsdp, tokens=ctx, tok=tok, block=FLAGS.block, layout=layout)
        row["attn"] = _memory(compiled)
        del compiled
      except Exception as e:
        row["attn_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      row["case_s"] = time.perf_counter() - t0
      print(f"  context={n} {fmt_tokens(ctx)} {layout}: {row['case_s']:.0f} s", file=sys.stderr,
            flush=True)
      rows.append(row)
  emit(dict(rows=rows))


def flops_child():
  jax = _start_jax(FLOP_CONTEXT)
  from magi_jax.parallel.mesh import MeshConfig, make_mesh
  from magi_jax.parallel.ring_attention import device_work
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, context=FLOP_CONTEXT, tensor=1), jax.devices())
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
  emit(out)


# ---------------------------------------------------------------------------------------------
# The parent: children, then tables.

def _child_flags() -> dict:
  return dict(contexts=",".join(FLAGS.contexts), devices=FLAGS.devices, layers=FLAGS.layers,
              chunk_tokens=FLAGS.chunk_tokens, caption_tokens=FLAGS.caption_tokens,
              param_axes=FLAGS.param_axes, block=FLAGS.block, layouts=",".join(FLAGS.layouts),
              flop_chunk_tokens=FLAGS.flop_chunk_tokens)


def run_memory() -> list[dict]:
  rows = []
  for n in (int(c) for c in FLAGS.cp_sizes):
    if n < 1 or FLAGS.devices % n:
      sys.exit(f"context size {n} does not divide --devices={FLAGS.devices}")
    t0 = time.perf_counter()
    r = run_child(__file__, f"memory:{n}", _child_flags(), "none")
    print(f"  mesh context={n} x fsdp={FLAGS.devices // n}: {time.perf_counter() - t0:.0f} s "
          "(child, start-up included)", file=sys.stderr, flush=True)
    rows += r["rows"]
  print_memory(rows)
  return rows


def print_memory(rows):
  budget = FLAGS.budget_gib * GiB
  for layout in FLAGS.layouts:
    print_memory_table([r for r in rows if r["layout"] == layout], layout, budget)
  print("args: master weights + AdamW moments + inputs; temp: XLA temporaries (remat "
        "checkpoints, one layer's\nrecompute, gathered weights, workspace); total = args + "
        "outputs - donated + temp; fits: total <= budget.\nattn: ring attention alone, fwd + "
        "bwd at one layer's shape (args + outputs + temp); 'attn vs' is against the\nfirst "
        "context-parallel size of the same context and layout, 'ideal' the 1/N ratio.")


def print_memory_table(rows, layout, budget):
  if not rows:
    return
  first = min(r["cp"] for r in rows)
  print(f"\n== per-device memory, ring layout {layout}: {PRESET} layer stack x {FLAGS.layers} "
        f"(scanned, remat per layer), fwd + bwd + AdamW, bf16 compute / fp32 masters, "
        f"{FLAGS.devices} devices, weights over {FLAGS.param_axes}; XLA:CPU memory analysis ==")
  fits = f"fits {FLAGS.budget_gib:g}"
  print(f"{'context':>7} {'tok/chunk':>9} {'mesh ctx x fsdp':>15} {'tok/device':>10} "
        f"{'args GiB':>8} {'temp GiB':>9} {'total GiB':>9} {fits:>7} "
        f"{'attn GiB':>8} {'attn vs ctx=' + str(first):>14} {'ideal':>6} {'compile s':>9}")
  base = {r["context"]: r["attn"]["total"] for r in rows if r["cp"] == first and "attn" in r}
  for r in sorted(rows, key=lambda r: (r["context"], r["cp"])):
    mesh = f"{r['cp']} x {r['fsdp']}"
    line = (f"{fmt_tokens(r['context']):>7} {r['tok']:>9} {mesh:>15} "
            f"{r['tokens_per_device']:>10,} ")
    if "stack" in r:
      x = r["stack"]
      fits = "yes" if x["total"] <= budget else "no"
      line += (f"{x['arg'] / GiB:>8.2f} {x['temp'] / GiB:>9.2f} {x['total'] / GiB:>9.2f} "
               f"{fits:>7} ")
    else:
      line += f"{'stack failed':>36} "
    if "attn" in r:
      vs = (f"{r['attn']['total'] / base[r['context']]:.3f}x" if r["context"] in base else "-")
      line += f"{r['attn']['total'] / GiB:>8.2f} {vs:>14} {first / r['cp']:>6.3f} "
    else:
      line += f"{'attention failed':>30} "
    sec = r.get("stack_compile_s", 0) + r.get("attn_compile_s", 0)
    print(line + f"{sec:>9.0f}")
    for key in ("stack_error", "attn_error"):
      if key in r:
        print(f"    {key}: {r[key]}")
  longest = max(r["context"] for r in rows)
  fit = sorted((r for r in rows if r["context"] == longest and "stack" in r
                and r["stack"]["total"] <= budget), key=lambda r: (r["devices"], r["cp"]))
  name = f"{fmt_tokens(longest)} tokens ({layout})"
  if fit:
    best = fit[0]
    meshes = ", ".join(f"{r['cp']} x {r['fsdp']}" for r in fit)
    print(f"{name} fit in {FLAGS.budget_gib:g} GiB per device on context x fsdp = {meshes}; "
          f"smallest mesh: context={best['cp']} x fsdp={best['fsdp']} ({best['devices']} "
          f"devices, {best['stack']['total'] / GiB:.1f} GiB).")
  else:
    print(f"{name} fit in {FLAGS.budget_gib:g} GiB per device on none of these meshes.")


def run_flops() -> dict:
  t0 = time.perf_counter()
  r = run_child(__file__, "flops", _child_flags(), "none")
  print(f"  flops: {time.perf_counter() - t0:.0f} s (child, start-up included)", file=sys.stderr,
        flush=True)
  print_flops(r)
  return r


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
    FLAGS.contexts, FLAGS.cp_sizes, FLAGS.devices = ["64K"], ["8"], 8
    FLAGS.layers, FLAGS.flop_chunk_tokens = 2, 128
  if FLAGS.child:
    kind, _, arg = FLAGS.child.partition(":")
    if kind == "memory":
      memory_child(int(arg))
    elif kind == "flops":
      flops_child()
    else:
      sys.exit(f"unknown child {FLAGS.child!r}")
    return
  unknown = set(FLAGS.parts) - {"memory", "flops"}
  if unknown:
    sys.exit(f"unknown --parts {sorted(unknown)}; use memory, flops")
  results = {}
  if "memory" in FLAGS.parts:
    results["memory"] = run_memory()
  if "flops" in FLAGS.parts:
    results["flops"] = run_flops()
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(dict(flags=_child_flags(), budget_gib=FLAGS.budget_gib, **results), f, indent=1)


if __name__ == "__main__":
  app.run(main)
