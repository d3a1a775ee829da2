"""`dit_sample_cfg3` / `dit_sample_cfg1`: the whole autoregressive sampling loop.

From the fixture's noise and text rows, the port's sampler runs every step; each call's input
x (refresh chunk and prefix padding included), timesteps, kv ranges and guided velocity are
compared with the official dispatcher's, then the final latent (all emitted chunks) at 5e-4
(the reference's own fp32-vs-float64 spread is ~8e-5). cfg1 applies the config's
`distill_variant_overrides` (cfg_number 1, distill) to the same weights.
"""

from __future__ import annotations

import json

import numpy as np

from magi_jax.official.dit import load_official_dit
from magi_jax.models import Precision
from magi_jax.official.parity import fixtures
from magi_jax.official.parity.compare import compare, failure

FINAL_ATOL, FINAL_RTOL = 5e-4, 1e-4
# Per call: the cfg3 velocity is a combination with text scale 7.5, which scales the noise.
CALL_ATOL, CALL_RTOL = 2e-4, 1e-4


def _config(directory: str, variant: str):
  cfg = fixtures.dit_config(directory)
  if variant == "cfg1":
    with open(fixtures.path(directory, "dit_config.json")) as f:
      overrides = json.load(f).get("distill_variant_overrides", {})
    sections = {}
    for dotted, value in overrides.items():
      section, field = dotted.split(".")
      sections.setdefault(section.replace("_config", ""), {})[field] = value
    cfg = cfg.replace(**sections)
  return cfg


def run_variant(directory: str, variant: str, *, activations: bool = False,
                backend: str = "reference"):
  from magi_jax.diffusion import Sampler, SamplerOptions
  from magi_jax.text import ArrayTextRows
  name = f"dit_sample_{variant}"
  cfg = _config(directory, variant)
  d, meta = fixtures.tensors(directory, f"{name}.safetensors")
  model = load_official_dit(fixtures.dit_weights(directory), cfg.model,
                            precision=Precision.fp32(), distill=cfg.engine.distill)
  sampler = Sampler(model, cfg, options=SamplerOptions(backend=backend))
  noise = d["in.noise"]
  chunk_width = cfg.runtime.chunk_width
  records = []
  chunks = list(sampler.sample(ArrayTextRows(d["derived.y"], d["derived.emb_masks"]),
                               latent_hw=noise.shape[3:], num_chunks=noise.shape[2] // chunk_width,
                               noise=noise, on_call=records.append))
  results = []
  n_ref = int(meta.get("num_calls", 0))
  if n_ref and n_ref != len(records):
    results.append(failure(f"{name}/calls", f"{len(records)} calls, reference made {n_ref}"))
  worst = {"x": [], "t": [], "kv_range": [], "velocity": []}
  for i, r in enumerate(records[:n_ref]):
    key = f"call{i:02d}"
    off = chunk_width if r.plan.refresh else 0
    pairs = {"x": (r.x, d[f"{key}.x"]), "t": (r.t, d[f"{key}.timestep"][0]),
             "kv_range": (r.kv_range, d[f"{key}.kv_range"]),
             "velocity": (r.velocity, d[f"{key}.out"][:, :, off:])}
    for field, (got, want) in pairs.items():
      tol = (0.0, 0.0) if field in ("t", "kv_range") else (CALL_ATOL, CALL_RTOL)
      res = compare(f"{name}/{key}.{field}", got, want, atol=tol[0], rtol=tol[1])
      worst[field].append(res)
      if activations:
        results.append(res)
  if not activations:      # one line per field: the worst call
    for field, rs in worst.items():
      if rs:
        bad = [r for r in rs if not r.ok]
        pick = bad[0] if bad else max(rs, key=lambda r: r.max_abs)
        pick.name = f"{name}/per-call {field} ({len(rs)} calls, worst shown)"
        results.append(pick)
  final = np.concatenate([np.asarray(c.latent) for c in chunks], axis=2)
  results.append(compare(f"{name}/final_latent", final, d["out.final_latent"],
                         atol=FINAL_ATOL, rtol=FINAL_RTOL))
  return results


def run_cfg3(directory, **kw):
  return run_variant(directory, "cfg3", **kw)


def run_cfg1(directory, **kw):
  return run_variant(directory, "cfg1", **kw)
