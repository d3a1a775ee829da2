"""The one base of every error magi_jax raises on purpose.

`MagiError` means "the input, configuration or files are wrong, and the message says how";
catch it to report such errors without a traceback (experiments/sample.py does). Each typed
error subclasses it together with the builtin it is (ValueError, RuntimeError,
FileNotFoundError), so `except ValueError` still catches it.
"""


class MagiError(Exception):
  """An error of magi_jax's own, with a message naming the problem."""
