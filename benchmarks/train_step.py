"""Train-step speed and memory: the demo step on a CPU, and a 4.5B-shaped step on an accelerator.

The trainer's own step (`magi_jax.train.step.make_train_step`: fp32 masters, AdamW, clipping,
NaN guard, EMA when the config has one), compiled ahead of time so compile time is apart from
step time and XLA's cost and memory analyses come from the executable that runs; synthetic
batches with the real shapes. cpu_tiny: experiments/configs/bouncing_tiny.py, one fresh child
process per `--tiny_variants` entry (fp32, remat, bf16, bf16+remat). gpu_4p5b_480p (skipped on
a CPU): the 4.5B_base model with `--num_layers` layers, bf16, remat, 480p, per `--gpu_backends`.

  python benchmarks/train_step.py                                        # every case
  python benchmarks/train_step.py --cases=cpu_tiny --steps=3 --warmup=1  # quick CPU check
  python benchmarks/train_step.py --cases=gpu_4p5b_480p --num_layers=8 --chunks=2
  (each cpu_tiny variant compiles for ~20-30 s on a 2-core CPU: a CPU run takes a few minutes)

cpu_tiny columns: compile s, step s (median of `--steps` after `--warmup`), tokens/s, XLA temp
MiB, peak RSS MiB, train RSS MiB, loss, and "vs fp32" ratios (below 1: faster or smaller).
gpu_4p5b_480p: per backend an "XLA" row (cost_analysis(): remat recompute in, loop bodies
counted once) and an "analytic" row (model FLOPs), each with TFLOP/step, achieved TFLOP/s and
the fraction of `--peak_tflops`. Compiles are real unless `--cache_dir` names a cache.
Full case and column definitions and the figures: benchmarks/results/train_step.md.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from child_process import (MiB, current_mib, emit, peak_mib, reset_hwm, run_child,  # noqa: E402
                           status_mib, use_compile_cache)

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["cpu_tiny", "gpu_4p5b_480p"], "cases to run")
flags.DEFINE_integer("steps", 10, "timed steps (the median is reported)")
flags.DEFINE_integer("warmup", 2, "untimed steps after compiling, before the timed ones")
# cpu_tiny
flags.DEFINE_list("tiny_variants", ["fp32", "remat", "bf16"], "cpu_tiny variants: fp32, remat, "
                  "bf16 or bf16+remat; the first is the baseline of the ratios")
flags.DEFINE_string("demo_variant", "", "argument of bouncing_tiny.get_config ('' or 'smoke')")
flags.DEFINE_string("cache_dir", "none", "persistent compilation cache of the cpu_tiny children "
                    "('none': every child compiles, so compile times are real)")
flags.DEFINE_string("child", "", "internal: measure this cpu_tiny variant, print one RESULT line")
# gpu_4p5b_480p
flags.DEFINE_integer("num_layers", 4, "layers of the 4.5B-shaped stack")
flags.DEFINE_integer("chunks", 1, "chunks of 6 latent frames per row")
flags.DEFINE_integer("rows", 1, "rows (batch size)")
flags.DEFINE_integer("text_valid", 100, "valid caption tokens of the 800")
flags.DEFINE_bool("remat", True, "recompute layer activations in the backward pass")
flags.DEFINE_list("gpu_backends", ["blockwise", "dot_product"], "attention backends; the "
                  "first is the baseline of the ratios")
flags.DEFINE_float("peak_tflops", 989.0, "accelerator peak TFLOP/s (989: H100/H200 bf16 dense)")

GPU_CHUNK_WIDTH = 6
GPU_LATENT_HW = (60, 104)                    # 480x832 video, 8x spatial VAE downsampling
CAPTION = "a red ball; the red ball hits the floor"


# ---------------------------------------------------------------------------------------------
# Shared: build the trainer's step, compile it ahead of time, time it.

def _count(tree) -> int:
  import jax
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def _trainer_parts(model, *, lr=1e-4, warmup_steps=0, ema: bool = False):
  """What trainer.train builds before the step: split, optimizer, fp32-master state."""
  from flax import nnx
  from magi_jax.train import optim
  from magi_jax.train.step import init_state
  from magi_jax.train.trainer import compute_dtypes
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  schedule = optim.learning_rate(lr, warmup_steps, 1000)
  tx = optim.make_optimizer(schedule)
  state = init_state(params, tx, seed=0, ema=ema)
  return dict(graphdef=graphdef, frozen=frozen, tx=tx, schedule=schedule,
              dtypes=compute_dtypes(params)), state


def _trainer_step(parts, obj, *, bf16: bool, ema_decay: float = 0.0):
  """The trainer's jitted step (bf16: compute in the model's parameter dtypes)."""
  from magi_jax.train.step import make_train_step
  return make_train_step(parts["graphdef"], obj, parts["tx"], parts["schedule"],
                         compute_dtypes=parts["dtypes"] if bf16 else None, ema_decay=ema_decay)


def _compile(step, state, frozen, batch):
  """(executable, seconds to lower + compile)."""
  t0 = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  return compiled, time.perf_counter() - t0


def _time_steps(compiled, state, frozen, batch, steps, warmup, before_timed=None):
  """Runs warm-up then timed steps; returns (state, median seconds, last metrics)."""
  import jax
  for _ in range(warmup):
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
  if before_timed is not None:
    before_timed()
  times = []
  metrics = None
  for _ in range(max(steps, 1)):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  return state, statistics.median(times), jax.device_get(metrics)


def _xla_flops(compiled) -> float:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))
  except Exception:  # cost analysis is best-effort and backend dependent
    return float("nan")


def _xla_memory(compiled) -> dict:
  try:
    ma = compiled.memory_analysis()
    return dict(arg=ma.argument_size_in_bytes, out=ma.output_size_in_bytes,
                temp=ma.temp_size_in_bytes)
  except Exception:
    nan = float("nan")
    return dict(arg=nan, out=nan, temp=nan)


# ---------------------------------------------------------------------------------------------
# cpu_tiny: the demo config, one variant per child process.

def _demo_config(variant: str):
  from experiments.configs import bouncing_tiny
  c = bouncing_tiny.get_config(FLAGS.demo_variant or None)
  parts = set(variant.split("+"))
  unknown = parts - {"fp32", "bf16", "remat"}
  if unknown or ("fp32" in parts and "bf16" in parts):
    raise ValueError(f"unknown cpu_tiny variant {variant!r}; use fp32, remat, bf16, bf16+remat")
  c.model.remat = "remat" in parts
  c.model.precision = "bf16" if "bf16" in parts else "fp32"
  return c


def _demo_batch(c, tokenizer):
  import numpy as np
  from magi_jax.proj.bouncing.training import world_config
  from magi_jax.train import build
  world = world_config(c)
  B, K = c.data.batch_size, c.data.bin_chunks
  F = world.frames_per_chunk
  rng = np.random.default_rng(0)
  ids, mask = tokenizer([CAPTION] * (B * K))
  batch = {"frames": rng.integers(0, 256, (B, K * F, world.height, world.width, 3), np.uint8),
           "segment_ids": np.ones((B, K), np.int32),
           "text_tokens": ids.reshape(B, K, -1), "text_mask": mask.reshape(B, K, -1)}
  m = build.model_config(c)
  tokens_per_chunk = ((F // m.t_patch_size) * (world.height // m.patch_size)
                      * (world.width // m.patch_size))
  return batch, B, K, tokens_per_chunk


def tiny_child(variant: str):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from flax import nnx
  from magi_jax.train import build
  use_compile_cache(FLAGS.cache_dir)
  c = _demo_config(variant)
  tokenizer = build.tokenizer_for(c)
  model = build.build_model(c, tokenizer)
  dit_params = _count(nnx.state(model.dit, nnx.Param))
  text_params = 0 if model.text_encoder is None else _count(nnx.state(model.text_encoder,
                                                                       nnx.Param))
  parts, state = _trainer_parts(model, lr=c.optim.lr, warmup_steps=c.optim.warmup_steps,
                                ema=c.ema_decay > 0)
  step = _trainer_step(parts, build.objective(c), bf16=c.model.precision == "bf16",
                       ema_decay=float(c.ema_decay))
  frozen = parts["frozen"]
  del model
  batch, B, K, tokens_per_chunk = _demo_batch(c, tokenizer)
  batch = jax.device_put(batch)
  compiled, compile_s = _compile(step, state, frozen, batch)
  mem = _xla_memory(compiled)
  compile_peak = peak_mib()
  import ctypes
  ctypes.CDLL("libc.so.6").malloc_trim(0)       # the compiler's free lists do not set the base
  hwm_reset = reset_hwm()
  state, sec, metrics = _time_steps(compiled, state, frozen, batch, FLAGS.steps, FLAGS.warmup)
  train_peak = status_mib("VmHWM") if hwm_reset else float("nan")
  emit(dict(variant=variant, compile_s=compile_s, step_s=sec, rows=B, chunks=K,
            tokens_per_chunk=tokens_per_chunk,
            dit_params=dit_params, text_params=text_params, temp=mem["temp"], arg=mem["arg"],
            peak_rss=max(compile_peak, peak_mib()), train_rss=train_peak,
            rss_now=current_mib(), loss=float(metrics["loss"]),
            finite=int(metrics["finite"]), backend=jax.default_backend()))


def run_tiny():
  rows = []
  for v in FLAGS.tiny_variants:
    t0 = time.perf_counter()
    r = run_child(__file__, v, {"steps": FLAGS.steps, "warmup": FLAGS.warmup,
                                "demo_variant": FLAGS.demo_variant}, FLAGS.cache_dir)
    rows.append(r)
    print(f"  cpu_tiny {v}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  b = rows[0]
  tokens = b["rows"] * b["chunks"] * b["tokens_per_chunk"]
  name = "bouncing_tiny" + (f":{FLAGS.demo_variant}" if FLAGS.demo_variant else "")
  print(f"\n== cpu_tiny: {name} train step, {b['rows']} rows x {b['chunks']} chunks x "
        f"{b['tokens_per_chunk']} tokens = {tokens} tokens, {b['backend']}, median of "
        f"{max(FLAGS.steps, 1)} steps after "
        f"{FLAGS.warmup} warm-up ==")
  total = b["dit_params"] + b["text_params"]
  print(f"parameters: {total:,} (DiT {b['dit_params']:,} + text encoder {b['text_params']:,})")
  base = b["variant"]
  print(f"{'variant':<11} {'compile s':>9} {'step s':>8} {'tokens/s':>9} {'step vs ' + base:>13} "
        f"{'XLA temp MiB':>12} {'temp vs ' + base:>13} {'peak RSS MiB':>12} "
        f"{'RSS vs ' + base:>12} {'train RSS MiB':>13} {'loss':>7}")
  for r in rows:
    print(f"{r['variant']:<11} {r['compile_s']:>9.1f} {r['step_s']:>8.3f} "
          f"{tokens / r['step_s']:>9,.0f} {r['step_s'] / b['step_s']:>12.2f}x "
          f"{r['temp'] / MiB:>12.1f} {r['temp'] / b['temp']:>12.2f}x "
          f"{r['peak_rss']:>12.0f} {r['peak_rss'] / b['peak_rss']:>11.2f}x "
          f"{r['train_rss']:>13.0f} {r['loss']:>7.4f}"
          + ("" if r["finite"] else "  (non-finite: update skipped)"))
  print(f"ratios: variant / {base} (below 1: faster or smaller). XLA temp: the executable's "
        "temporary buffers\n(activations kept for the backward pass, workspace); peak RSS: "
        "ru_maxrss of the variant's child\n(compile included); train RSS: VmHWM over the warm-up "
        "and timed steps alone.")


# ---------------------------------------------------------------------------------------------
# gpu_4p5b_480p: a 4.5B-shaped layer stack at 480p.

def analytic_flops(m, *, rows: int, chunks: int, tokens_per_chunk: int, text_len: int,
                   text_valid: int):
  """Model FLOPs of one train step (forward + backward = 3 x forward; no remat recompute).

  GEMMs: 2 FLOPs per weight per token, for the weights a video token passes through (x
  embedder, q/k/v, cross-attention query, output projection, MLP, final linear) and those a
  caption token passes through (caption embedder, per-layer cross-attention k/v; every one of
  the `text_len` positions is projected). Attention: QK^T and PV, 4 x heads x head_dim FLOPs
  per visible (query, key) pair: block-causal self-attention (chunk k of a row sees chunks
  0..k) and cross-attention over the valid caption tokens.
  """
  D, F, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
  P = m.num_attention_heads * m.kv_channels
  G = m.num_query_groups * m.kv_channels
  patch_in = m.in_channels * m.t_patch_size * m.patch_size ** 2
  weights_per_video_token = (patch_in * D + m.patch_dim * D
                             + L * (P * D + 2 * G * D + P * D + 2 * P * D
                                    + D * F * (2 if m.gated_linear_unit else 1) + F * D))
  weights_per_caption_token = m.caption_channels * D + L * 2 * G * D
  video_tokens = rows * chunks * tokens_per_chunk
  caption_tokens = rows * chunks * text_len
  gemm = 2 * (weights_per_video_token * video_tokens
              + weights_per_caption_token * caption_tokens)
  self_pairs = rows * tokens_per_chunk * tokens_per_chunk * chunks * (chunks + 1) // 2
  cross_pairs = video_tokens * text_valid
  attn = 4 * P * L * (self_pairs + cross_pairs)
  return 3 * (gemm + attn)


def big_step_rows(m, *, rows, chunks, chunk_width, latent_hw, text_valid, backends, remat,
                  steps, warmup):
  """Builds the bf16 stack of config `m` once and times one train step per attention backend."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from magi_jax.convert.load import random_module
  from magi_jax.models import Precision, VideoDiT
  from magi_jax.train.objective import Objective, TrainModel

  dit = random_module(lambda: VideoDiT(m, precision=Precision.bf16(), rngs=nnx.Rngs(0)), 0)
  dit.remat = remat
  model = TrainModel(dit)
  h, w = latent_hw
  tokens_per_chunk = (chunk_width // m.t_patch_size) * (h // m.patch_size) * (w // m.patch_size)
  L, C = m.caption_max_length, m.caption_channels
  kx, ky = jax.random.split(jax.random.key(0))
  # prepared latents, time first (B, T, h, w, C), as experiments.prepare stores them
  batch = {"latents": jax.random.normal(kx, (rows, chunks * chunk_width, h, w, m.latent_channels)),
           "segment_ids": jnp.ones((rows, chunks), jnp.int32),
           "text_emb": jax.random.normal(ky, (rows, chunks, L, C), jnp.bfloat16),
           "text_mask": jnp.broadcast_to((jnp.arange(L) < text_valid).astype(jnp.float32),
                                         (rows, chunks, L))}
  params = _count(nnx.state(model, nnx.Param))
  parts, state = _trainer_parts(model)
  frozen = parts["frozen"]
  del model, dit
  results = []
  for b in backends:                                   # one state, carried from backend to backend
    step = _trainer_step(parts, Objective(chunk_width=chunk_width, backend=b), bf16=True)
    try:
      compiled, compile_s = _compile(step, state, frozen, batch)
      state, sec, metrics = _time_steps(compiled, state, frozen, batch, steps, warmup)
      results.append(dict(backend=b, compile_s=compile_s, step_s=sec,
                          xla_flops=_xla_flops(compiled), mem=_xla_memory(compiled),
                          loss=float(metrics["loss"]), finite=int(metrics["finite"])))
      del compiled
    except Exception as e:  # e.g. out of memory for a dense backend: report, go on
      results.append(dict(backend=b, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
  flops = analytic_flops(m, rows=rows, chunks=chunks, tokens_per_chunk=tokens_per_chunk,
                         text_len=L, text_valid=text_valid)
  return dict(params=params, tokens_per_chunk=tokens_per_chunk,
              tokens=rows * chunks * tokens_per_chunk, analytic=flops, results=results)


def run_gpu():
  import jax
  from magi_jax.configs import get_preset
  backend = jax.default_backend()
  if backend == "cpu":
    print("\n== gpu_4p5b_480p: skipped (jax.default_backend() is cpu; needs an accelerator) ==")
    return
  m = dataclasses.replace(get_preset("4.5B_base").model, num_layers=FLAGS.num_layers)
  r = big_step_rows(m, rows=FLAGS.rows, chunks=FLAGS.chunks, chunk_width=GPU_CHUNK_WIDTH,
                    latent_hw=GPU_LATENT_HW, text_valid=FLAGS.text_valid,
                    backends=FLAGS.gpu_backends, remat=FLAGS.remat, steps=FLAGS.steps,
                    warmup=FLAGS.warmup)
  print_gpu(r, m, backend, jax.devices()[0].device_kind)


def print_gpu(r, m, backend, kind):
  peak = FLAGS.peak_tflops
  print(f"\n== gpu_4p5b_480p: 4.5B_base shape, {m.num_layers} layers, bf16 compute + fp32 "
        f"masters, remat {'on' if FLAGS.remat else 'off'}, {FLAGS.rows} rows x {FLAGS.chunks} "
        f"chunks x {r['tokens_per_chunk']} tokens = {r['tokens']} tokens, {backend} ({kind}), "
        "median of "
        f"{max(FLAGS.steps, 1)} steps after {FLAGS.warmup} warm-up ==")
  print(f"parameters: {r['params']:,}; captions {m.caption_max_length} x {m.caption_channels} "
        f"text_emb rows, {FLAGS.text_valid} valid")
  ok = [x for x in r["results"] if "error" not in x]
  base = ok[0] if ok else None
  vs = "vs " + (base["backend"] if base else "-")
  print(f"{'backend':<12} {'compile s':>9} {'step s':>8} {'tokens/s':>9} {vs:>12} "
        f"{'FLOPs':>8} {'TFLOP/step':>10} {'TFLOP/s':>8} {'of peak':>8} {'XLA temp GiB':>12} "
        f"{'loss':>7}")
  for x in r["results"]:
    if "error" in x:
      print(f"{x['backend']:<12} failed: {x['error']}")
      continue
    counts = [("XLA", x["xla_flops"])] if x["xla_flops"] == x["xla_flops"] else []
    counts.append(("analytic", r["analytic"]))
    for i, (src, fl) in enumerate(counts):
      tf = fl / x["step_s"] / 1e12
      lead = (f"{x['backend']:<12} {x['compile_s']:>9.1f} {x['step_s']:>8.3f} "
              f"{r['tokens'] / x['step_s']:>9,.0f} {x['step_s'] / base['step_s']:>11.2f}x"
              if i == 0 else " " * 54)
      tail = (f" {x['mem']['temp'] / 2 ** 30:>12.2f} {x['loss']:>7.4f}" if i == 0 else "")
      print(f"{lead} {src:>8} {fl / 1e12:>10.2f} {tf:>8.1f} {tf / peak:>8.1%}{tail}")
  print(f"of peak: achieved TFLOP/s / {peak:g}. XLA: compiled.cost_analysis() (hardware FLOPs: "
        "remat's recomputed\nforward included; loop bodies counted once, so blockwise attention's "
        "scan/map is undercounted).\nanalytic: model FLOPs, 3 x forward (GEMMs 2 x weights per "
        "token + attention over visible pairs).")


def main(argv):
  del argv
  if FLAGS.child:
    tiny_child(FLAGS.child)
    return
  for name in FLAGS.cases:
    if name == "cpu_tiny":
      run_tiny()
    elif name == "gpu_4p5b_480p":
      run_gpu()
    else:
      sys.exit(f"unknown case {name!r}; cases: cpu_tiny, gpu_4p5b_480p")


if __name__ == "__main__":
  app.run(main)
