"""`plan(...)`: resolve a request (every check before any compile), build, compile, report.

    from magi_jax.aot import plan
    reports = plan(job="train", preset="4.5B_base", topology="v5p:2x2x1", mesh="fsdp:4",
                   height=480, width=832, chunks=4)
    all(r.fits for r in reports)

Sizes: sample --chunks is the video length in chunks (default: enough for the steady state,
steady.default_chunks); train --chunks is the chunks per packed row (default: the preset's
num_frames, 4 for the 96-frame MAGI-1 presets), or --tokens per row (sizes.size_for_tokens);
on a mesh with context > 1 the chunk count must split over it (sizes.check_context_split).
Missing --height/--width take the preset's runtime video size.

LoRA (`lora_rank` > 0, train and distill jobs): the step trains adapters of that rank on
`train.lora.DEFAULT_TARGETS` (the fine-tuning configs' `lora.targets`) with `lora_alpha`
(default: the rank, so alpha / rank = 1), the base weights frozen; see train_programs.py.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

from magi_jax.aot.errors import AOTError
from magi_jax.aot.job import JOBS, Job, LoRA
from magi_jax.aot.mesh import build_mesh
from magi_jax.aot.programs import build_programs, select_families
from magi_jax.aot.report import ProgramReport
from magi_jax.aot.sizes import check_context_split, size_for_tokens, video_size
from magi_jax.aot.steady import default_chunks
from magi_jax.aot.topology import Topology, get_topology
from magi_jax.configs import ConfigError, MagiConfig, get_preset
from magi_jax.parallel.rules import ShardingRules

T5_DTYPES = ("float32", "bfloat16")


def _train_default_chunks(cfg: MagiConfig) -> int:
  rt = cfg.runtime
  return max(1, math.ceil(rt.num_frames / (rt.chunk_width * rt.temporal_downsample_factor)))


def resolve(*, job: str, preset: str, topology: str, mesh: str | None = None,
            height: int | None = None, width: int | None = None, chunks: int | None = None,
            batch: int = 1, tokens: int | None = None, programs: str | None = None,
            ema: bool = False, t5_dtype: str = "float32", dit_weights: str = "bf16",
            lora_rank: int = 0, lora_alpha: float | None = None,
            rules: ShardingRules | None = None) -> Job:
  """Checks every argument and builds the mesh; AOTError naming the flag otherwise."""
  if job not in JOBS:
    raise AOTError(f"--job={job!r}: choose one of {', '.join(JOBS)}")
  try:
    cfg = get_preset(preset)
  except ConfigError as e:
    raise AOTError(f"--preset: {e}") from None
  families = select_families(job, programs)
  if job == "distill" and cfg.engine.distill:
    raise AOTError(f"--preset={preset}: --job=distill distils a base model into a student; give "
                   "the teacher's base preset (e.g. 4.5B_base)")
  if job == "sample":
    if tokens is not None:
      raise AOTError("--tokens is for --job=train (a packed row's length); sampling takes "
                     "--height/--width/--chunks")
    if batch != 1:
      raise AOTError(f"--batch={batch}: the sampler generates one video (batch 1)")
    size = video_size(cfg, height, width, chunks, default_chunks(cfg))
  if dit_weights not in ("bf16", "int8"):
    raise AOTError(f"--dit_weights={dit_weights!r}: choose bf16 or int8")
  if dit_weights == "int8" and job != "sample":
    raise AOTError("--dit_weights=int8 is for --job=sample (int8 weights are for inference)")
  if t5_dtype not in T5_DTYPES:
    raise AOTError(f"--t5_dtype={t5_dtype!r}: choose one of {', '.join(T5_DTYPES)}")
  lora = resolve_lora(job, lora_rank, lora_alpha)
  topo = topology if isinstance(topology, Topology) else get_topology(topology)
  device_mesh, desc = build_mesh(mesh, job, topo.devices)
  if job in ("train", "distill"):
    if not isinstance(batch, int) or batch < 1:
      raise AOTError(f"--batch={batch}: must be a positive integer")
    context = int(device_mesh.shape.get("context", 1))
    if tokens is not None:
      if chunks is not None:
        raise AOTError("--tokens chooses the chunk count: give --tokens or --chunks, not both")
      size = size_for_tokens(cfg, tokens, height, width, context)
    else:
      size = video_size(cfg, height, width, chunks, _train_default_chunks(cfg))
    check_context_split(size, context)
  return Job(kind=job, preset=preset, cfg=cfg, topology=topo, mesh=device_mesh, mesh_desc=desc,
             rules=rules or ShardingRules(), size=size, batch=batch, programs=families,
             ema=ema, t5_dtype=t5_dtype, dit_weights=dit_weights, lora=lora)


def resolve_lora(job: str, rank, alpha) -> LoRA | None:
  """The LoRA adapters of a train / distill request (None: every weight trains)."""
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
    raise AOTError(f"--lora_rank={rank!r}: must be a non-negative integer (0: full training)")
  if not rank:
    if alpha is not None:
      raise AOTError(f"--lora_alpha={alpha!r} without --lora_rank: alpha scales LoRA adapters; "
                     "give --lora_rank=N (> 0) too")
    return None
  if job == "sample":
    raise AOTError(f"--lora_rank={rank} is for --job=train or --job=distill (the step that "
                   "trains the adapters); the sampler merges adapters into the base weights "
                   "(generate/trained.py): plan a LoRA model's sampling with --job=sample alone")
  if alpha is None:
    alpha = float(rank)
  if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
      or not math.isfinite(float(alpha))):
    raise AOTError(f"--lora_alpha={alpha!r}: must be a finite number")
  from magi_jax.train.lora import DEFAULT_TARGETS
  return LoRA(rank=int(rank), alpha=float(alpha), targets=DEFAULT_TARGETS)


def iter_plan(*, echo=None, **request) -> Iterator[ProgramReport]:
  """Resolves the request now (see `resolve` for the arguments; AOTError before anything
  compiles) and returns an iterator that compiles its programs one by one, yielding each
  report as it is made. `echo(str)` gets a progress line before each compile."""
  from magi_jax.aot.compile import compile_program
  job = resolve(**request)
  return (compile_program(job, p, echo) for p in build_programs(job))


def plan(*, echo=None, **request) -> list[ProgramReport]:
  """Every program's report, in order (`iter_plan` as a list)."""
  return list(iter_plan(echo=echo, **request))
