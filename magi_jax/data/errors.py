"""The one error type of `magi_jax.data`.

Data problems (a video without a caption, a clip longer than its video, an example that does not
fit a packing bin) are the user's to fix, so each message names the file or item and the rule it
broke. It subclasses ValueError so callers that already catch bad-input errors keep working.
"""

from __future__ import annotations

from magi_jax.errors import MagiError


class DataError(MagiError, ValueError):
  """Bad training data: a file, caption, example or pipeline argument that breaks a rule."""
