"""LoRA fine-tuning through the trainer (`finetune_lora.py:tiny`) on tiny random "official"
weights: only the adapters train (parameters, EMA and optimizer moments are adapter-shaped),
the base stays bitwise the checkpoint, and the exports (`lora.safetensors`, `merged_dit/`) and
`load_trained` reproduce the trained model's DiT output.

One training run (3 steps of a 1-layer model on the tiny bouncing world) is shared by every
test of the module.
"""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import finetune_lora
from magi_jax.official.dit import load_official_dit, save_official_dit
from magi_jax.convert.load import random_module
from magi_jax.models import Precision, VideoDiT
from magi_jax.train import build
from magi_jax.train.lora import LoRALinear, load_lora, lora_config
from magi_jax.train.trainer import load_trained, train
from magi_jax.official.forward import official_forward

pytestmark = pytest.mark.usefixtures("compile_cache")

CHUNKS_IN_FLIGHT = 2      # chunks per forward call
F32 = jnp.float32


def _velocity(dit, x, t, y, mask, kv_range, *, chunk_width):
  return official_forward(dit, x, t, y, mask, kv_range, chunk_width=chunk_width,
                          backend="reference").velocity


velocity = nnx.jit(_velocity, static_argnames="chunk_width")


def make_inputs(mcfg, chunk_width, seed=0):
  """Valid DiT inputs for two block-causal chunks of an 8x8 video of the model's channels."""
  r = np.random.default_rng(seed)
  H = W = 2 * mcfg.patch_size
  tokens_per_chunk = ((chunk_width // mcfg.t_patch_size) * (H // mcfg.patch_size)
                      * (W // mcfg.patch_size))
  L, C = mcfg.caption_max_length, mcfg.caption_channels
  x = r.standard_normal((1, mcfg.in_channels, CHUNKS_IN_FLIGHT * chunk_width, H, W)).astype(
      np.float32)
  t = r.uniform(0.05, 0.95, (1, CHUNKS_IN_FLIGHT)).astype(np.float32)
  y = r.standard_normal((CHUNKS_IN_FLIGHT, 1, L, C)).astype(np.float32)
  mask = (np.arange(L)[None, :] < np.asarray([3, L])[:, None]).astype(np.int32)[:, None, :]
  kv_range = np.asarray([[0, tokens_per_chunk], [0, 2 * tokens_per_chunk]], np.int32)
  return x, t, y, mask, kv_range


def _path_names(path):
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return names[:-1] if names and names[-1] == "value" else names   # an nnx.Variable's value


def _leaves_with_names(tree):
  return [(_path_names(p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _variables(tree):
  """The nnx.Variable leaves of a state pytree (what kind of parameter each leaf is)."""
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _base_params(dit):
  flt = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(dit, flt))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  base = tmp_path_factory.mktemp("lora_run")
  c = finetune_lora.get_config("tiny")
  mcfg = build.model_config(c)
  ckpt = str(base / "official")
  dit = random_module(lambda: VideoDiT(mcfg, precision=Precision.fp32(), rngs=nnx.Rngs(0)), 0)
  save_official_dit(dit, ckpt)
  c.init.path = ckpt
  c.data.data_dir = str(base / "tfds")
  c.tensorboard = False
  workdir = str(base / "work")
  lines = []
  result = train(c, workdir, echo=lines.append)
  inputs = make_inputs(mcfg, c.objective.chunk_width)
  want = np.asarray(velocity(result.model.dit, *inputs, chunk_width=c.objective.chunk_width))
  return dict(c=c, mcfg=mcfg, ckpt=ckpt, workdir=workdir, result=result, lines=lines,
              inputs=inputs, want=want, chunk_width=c.objective.chunk_width)


def test_config_is_the_lora_smoke_setup(run):
  c, result = run["c"], run["result"]
  assert c.init.kind == "official" and c.lora.rank == 4 and c.lora.export_merged
  assert result.step == c.total_steps == 3 and not result.stopped_by_signal
  assert np.isfinite(float(result.last_metrics["loss"]))
  rank, alpha, targets = lora_config(result.model.dit)
  assert (rank, alpha, set(targets)) == (4, float(c.lora.alpha), set(c.lora.targets))


def test_only_adapters_are_trainable_and_in_the_optimizer(run):
  result = run["result"]
  dit = result.model.dit
  adapters = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(dit, nnx.LoRAParam))}
  # One stacked adapter pair per target, with a leading axis over every layer.
  assert len(adapters) == len(run["c"].lora.targets) * 2
  assert {np.shape(v)[0] for v in adapters.values()} == {run["mcfg"].num_layers}
  for tree in (result.state.params, result.state.ema):
    leaves = _leaves_with_names(tree)
    assert len(leaves) == len(adapters)
    for names, v in leaves:
      assert names[-1] in ("lora_a", "lora_b"), names
      assert names[0] == "dit", names             # no text-encoder or base weight trains
      chex.assert_type(v, F32)
    variables = _variables(tree)
    assert len(variables) == len(adapters)
    assert all(isinstance(v, nnx.LoRAParam) for v in variables)
  adapter_shapes = sorted(np.shape(v) for v in adapters.values())
  opt = [(n, v) for n, v in _leaves_with_names(result.state.opt_state) if np.ndim(v) > 0]
  for names, _ in opt:
    assert names[-1] in ("lora_a", "lora_b"), names
  # AdamW's two moments per adapter, nothing else with a shape (counts are scalars).
  assert sorted(np.shape(v) for _, v in opt) == sorted(adapter_shapes * 2)


def test_base_weights_are_bitwise_the_checkpoint_and_adapters_moved(run):
  dit = run["result"].model.dit
  ckpt = load_official_dit(run["ckpt"], run["mcfg"], precision=Precision.fp32())
  want, got = _base_params(ckpt), _base_params(dit)
  assert set(got) == set(want)
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
  for _, m in nnx.iter_modules(dit):
    if isinstance(m, LoRALinear):
      assert np.abs(np.asarray(m.lora_b.get_value())).max() > 0   # B starts at zero
  # The adapted model no longer computes the base model's output.
  base_out = np.asarray(velocity(ckpt, *run["inputs"], chunk_width=run["chunk_width"]))
  assert np.abs(run["want"] - base_out).max() > 0


def test_exported_adapters_reproduce_the_trained_dit(run):
  path = os.path.join(run["workdir"], "lora.safetensors")
  assert os.path.isfile(path)
  assert any("lora.safetensors" in l for l in run["lines"])
  fresh = load_lora(path, load_official_dit(run["ckpt"], run["mcfg"], precision=Precision.fp32()))
  got = np.asarray(velocity(fresh, *run["inputs"], chunk_width=run["chunk_width"]))
  chex.assert_shape(got, run["inputs"][0].shape)
  chex.assert_trees_all_close(got, run["want"], atol=1e-6, rtol=0)


def test_merged_export_strict_loads_and_matches(run):
  merged_dir = os.path.join(run["workdir"], "merged_dit")
  assert os.path.isdir(merged_dir)
  merged = load_official_dit(merged_dir, run["mcfg"], precision=Precision.fp32())   # strict
  assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  got = np.asarray(velocity(merged, *run["inputs"], chunk_width=run["chunk_width"]))
  chex.assert_trees_all_close(got, run["want"], atol=1e-5, rtol=1e-5)


def test_load_trained_rebuilds_the_adapted_model(run):
  c, model, tokenizer, step = load_trained(run["workdir"])
  assert step == 3 and c.init.path == run["ckpt"] and c.lora.rank == 4
  assert tokenizer is not None                    # the demo text path of the smoke world
  got = np.asarray(velocity(model.dit, *run["inputs"], chunk_width=run["chunk_width"]))
  np.testing.assert_array_equal(got, run["want"])
