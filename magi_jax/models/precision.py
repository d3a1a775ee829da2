"""The DiT precision policy.

The official model keeps a bf16 hidden stream and bf16 weights, with float32 islands (the
embedders, RoPE, the self-attention q/k norms, the output projection GEMM, gates times branch,
post-norms, residual adds and the final layer; official dit_module.py and its post-load dtype
promotion). `Precision.bf16()` reproduces that. `Precision.fp32()` turns every bf16 rounding point
into float32, which is what the official code does with float32 parameters: the parity fixtures and
tests use it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Precision:
  compute_dtype: jnp.dtype     # the dtype at every official bf16 rounding point
  param_dtype: jnp.dtype       # dtype of the parameters that are not promoted to float32
  # float32 GEMMs must be true float32 (PyTorch does not use TF32 for them).
  matmul: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @classmethod
  def fp32(cls) -> Precision:
    return cls(jnp.float32, jnp.float32)

  @classmethod
  def bf16(cls) -> Precision:
    return cls(jnp.bfloat16, jnp.bfloat16)

  @classmethod
  def named(cls, name: str) -> Precision:
    if name not in ("fp32", "bf16"):
      raise ValueError(f"precision must be 'fp32' or 'bf16', got {name!r}")
    return getattr(cls, name)()

  def low(self, x):
    """Round to the compute dtype (bf16 in the faithful mode)."""
    return x.astype(self.compute_dtype)
