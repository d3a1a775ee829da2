"""Capacity planning: compile the project's real programs for a TPU topology, ahead of time.

`python -m magi_jax.aot --job=sample|train --preset=... --topology=v5e:2x2 [--mesh=...]`
answers "does this job fit on this slice, with this mesh?" with the TPU compiler's own
per-device memory analysis (or its refusal), on a machine without TPUs (libtpu's topology
descriptions: `pip install -e ".[aot]"`). `plan(...)` is the same as a function.
"""

from magi_jax.aot.errors import AOTError
from magi_jax.aot.plan import plan, resolve
from magi_jax.aot.report import ProgramReport

__all__ = ["AOTError", "ProgramReport", "plan", "resolve"]
