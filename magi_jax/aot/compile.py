"""Lower and compile one program for the topology; read its memory analysis, or the refusal.

Every program lowers and compiles inside `use_mesh(job.mesh, job.rules)`: activations are
placed by the rules and `target_platform()` is 'tpu', so the 'auto' attention backend picks the
TPU kernels; Pallas kernels need the mesh set while they lower. A program the compiler refuses
for memory ("... exceeds available HBM", RESOURCE_EXHAUSTED) is reported with fits false and
the compiler's message; every other error propagates.
"""

from __future__ import annotations

import re
import time

from magi_jax.aot.programs import Program
from magi_jax.aot.report import GIB, ProgramReport
from magi_jax.parallel.rules import use_mesh

_OOM = ("RESOURCE_EXHAUSTED", "exceeds available HBM", "Ran out of memory")
_REQUIRED = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\)")
_AVAILABLE = re.compile(r"available HBM \(([\d.]+)([KMGT])\)")
_UNIT = {"K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 1024.0}


def is_out_of_memory(err: Exception) -> bool:
  return any(s in str(err) for s in _OOM)


def _gib(pattern, text: str) -> float | None:
  m = pattern.search(text)
  return None if m is None else float(m.group(1)) * _UNIT[m.group(2)]


def refusal_message(err: Exception) -> str:
  """The compiler's sentence, without the stack of source locations it may append."""
  text = str(err).strip()
  for line in text.splitlines():
    if any(s in line for s in _OOM):
      return line.strip()
  return text.splitlines()[0] if text else type(err).__name__


def compile_program(job, program: Program, echo=None) -> ProgramReport:
  base = dict(job=job.kind, program=program.name, preset=job.preset, topology=job.topology.name,
              mesh=job.mesh_desc, devices=job.topology.num_devices,
              chips=job.topology.num_chips, notes=program.notes,
              lora_rank=job.lora.rank if job.lora else 0,
              lora_alpha=job.lora.alpha if job.lora else None,
              trainable_params=program.trainable_params)
  hbm = job.topology.chip.usable_gib
  if echo:
    echo(f"compiling {job.kind}/{program.name} for {job.topology.name} (mesh {job.mesh_desc})")
  t0 = time.perf_counter()
  with use_mesh(job.mesh, job.rules):
    lowered = program.lower()
    t1 = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:          # XlaRuntimeError / JaxRuntimeError; others re-raised
      if not is_out_of_memory(e):
        raise
      t2 = time.perf_counter()
      msg = refusal_message(e)
      return ProgramReport(**base, hbm_gib=_gib(_AVAILABLE, msg) or hbm, fits=False,
                           compile_s=t2 - t0, lower_s=t1 - t0,
                           args_gib=program.argument_bytes() / GIB, output_gib=None,
                           alias_gib=None, temp_gib=None, peak_gib=_gib(_REQUIRED, msg),
                           error=msg)
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  # The compiler's own peak (buffer assignment's live maximum) where it reports one; the sum
  # of the four sizes overstates it (outputs and temporaries need not be live together) and
  # can miss buffers the temp figure does not count.
  peak = getattr(mem, "peak_memory_in_bytes", 0) or (args + out - alias + temp)
  return ProgramReport(**base, hbm_gib=hbm, fits=True, compile_s=t2 - t0, lower_s=t1 - t0,
                       args_gib=args / GIB, output_gib=out / GIB, alias_gib=alias / GIB,
                       temp_gib=temp / GIB, peak_gib=peak / GIB)
