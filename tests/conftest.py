"""Shared test set-up: CPU only, float32 matmuls exact, small helpers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is mostly XLA:CPU compiling small programs; LLVM at optimisation level 0
# compiles them faster and runs them no slower at these sizes (tests/test_layer_scan.py and
# test_train_objective.py: 270 -> 188 CPU-seconds). Set before JAX starts, and inherited by the
# suite's subprocesses; an XLA_FLAGS that already sets the level wins. The TPU compiler's memory
# figures do not move with it (`magi_jax.aot --job=sample --preset=4.5B_distill
# --topology=v5e:2x2`: the same args / temp / peak GiB for all four programs).
XLA_OPT_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), XLA_OPT_FLAG]).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from magi_jax.configs import tiny_config  # noqa: E402
from magi_jax.models import Precision, VideoDiT  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def randomize(model, seed: int = 0, scale: float = 0.1):
  """Gives every parameter random values (1p norms and biases start at zero otherwise); the
  stacked layers' parameters get the same rule per layer (their leading layer axis aside)."""
  state = nnx.state(model, nnx.Param)
  stacked = getattr(model, "stacked_axes", lambda path: 0)
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
  paths = [tuple(str(getattr(k, "key", k)) for k in p) for p, _ in with_paths]
  leaves = [leaf for _, leaf in with_paths]
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = []
  for k, path, leaf in zip(keys, paths, leaves):
    ndim = leaf.ndim - stacked(path)
    fan_in = leaf.shape[-2] if ndim == 2 else 1
    std = (fan_in ** -0.5) if ndim == 2 else scale
    new.append((jax.random.normal(k, leaf.shape, jnp.float32) * std).astype(leaf.dtype))
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
  return model


def make_model(precision=None, distill=False, seed=0, **model_kw):
  cfg = tiny_config(**model_kw).model
  m = VideoDiT(cfg, precision=precision or Precision.fp32(), distill=distill, rngs=nnx.Rngs(seed))
  return randomize(m, seed)


@pytest.fixture
def fixtures_dir():
  return FIXTURES


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent JAX compilation cache for the requesting module, shared by every module of
  the session that asks for it (the sample-command and notebook runs have the same shapes);
  the previous settings are restored afterwards."""
  from jax.experimental.compilation_cache import compilation_cache
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  path = str(tmp_path_factory.getbasetemp() / "jax_compile_cache")
  os.makedirs(path, exist_ok=True)
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield path
  for n, v in old.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


# The longest files first (per-file seconds of a two-worker run, slowest first): with
# `--dist loadfile` each worker takes the next file when it is almost out of work, and a long
# file that starts last keeps one worker busy while the other idles. Order inside a file, and
# of every file not listed, is the collection order.
SLOW_FIRST = ("test_train_resume.py", "test_distill.py", "test_distributed.py", "test_aot.py",
              "test_sample_trained.py", "test_layer_scan.py", "test_mesh_train.py",
              "test_parity_command.py",
              "test_context_parallel.py", "test_context_memory_bench.py",
              "test_distill_export.py", "test_train_objective.py", "test_notebook.py",
              "test_error_table.py", "test_sample_command.py", "test_quant.py",
              "test_compile_ahead.py", "test_checkpoint_faults.py", "test_serve.py",
              "test_dit_behaviour.py", "test_rollout_metrics.py", "test_device_plan.py",
              "test_prepare.py", "test_finetune_recipe.py", "test_prepare_mix.py",
              "test_stages.py")


# Last: the 8-device sampler, whose XLA:CPU child aborts now and then (tests/test_sampler_mesh.py)
# and did so twice in a row next to the kill -9 runs of test_train_resume.py at the start.
LAST = ("test_sampler_mesh.py",)


def pytest_configure(config):
  # pytest-xdist would otherwise queue the files by their number of tests (most first), which
  # puts a slow file of one test (the 8-device sampler) last.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  rank.update({name: len(SLOW_FIRST) + 1 + i for i, name in enumerate(LAST)})
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(SLOW_FIRST)))
