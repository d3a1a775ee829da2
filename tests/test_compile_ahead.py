"""The sampler's steps compiled ahead in the background (magi_jax/diffusion/ahead.py).

For a video's plan, `compile_ahead` must produce exactly the signatures the sampler then calls
(every call runs an executable compiled ahead, none falls back to the jit): base (three-pass
guidance, refresh calls, cached chunks, an I2V prefix) and distilled (one pass, nearly-clean
copy, step size, bf16 KV cache); for the base video the chunks must be bitwise those of a
sampler that jits each step on first use. `build_from_config` starts the request's compiles
before the VAE and the text encoder load.
"""

import os

import jax
import numpy as np
import pytest

from conftest import make_model
from magi_jax.configs import tiny_config
from magi_jax.diffusion import Sampler, SamplerOptions
from magi_jax.diffusion.ahead import compile_ahead
from magi_jax.models import Precision
from magi_jax.text import ChunkTextRows, TextFlags

F32 = np.float32
HW, L, C_CAP = (4, 4), 64, 32          # latent size, caption length / channels of the tiny DiT


def _text(n, clean=0):
  r = np.random.default_rng(0)
  embs = r.standard_normal((1, L, C_CAP)).astype(F32)
  masks = (np.arange(L) < 13)[None].astype(F32)
  null = np.random.default_rng(1).standard_normal((L, C_CAP)).astype(F32)
  return ChunkTextRows(embs, masks, null, infer_chunk_num=n, clean_chunk_num=clean,
                       flags=TextFlags.none())


def _chunks(sampler, n, prefix):
  return [np.asarray(c.latent) for c in sampler.sample(
      _text(n), latent_hw=HW, num_chunks=n, key=jax.random.key(3), prefix=prefix)]


CASES = {
    # 3 chunks, window 2: refresh calls, cached chunks, cfg 3, the I2V frame in chunk 0.
    "base_i2v": dict(cfg=tiny_config(), distill=False, precision=Precision.fp32(), prefix=1,
                     compare=True),
    # cfg 1 with the nearly-clean copy and the step size, bf16 activations and KV cache.
    "distill_bf16": dict(cfg=tiny_config().replace(runtime={"cfg_number": 1},
                                                   engine={"distill": True}),
                         distill=True, precision=Precision.bf16(), prefix=0, compare=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_call_runs_a_step_compiled_ahead_and_the_chunks_match_the_jit(case):
  c = CASES[case]
  model = make_model(precision=c["precision"], distill=c["distill"])
  opts = SamplerOptions(backend="reference")
  n = 3
  prefix = None
  if c["prefix"]:
    prefix = np.random.default_rng(5).standard_normal((1, 16, c["prefix"]) + HW).astype(F32)
  ahead_sampler = Sampler(model, c["cfg"], options=opts)
  ahead = compile_ahead(ahead_sampler, latent_hw=HW, num_chunks=n,
                        prefix_latent_frames=c["prefix"], workers=2)
  assert ahead.wait() == len(ahead.futures) > 1
  got = _chunks(ahead_sampler, n, prefix)
  stats = ahead_sampler.step.stats()
  calls = len(list(ahead_sampler.calls(n, c["prefix"], 8)))
  assert stats == {"ahead": calls, "jit": 0, "compiled_ahead": len(ahead.futures)}, stats
  assert ahead_sampler.compilations() == len(ahead.futures)   # no signature left out

  assert len(got) == n
  if not c["compare"]:     # the executables are the jitted step's own: compared once (base)
    return
  want = _chunks(Sampler(model, c["cfg"], options=opts), n, prefix)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_build_from_config_compiles_the_requests_steps_before_the_first_call(tmp_path):
  from experiments.configs import tiny
  from magi_jax.generate import build_from_config, generate
  c = tiny.get_config()
  c.output = os.path.join(tmp_path, "t2v.mp4")
  c.progress = False
  comp, req, flags, opts = build_from_config(c)
  assert comp.ahead is not None and comp.ahead.futures
  res = generate(comp, req, flags=flags, options=opts, progress=False, log=lambda s: None)
  assert res.frames == 24
  stats = comp.sampler(opts).step.stats()
  assert stats["jit"] == 0 and stats["ahead"] > 0, stats

  c.compile_ahead = False
  c.output = os.path.join(tmp_path, "t2v_jit.mp4")
  comp, *_ = build_from_config(c)
  assert comp.ahead is None
