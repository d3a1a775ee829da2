"""Where the server listens: `check_listen(host, port)` before any weights load.

A port outside 1..65535, a host that does not resolve and an address already taken fail here
as a `ServeError` naming `--host` / `--port`, instead of after minutes of loading a model.
"""

from __future__ import annotations

import socket

from magi_jax.serve.errors import ServeError


def check_port(port) -> int:
  if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
    raise ServeError(f"--port={port}: give a TCP port in 1..65535 (default 7860)")
  return port


def check_listen(host: str, port: int) -> None:
  """Raises ServeError unless (host, port) can be listened on now."""
  check_port(port)
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise ServeError(f"--host={host}: not an address of this machine ({e.strerror}); use "
                     "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
  family, kind, proto, _, address = infos[0]
  with socket.socket(family, kind, proto) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as the web server binds
    try:
      s.bind(address)
    except OSError as e:
      raise ServeError(f"--port={port}: cannot listen on {host}:{port} ({e.strerror}); pick "
                       "another port with --port=N") from None
