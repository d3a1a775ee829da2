"""The commands' persistent compilation cache (magi_jax/compile_cache.py)."""

import os

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from magi_jax import compile_cache
from magi_jax.compile_cache import CompileCacheError

NAMES = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
         "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def restore_jax_config(monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  old = {n: getattr(jax.config, n) for n in NAMES}
  compilation_cache.reset_cache()
  yield
  for n, v in old.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


def test_a_compiled_program_lands_in_the_directory(tmp_path, restore_jax_config):
  path = tmp_path / "home" / "cache"
  assert compile_cache.enable(str(path), min_compile_seconds=0.0) == str(path)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  assert jax.config.jax_compilation_cache_dir == str(path)
  jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()
  assert os.listdir(path)                     # the executable was written for the next run


def test_empty_env_and_bad_directories(tmp_path, restore_jax_config, monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  assert compile_cache.enable("") is None
  assert jax.config.jax_compilation_cache_dir == before
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(CompileCacheError, match="compile_cache_dir=.*cannot be created"):
    compile_cache.enable(str(blocker / "sub"))
  # JAX_COMPILATION_CACHE_DIR in the environment wins over the config's directory.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert compile_cache.enable(str(tmp_path / "config")) == jax.config.jax_compilation_cache_dir
  assert not (tmp_path / "config").exists()
