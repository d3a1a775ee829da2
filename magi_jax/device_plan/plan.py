"""A memory plan for sampling on one device: what fits where, decided before anything loads.

`choose(preset, runtime)` picks, in this order of preference:

* the text encoder (T5): float32 (the official dtype) kept on the device next to the DiT when
  both fit; else float32 on the device, encoding the prompts and freed before the DiT loads
  (`text_first`); else float32 on the host CPU (the official runtime_config.t5_device), then
  freed; else bfloat16 on the device, then freed (rows differ from float32 in the last bits);
  else bfloat16 on the host; else it does not fit;
* the video size: the one asked for, or with none asked, the preset's, else the largest
  standard size (aot/sizes.py STANDARD_RESOLUTIONS) below it whose sampling peak fits: the DiT's
  weights, the steady state's KV cache, the largest step's temporaries and the VAE's weights
  (and, while a chunk decodes, the VAE tile's temporaries instead of the step's), with 5% of
  the device kept free;
* the DiT in bf16 (the official policy); where no size fits with bf16 weights, int8 layer
  weights (models/quant.py: per-channel, weight-only, about half the bytes; an approximation
  of the model), again at the largest size that fits; where nothing fits, the plan says so
  and what would (a smaller preset or a larger device).

The VAE always decodes chunk by chunk in temporal and spatial tiles (the pipeline's tiled
decode); the window and kv ranges stay the preset's (the steady state is already bounded by
them). Sizes come from device_plan/estimate.py; `compiler.check(plan)` asks the compiler.
"""

from __future__ import annotations

import dataclasses

from magi_jax.aot import components
from magi_jax.aot.sizes import STANDARD_RESOLUTIONS
from magi_jax.configs import MagiConfig, get_preset
from magi_jax.device_plan.detect import Runtime
from magi_jax.device_plan.estimate import GIB, PartSizes, part_sizes
from magi_jax.errors import MagiError

HEADROOM = 0.05              # of the device's memory, kept free


class PlanError(MagiError, ValueError):
  """The job does not fit this runtime (the message says what would)."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  runtime: Runtime
  preset: str
  height: int
  width: int
  size_note: str               # why this size
  precision: str               # the DiT's: bf16 | fp32
  dit_weights: str             # bf16 (as `precision`) | int8
  t5_dtype: str                # float32 | bfloat16
  t5_device: str               # "" (the accelerator) | "cpu"
  text_first: bool             # encode the prompts, free T5, then load the DiT
  parts: PartSizes
  vae_tile: tuple[int, int, int]
  sampling_gib: float          # the device's peak while a step runs (estimate)
  decode_gib: float            # ... while a chunk decodes
  text_gib: float              # T5 while it encodes, on its device
  budget_gib: float            # the device's memory less the headroom
  fits: bool
  problem: str = ""            # why it does not fit, and what would
  compiler: tuple = ()         # ProgramReports of compiler.check

  def describe(self) -> str:
    p, g = self.parts, _gib
    t5_where = "the host CPU" if self.t5_device == "cpu" else "the device"
    t5_when = ("encodes the prompts first and is freed before the DiT loads" if self.text_first
               else "stays loaded next to the DiT")
    lines = [
        f"runtime: {self.runtime.describe()}",
        f"model: {self.preset}, DiT "
        f"{self.dit_weights if self.dit_weights == 'int8' else self.precision} weights"
        f" {g(_bytes(self.precision, p, self.dit_weights))}"
        + (" (int8 layer weights: bf16 does not fit; an approximation of the model)"
           if self.dit_weights == "int8" else ""),
        f"video: {self.height}x{self.width} ({self.size_note})",
        f"T5: {self.t5_dtype} on {t5_where} ({g(p.t5_weights(self.t5_dtype))}), {t5_when}",
        f"VAE: decodes chunk by chunk in {self.vae_tile[0]}x{self.vae_tile[1]}x"
        f"{self.vae_tile[2]}-latent tiles (weights {g(p.vae_weights)})",
        f"peak ({'the compiler' if self.compiler else 'estimate'}): sampling "
        f"{g(self.sampling_gib * GIB)} (KV cache {g(p.kv_cache)}, largest step "
        f"{g(p.step_temp)} estimated for {p.step_tokens:,} tokens), decode "
        f"{g(self.decode_gib * GIB)}, text {g(self.text_gib * GIB)}"
        f"{' on the host' if self.t5_device == 'cpu' else ''}; device budget "
        f"{g(self.budget_gib * GIB)}",
    ]
    for r in self.compiler:
      verdict = f"peak {_gib(r.peak_gib * GIB)}" if r.peak_gib is not None else "no figure"
      lines.append(f"compiler: {r.program}: {verdict}, fits {r.fits}"
                   + (f" ({r.error})" if r.error else ""))
    lines.append("fits: yes" if self.fits else f"fits: NO: {self.problem}")
    return "\n".join(lines)

  def require(self) -> MemoryPlan:
    if not self.fits:
      raise PlanError(f"{self.preset} on {self.runtime.label}: {self.problem}")
    return self

  def apply(self, c) -> None:
    """Sets the sampling config's fields (experiments/configs/sample_common.py) to the plan."""
    c.height, c.width = self.height, self.width
    c.t5_dtype, c.t5_device, c.text_first = self.t5_dtype, self.t5_device, self.text_first
    c.dit_weights = self.dit_weights


def _gib(b: float) -> str:
  """Bytes as GiB, or MiB below 0.1 GiB (the tiny preset)."""
  return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2 ** 20:.2f} MiB"


def _bytes(cfg_precision: str, parts: PartSizes, weights: str = "bf16") -> int:
  if weights == "int8":
    return parts.dit_int8
  return parts.dit_weights * (2 if cfg_precision == "fp32" else 1)


def _peaks(parts: PartSizes, precision: str, weights: str = "bf16") -> tuple[float, float]:
  dit = _bytes(precision, parts, weights)
  sampling = dit + parts.kv_cache + parts.step_temp + parts.vae_weights
  decode = dit + parts.kv_cache + parts.vae_weights + parts.vae_decode_temp
  return sampling / GIB, decode / GIB


def _sizes(cfg: MagiConfig, height: int, width: int) -> list[tuple[int, int, str]]:
  rt = cfg.runtime
  if height or width:
    return [(height or rt.video_size_h, width or rt.video_size_w, "as asked")]
  first = (rt.video_size_h, rt.video_size_w)
  out = [first + ("the preset's",)]
  for h, w in STANDARD_RESOLUTIONS:
    if h * w < first[0] * first[1]:
      out.append((h, w, f"the largest standard size that fits (the preset's {first[0]}x"
                        f"{first[1]} does not)"))
  return out


def _text(parts: PartSizes, runtime: Runtime, budget: float, sampling_gib: float):
  """(t5_dtype, t5_device, text_first, text_gib) or None when T5 fits nowhere."""
  host = runtime.host_gib * (1 - HEADROOM) - 2.0        # the host also holds this process
  on_device = runtime.platform != "cpu"
  for dtype in ("float32", "bfloat16"):
    need = (parts.t5_weights(dtype) + parts.t5_temp) / GIB
    if dtype == "float32" and sampling_gib + need <= budget:
      return dtype, "", False, need
    if need <= budget:
      return dtype, "", True, need
    if on_device and dtype == "float32" and need <= host:
      return dtype, "cpu", True, need
  need = (parts.t5_weights("bfloat16") + parts.t5_temp) / GIB
  if on_device and need <= host:
    return "bfloat16", "cpu", True, need
  return None


def choose(preset: str, runtime: Runtime, *, height: int = 0, width: int = 0,
           precision: str = "bf16") -> MemoryPlan:
  cfg = get_preset(preset)
  budget = runtime.device_gib * (1 - HEADROOM)
  sizes = [(h, w, note, part_sizes(cfg, h, w)) for h, w, note in _sizes(cfg, height, width)]
  tried, chosen = [], None      # (h, w, note, parts, sampling, decode, weights), in order
  for weights in ("bf16", "int8"):
    for h, w, note, parts in sizes:
      sampling, decode = _peaks(parts, precision, weights)
      tried.append((h, w, note, parts, sampling, decode, weights))
      if max(sampling, decode) <= budget:
        chosen = tried[-1]
        break
    if chosen:
      break
  fits = chosen is not None
  h, w, note, parts, sampling, decode, weights = chosen or tried[0]   # else: the size asked for
  vcfg = components.vae_config(cfg)
  tile = components.decode_tile(vcfg, cfg.runtime.chunk_width, h // 8, w // 8)
  problem = ""
  text = _text(parts, runtime, budget, sampling)
  if not fits:
    # The size asked for, and the smallest size with each kind of weights.
    shown = dict.fromkeys((0, len(sizes) - 1, len(tried) - 1))
    needs = "; ".join(f"{t[0]}x{t[1]} needs {max(t[4], t[5]):.2f} GiB with {t[6]} weights"
                      for t in (tried[i] for i in shown))
    problem = (f"{needs}, of the {budget:.2f} GiB this device can give (the DiT's "
               f"weights alone are {parts.dit_weights / GIB:.2f} GiB in bf16, "
               f"{parts.dit_int8 / GIB:.2f} in int8): use a smaller preset (4.5B_distill) or "
               "a device with more memory")
  elif text is None:
    fits = False
    problem = (f"T5 ({parts.t5_weights('bfloat16') / GIB:.2f} GiB in bfloat16) fits neither "
               f"the device ({budget:.2f} GiB) nor the host ({runtime.host_gib:.1f} GiB "
               "available): precompute the prompt rows on another machine (text cache)")
  t5_dtype, t5_device, text_first, text_gib = text or ("bfloat16", "", True, 0.0)
  return MemoryPlan(runtime=runtime, preset=preset, height=h, width=w, size_note=note,
                    precision=precision, dit_weights=weights, t5_dtype=t5_dtype,
                    t5_device=t5_device,
                    text_first=text_first, parts=parts, vae_tile=tile, sampling_gib=sampling,
                    decode_gib=decode, text_gib=text_gib, budget_gib=budget, fits=fits,
                    problem=problem)
