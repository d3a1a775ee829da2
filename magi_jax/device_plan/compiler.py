"""The compiler's figure for a memory plan: the plan's real programs compiled for this runtime.

`check(plan)` compiles the sampler's steady-state steps and one VAE decode tile (and the T5
encoder when the plan keeps it on the device) for the machine's own devices, with abstract
weights (nothing is allocated), through the capacity planner (`magi_jax.aot`, the same
programs it compiles for TPU slices), and puts the compiler's peaks in place of the estimate:
sampling = the largest step's peak (its arguments include the DiT's weights and the KV cache)
plus the VAE's weights, which stay loaded; decode = the tile's peak plus the DiT's weights and
the cache. A TPU compiler also refuses what does not fit; a GPU or CPU compiler does not, so
the peaks are compared with the plan's budget here.
"""

from __future__ import annotations

import dataclasses

from magi_jax.aot import plan as aot_plan
from magi_jax.aot.topology import local_topology
from magi_jax.device_plan.estimate import GIB
from magi_jax.device_plan.plan import MemoryPlan


def check(plan: MemoryPlan, echo=None) -> MemoryPlan:
  programs = ["step", "vae"] + (["t5"] if plan.t5_device == "" else [])
  topo = local_topology(plan.runtime.device_gib, plan.runtime.label)
  reports = aot_plan(job="sample", preset=plan.preset, topology=topo, height=plan.height,
                     width=plan.width, programs=",".join(programs), t5_dtype=plan.t5_dtype,
                     dit_weights=plan.dit_weights, echo=echo)
  steps = [r for r in reports if r.program.startswith("step")]
  vae = [r for r in reports if r.program == "vae"]
  t5 = [r for r in reports if r.program == "t5"]
  parts = plan.parts
  refused = [r for r in reports if not r.fits]
  sampling = max(r.peak_gib or 0.0 for r in steps) + parts.vae_weights / GIB
  dit = parts.dit_int8 if plan.dit_weights == "int8" else parts.dit_weights
  decode = max(r.peak_gib or 0.0 for r in vae) + (dit + parts.kv_cache) / GIB
  text = plan.text_gib
  if t5 and plan.text_first:
    text = t5[0].peak_gib or text
  elif t5:
    sampling += t5[0].args_gib or 0.0                 # T5 stays loaded next to the DiT
  fits = not refused and max(sampling, decode, text) <= plan.budget_gib
  problem = plan.problem
  if refused:
    problem = "; ".join(f"the compiler refuses {r.program}: {r.error}" for r in refused)
  elif not fits:
    problem = (f"the compiler's peaks (sampling {sampling:.2f}, decode {decode:.2f}, text "
               f"{text:.2f} GiB) exceed the budget of {plan.budget_gib:.2f} GiB")
  return dataclasses.replace(plan, compiler=tuple(reports), sampling_gib=sampling,
                             decode_gib=decode, text_gib=text, fits=fits and plan.fits,
                             problem=problem if not (fits and plan.fits) else "")
