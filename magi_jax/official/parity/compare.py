"""Array comparison and the one-line report format of `python -m magi_jax.official.parity`."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Result:
  name: str
  max_abs: float
  max_rel: float
  ok: bool
  note: str = ""

  def line(self) -> str:
    status = "PASS" if self.ok else "FAIL"
    note = f"  ({self.note})" if self.note else ""
    return (f"{status}  {self.name:<48s} max_abs={self.max_abs:.3e}  "
            f"max_rel={self.max_rel:.3e}{note}")


def compare(name: str, got, want, *, atol: float, rtol: float) -> Result:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if got.shape != want.shape:
    return Result(name, float("nan"), float("nan"), False,
                  f"shape {got.shape} != reference {want.shape}")
  if not np.all(np.isfinite(got)):
    return Result(name, float("inf"), float("inf"), False, "non-finite values")
  diff = np.abs(got - want)
  rel = diff / np.maximum(np.abs(want), 1e-12)
  ok = bool(np.all(diff <= atol + rtol * np.abs(want)))
  return Result(name, float(diff.max(initial=0.0)), float(rel.max(initial=0.0)), ok,
                f"atol={atol:g} rtol={rtol:g}")


def failure(name: str, message: str) -> Result:
  return Result(name, float("nan"), float("nan"), False, message)
