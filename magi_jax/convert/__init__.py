"""Checkpoint conversion: official MAGI-1 checkpoints <-> magi_jax's orbax checkpoints.

`python -m magi_jax.convert` is the command; the official layouts it reads and writes live in
`magi_jax.official`, the file formats in `magi_jax.formats`.
"""

from magi_jax.convert.orbax_io import load_converted, save_converted

__all__ = ["load_converted", "save_converted"]
