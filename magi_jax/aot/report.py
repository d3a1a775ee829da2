"""One program's answer: per-device memory from the TPU compiler, or its refusal.

peak_gib is the compiler's peak memory per device (`peak_memory_in_bytes` of its memory
analysis: the most its buffers hold at once, arguments included); where a compiler reports no
peak, arguments + outputs - aliased + temporaries. When the compiler refuses a
program, peak_gib is the "total memory required" figure of its message (it counts arguments,
outputs and temporaries the same way), args_gib is computed from the input shardings, and
temp_gib is null. GiB = 2^30 bytes; the compiler's own "G" figures are GiB too.

Train and distill steps also report trainable_params (the parameters the step updates: every
weight, or with --lora_rank only the adapters) and lora_rank / lora_alpha (0 / null: full
training).
"""

from __future__ import annotations

import dataclasses
import json

GIB = 2 ** 30


@dataclasses.dataclass
class ProgramReport:
  job: str
  program: str
  preset: str
  topology: str
  mesh: str
  devices: int
  chips: int                   # v4 / tpu7x: two devices per chip
  hbm_gib: float               # per device, the compiler's available HBM
  fits: bool
  compile_s: float             # lower + compile, seconds
  lower_s: float
  args_gib: float | None
  output_gib: float | None
  alias_gib: float | None
  temp_gib: float | None
  peak_gib: float | None
  error: str | None = None     # the compiler's message when it refuses the program
  notes: str = ""
  lora_rank: int = 0           # train / distill: > 0 a LoRA fine-tune (adapters only train)
  lora_alpha: float | None = None
  trainable_params: int | None = None   # train / distill: parameters the step updates

  def describe_job(self) -> str:
    """'train', 'train (LoRA rank 16, alpha 16)'."""
    if not self.lora_rank:
      return self.job
    return f"{self.job} (LoRA rank {self.lora_rank}, alpha {self.lora_alpha:g})"

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    for k, v in d.items():
      if isinstance(v, float):
        d[k] = round(v, 3)
    return json.dumps(d)


_COLUMNS = (("program", "program", "{}"), ("args", "args_gib", "{:.2f}"),
            ("temp", "temp_gib", "{:.2f}"), ("peak", "peak_gib", "{:.2f}"),
            ("HBM", "hbm_gib", "{:.2f}"), ("fits", "fits", "{}"),
            ("compile s", "compile_s", "{:.1f}"))


def table(reports: list[ProgramReport]) -> str:
  """A readable table (GiB per device), then each program's notes and refusal messages."""
  if not reports:
    return "(no programs)"
  r0 = reports[0]
  trainable = ("" if r0.trainable_params is None
               else f"; {r0.trainable_params:,} trainable parameters")
  head = (f"{r0.describe_job()} {r0.preset} on {r0.topology} ({r0.chips} chips, {r0.devices} "
          f"devices, mesh {r0.mesh}){trainable}; GiB per device")
  cells = [[h for h, _, _ in _COLUMNS]]
  for r in reports:
    row = []
    for _, attr, fmt in _COLUMNS:
      v = getattr(r, attr)
      row.append("-" if v is None else ("yes" if v is True else "NO" if v is False
                                        else fmt.format(v)))
    cells.append(row)
  widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
  lines = [head] + ["  ".join(c.rjust(wd) if i else c.ljust(wd)
                              for i, (c, wd) in enumerate(zip(row, widths))) for row in cells]
  for r in reports:
    if r.notes:
      lines.append(f"  {r.program}: {r.notes}")
    if r.error:
      lines.append(f"  {r.program} refused: {r.error}")
  return "\n".join(lines)
