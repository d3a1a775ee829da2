"""`dit_forward`: one official `VideoDiTModel.forward` call against the port in float32."""

from __future__ import annotations

import numpy as np

from magi_jax.official.dit import load_official_dit
from magi_jax.official.forward import official_forward, rope_for_call
from magi_jax.models import Precision
from magi_jax.models.embedders import distill_step_size
from magi_jax.official.parity import fixtures
from magi_jax.official.parity.compare import compare

FILE = "dit_forward.safetensors"
ATOL, RTOL = 1e-4, 1e-4
# Intermediate activations: the reference's own fp32-vs-fp64 spread reaches ~9e-5 there.
ACT_ATOL, ACT_RTOL = 2e-4, 1e-4


def run(directory: str, *, activations: bool = False, backend: str = "reference"):
  cfg = fixtures.dit_config(directory)
  data, meta = fixtures.tensors(directory, FILE)
  kw = meta.get("kwargs", {})
  model = load_official_dit(fixtures.dit_weights(directory), cfg.model,
                            precision=Precision.fp32(), distill=cfg.engine.distill)
  step = None
  if cfg.engine.distill:
    step = distill_step_size(kw.get("num_steps", cfg.runtime.num_steps),
                             kw.get("distill_interval"))
  x = data["fwd.in.x"]
  out = official_forward(model, x, data["fwd.in.t"], data["fwd.in.y"],
                         data["fwd.in.xattn_mask"], data["fwd.in.kv_range"],
                         data["fwd.in.caption_dropout_mask"].astype(bool),
                         slice_point=int(kw.get("slice_point", 0)),
                         chunk_width=kw.get("chunk_width"), step_size=step, backend=backend,
                         return_activations=activations)
  results = [compare("dit_forward", out.velocity, data["fwd.out"], atol=ATOL, rtol=RTOL)]
  if activations:
    for name, got in out.activations.items():
      key = f"fwd.act.{name}"
      if key not in data:
        continue
      want = data[key]
      if got.ndim == 3 and want.ndim == 3 and got.shape != want.shape:
        got = np.swapaxes(np.asarray(got), 0, 1)        # (N,S,D) -> official (S,N,D)
      results.append(compare(f"dit_forward/{name}", got, want, atol=ACT_ATOL, rtol=ACT_RTOL))
    if "fwd.rope" in data:
      _, _, T, H, W = x.shape
      p, pt = cfg.model.patch_size, cfg.model.t_patch_size
      chunks_in_flight = data["fwd.in.t"].shape[1]
      chunk_width = kw.get("chunk_width") or T // chunks_in_flight
      table = rope_for_call(model, T // pt, H // p, W // p, int(kw.get("slice_point", 0)),
                            chunk_width)
      results.append(compare("dit_forward/rope", table, data["fwd.rope"], atol=1e-5, rtol=1e-5))
  return results
