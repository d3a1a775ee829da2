"""The persistent JAX compilation cache of the commands, on by default.

`experiments.sample` and `experiments.train` compile the same programs each time they start;
with the cache, a second run of the same command (same shapes, flags and JAX version) loads
them from disk. `enable(path)` points JAX at `path` (`~` expanded, created) and keeps every
program that took at least `min_compile_seconds` to compile; an empty path leaves JAX's own
setting alone (off unless `JAX_COMPILATION_CACHE_DIR` is set). The commands take the path from
`--config.compile_cache_dir` (default DEFAULT_DIR); a `JAX_COMPILATION_CACHE_DIR` set in the
environment takes precedence (with JAX's own minimum compile time, or
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`).
"""

from __future__ import annotations

import os

from magi_jax.errors import MagiError

DEFAULT_DIR = "~/.cache/magi_jax/jax_compile"


class CompileCacheError(MagiError, OSError):
  pass


def enable(path: str, *, min_compile_seconds: float = 0.2) -> str | None:
  """Turns the persistent cache on at `path` (returned, expanded); None when `path` is ''."""
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return jax.config.jax_compilation_cache_dir
  if not path:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise CompileCacheError(f"--config.compile_cache_dir={path!r} cannot be created ({e}); "
                            "set another directory, or '' for no cache") from None
  if not os.access(path, os.W_OK):
    raise CompileCacheError(f"--config.compile_cache_dir={path!r} is not writable; set another "
                            "directory, or '' for no cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  return path
