"""DiT forward speed: tokens/s and XLA FLOPs, side by side across attention backends.

  python benchmarks/dit_forward.py                 # tiny preset + the official perf shapes
                                                   # (several minutes on a 2-core CPU)
  python benchmarks/dit_forward.py --cases=tiny    # just the tiny preset

Cases:
  tiny     the tiny preset, 3 chunks block-causal (a quick sanity figure).
  forward  benchmarks/data/dit_small.json "forward": 4 chunks x 1536 tokens, block-causal, no
           cache; against the official PyTorch code's median on a 2-core CPU (fp32).
  stream   the same file's "stream": 2 noisy chunks reading 2 cached chunks; against official.
  sampler  the same file's "sampler": the whole autoregressive walk with the port's `Sampler`
           (4 chunks, window 2, 8 steps, cfg 1, distilled: 20 forward calls); against the
           official seconds per chunk. Timed twice in one process: the first run (compiles
           included) and a second, compiled run.
  gpu720p  only with a GPU: 4.5B shape, bf16, one 720p chunk (720x1280, 21600 tokens) reading a
           cache of 3 earlier chunks; reports achieved TFLOP/s and the fraction of peak.
The printed ratios are official_time / our_time (>1 means faster) and backend / reference.
The official timings: benchmarks/results/dit_forward.md (the port's figures: README.md).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["tiny", "forward", "stream", "sampler", "gpu720p"], "cases to run")
flags.DEFINE_list("backends", ["reference", "chunk_tiles", "flash"],
                  "attention backends to compare (chunk_tiles: the pre-flash blockwise geometry, "
                  "benchmarks/chunk_tiles.py)")
flags.DEFINE_integer("reps", 5, "timed repetitions (median reported)")
flags.DEFINE_float("peak_tflops", 989.0, "device bf16 dense peak for the GPU case (H100/H200 SXM)")

OFFICIAL_SECONDS = {"forward": 6.2, "stream": 3.5, "sampler_per_chunk": 12.7}
PERF_FILE = os.path.join(os.path.dirname(__file__), "data", "dit_small.json")


def _median_seconds(fn, reps):
  fn().velocity.block_until_ready()               # compile + warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn().velocity.block_until_ready()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _flops(call, *args, **kw):
  """XLA's FLOP estimate of the compiled forward (attention masks not exploited in the count)."""
  try:
    cost = call.compiled.lower(*call.prepare(*args, **kw)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))
  except Exception:  # cost analysis is best-effort and backend dependent
    return float("nan")


def _inputs(m, n_chunks, chunk_width, h, w, valid, seed=0, cache_chunks=0, dtype="float32"):
  import jax
  import jax.numpy as jnp
  from magi_jax.models import KVCache
  kx, ky, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (1, m.latent_channels, n_chunks * chunk_width, h, w))
  y = jax.random.normal(ky, (n_chunks, 1, m.caption_max_length, m.caption_channels))
  mask = (jnp.arange(m.caption_max_length) < valid).astype(jnp.int32)
  mask = jnp.broadcast_to(mask, (n_chunks, 1, m.caption_max_length))
  cache = None
  if cache_chunks:
    tokens_per_chunk = chunk_width * (h // 2) * (w // 2)
    shape = (m.num_layers, 1, cache_chunks * tokens_per_chunk, m.num_query_groups, m.kv_channels)
    cache = KVCache(jax.random.normal(kc, shape, dtype), jax.random.normal(kc, shape, dtype))
  return x, y, mask, cache


def _model(m, precision="fp32"):
  from flax import nnx
  from magi_jax.models import Precision, VideoDiT
  return VideoDiT(m, precision=Precision.named(precision), rngs=nnx.Rngs(0))


def _perf_case(name):
  import numpy as np
  from magi_jax.configs import ModelConfig
  with open(PERF_FILE) as f:
    spec = json.load(f)
  m = ModelConfig(**spec["model_config"])
  case = spec["cases"][name]
  n, c, T, H, W = case["x_shape"]
  kw = case["kwargs"]
  return m, dict(chunks_in_flight=kw["denoising_range_num"], chunk_width=kw["chunk_width"],
                 h=H, w=W,
                 t=np.asarray(case["t"], np.float32), slice_point=kw["slice_point"],
                 kv=np.asarray(case["kv_range_tokens"]),
                 valid=case["xattn_mask_valid_per_chunk"][0])


def run_case(name, backends, reps):
  import jax
  import numpy as np
  from magi_jax.configs import tiny_config
  from magi_jax.official.forward import jit_forward

  if name == "tiny":
    m = tiny_config().model
    tokens_per_chunk = 2 * 4 * 4
    c = dict(chunks_in_flight=3, chunk_width=2, h=8, w=8,
             t=np.array([[0.9, 0.5, 0.2]], np.float32), slice_point=0,
             kv=np.array([[0, 1], [0, 2], [0, 3]]) * tokens_per_chunk, valid=20)
  else:
    m, c = _perf_case(name)
  model = _model(m)
  x, y, mask, cache = _inputs(m, c["chunks_in_flight"], c["chunk_width"], c["h"], c["w"],
                              c["valid"], cache_chunks=c["slice_point"])
  tokens = x.shape[2] * (c["h"] // 2) * (c["w"] // 2)
  rows = []
  for b in backends:
    call = jit_forward(model, backend=b)
    fn = lambda call=call: call(x, c["t"], y, mask, c["kv"], slice_point=c["slice_point"],
                                cache=cache)
    sec = _median_seconds(fn, reps)
    rows.append((b, sec, tokens / sec, _flops(call, x, c["t"], y, mask, c["kv"],
                                             slice_point=c["slice_point"], cache=cache)))
  base = rows[0][1]
  print(f"\n== {name}: {tokens} query tokens, {c['slice_point']} cached chunks, "
        f"{jax.default_backend()} ==")
  print(f"{'backend':<12} {'median s':>9} {'tokens/s':>11} {'XLA GFLOP':>10} "
        f"{'vs ' + backends[0]:>12} {'vs official':>12}")
  for b, sec, tps, fl in rows:
    off = OFFICIAL_SECONDS.get(name)
    print(f"{b:<12} {sec:9.3f} {tps:11,.0f} {fl / 1e9:10.2f} {base / sec:11.2f}x "
          f"{(f'{off / sec:.2f}x' if off else '-'):>12}")


class _RandomRows:
  """Caption rows for the sampler case: one random row for every chunk, all tokens valid."""

  def __init__(self, m, valid, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    L, C = m.caption_max_length, m.caption_channels
    self.row = rng.standard_normal((L, C)).astype(np.float32)
    self.mask = (np.arange(L) < valid).astype(np.float32)

  def cond(self, chunk):
    del chunk
    return self.row, self.mask

  def null(self):
    return self.row * 0, self.mask


def run_sampler(backends):
  import jax
  from magi_jax.configs import magi_config_from_dict
  from magi_jax.diffusion import Sampler, SamplerOptions
  with open(PERF_FILE) as f:
    spec = json.load(f)
  cfg = magi_config_from_dict({k: spec[k] for k in ("model_config", "runtime_config",
                                                    "engine_config")})
  rt = cfg.runtime
  chunks = rt.num_frames // 4 // rt.chunk_width
  hw = (rt.video_size_h // 8, rt.video_size_w // 8)
  from flax import nnx
  from magi_jax.models import Precision, VideoDiT
  model = VideoDiT(cfg.model, precision=Precision.fp32(), distill=cfg.engine.distill,
                   rngs=nnx.Rngs(0))
  print(f"\n== sampler: {chunks} chunks, window {rt.window_size}, {rt.num_steps} steps, "
        f"cfg {rt.cfg_number}, {jax.default_backend()} (seconds per chunk) ==")
  print(f"{'backend':<12} {'first run':>10} {'compiled':>10} {'first vs official':>18} "
        f"{'compiled vs official':>21}")
  off = OFFICIAL_SECONDS["sampler_per_chunk"]
  for b in backends:
    if b == "reference":
      continue
    sampler = Sampler(model, cfg, options=SamplerOptions(backend=b))
    rows = _RandomRows(cfg.model, spec["cases"]["sampler"]["caption_valid"])
    times = []
    for _ in range(2):
      t0 = time.perf_counter()
      for c in sampler.sample(rows, latent_hw=hw, num_chunks=chunks, key=jax.random.key(0)):
        c.latent.block_until_ready()
      times.append((time.perf_counter() - t0) / chunks)
    print(f"{b:<12} {times[0]:10.2f} {times[1]:10.2f} {off / times[0]:17.2f}x "
          f"{off / times[1]:20.2f}x")


def run_gpu(reps):
  import jax
  import numpy as np
  from magi_jax.configs import get_preset
  from magi_jax.official.forward import jit_forward
  if jax.default_backend() != "gpu":
    print("\n== gpu720p: skipped (no GPU) ==")
    return
  m = get_preset("4.5B_base").model
  model = _model(m, "bf16")
  chunk_width, h, w = 6, 90, 160
  tokens_per_chunk = chunk_width * (h // 2) * (w // 2)
  x, y, mask, cache = _inputs(m, 1, chunk_width, h, w, 100, cache_chunks=3, dtype="bfloat16")
  kv = np.array([[0, 4 * tokens_per_chunk]])
  t = np.array([[0.5]], np.float32)
  for b in ("dot_product", "flash"):
    call = jit_forward(model, backend=b)
    sec = _median_seconds(lambda call=call: call(x, t, y, mask, kv, slice_point=3, cache=cache),
                          reps)
    # Analytic FLOPs: 2·params-per-token GEMMs + attention (QK and PV over 4 chunks of keys).
    D, L, P = m.hidden_size, m.num_layers, m.num_attention_heads * m.kv_channels
    G = m.num_query_groups * m.kv_channels
    flops_per_token = 2 * L * (2 * P * D + 2 * G * D + 2 * P * D + D * m.ffn_hidden_size * 2)
    attn = 2 * 2 * L * P * tokens_per_chunk * (4 * tokens_per_chunk)
    flops = flops_per_token * tokens_per_chunk + attn
    tf = flops / sec / 1e12
    print(f"\n== gpu720p [{b}]: 4.5B bf16, {tokens_per_chunk} tokens + {3 * tokens_per_chunk} "
          f"cached: {sec * 1e3:.1f} ms, "
          f"{tf:.1f} TFLOP/s = {tf / FLAGS.peak_tflops:.1%} of {FLAGS.peak_tflops:g} peak ==")


def main(argv):
  del argv
  from benchmarks import chunk_tiles
  chunk_tiles.register()
  for name in FLAGS.cases:
    if name == "gpu720p":
      run_gpu(FLAGS.reps)
    elif name == "sampler":
      run_sampler(FLAGS.backends)
    else:
      run_case(name, FLAGS.backends, FLAGS.reps)


if __name__ == "__main__":
  app.run(main)
