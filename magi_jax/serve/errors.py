"""The typed errors of the web app: the server's own settings, and a page's bad form.

`ServeError`: the command's settings (`--port`, a checkpoint the server cannot stream, gradio
missing); `FormError`: a field of the page (it is a `RequestError`, so what catches a bad
request catches it too). Both name the flag or the page field to change.
"""

from __future__ import annotations

from magi_jax.errors import MagiError
from magi_jax.generate.request import RequestError


class ServeError(MagiError, ValueError):
  """A setting of the server (a flag or a config field) it cannot start with."""


class FormError(RequestError):
  """A field of the page's form that cannot be sampled; the message names the field."""
