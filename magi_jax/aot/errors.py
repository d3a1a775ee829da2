"""The planner's one error type for bad requests (exit status 2 from the command)."""

from magi_jax.errors import MagiError


class AOTError(MagiError, ValueError):
  """A planning request that cannot be compiled as asked: an unknown topology or chip kind,
  libtpu missing, a mesh that does not fit the devices, an impossible video size. Raised
  before anything is compiled; the message names the flag and the rule."""
