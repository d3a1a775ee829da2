"""The DiT's stacked layers (magi_jax/models/stack.py): the storage, the scan over layers vs the
unrolled loop over the same weights (forward, KV cache, activations, gradients through the
custom-VJP flash backend and under every remat policy), and the scan's backward memory.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_model
from magi_jax.configs import tiny_config
from magi_jax.models import KVCache, VideoDiT
from magi_jax.models.stack import REMAT_POLICIES, RematPolicyError
from magi_jax.official.forward import official_forward

C_LAT, L, C_CAP = 16, 64, 32
CHUNK_WIDTH, TOKENS_PER_CHUNK = 2, 32     # chunk width, tokens per chunk at 8x8 latents
KV = np.asarray([[0, 1], [0, 2], [1, 3]], np.int32) * TOKENS_PER_CHUNK   # window of 2 chunks


def make_inputs(seed, chunks_in_flight=3, hw=8):
  r = np.random.default_rng(seed)
  x = r.standard_normal((1, C_LAT, chunks_in_flight * CHUNK_WIDTH, hw, hw)).astype(np.float32)
  t = r.uniform(0.05, 0.95, (1, chunks_in_flight)).astype(np.float32)
  y = r.standard_normal((chunks_in_flight, 1, L, C_CAP)).astype(np.float32)
  valid = r.integers(1, L + 1, chunks_in_flight)
  mask = (np.arange(L)[None, :] < valid[:, None]).astype(np.int32)[:, None]
  return x, t, y, mask


INPUTS = make_inputs(0)


@pytest.fixture(scope="module")
def model():
  return make_model()


def _variant(model, *, scan=True, remat=False, policy="nothing_saveable"):
  m = nnx.clone(model)
  m.scan_layers, m.remat, m.remat_policy = scan, remat, policy
  return m


def test_every_layer_parameter_is_stacked_and_layers_differ():
  cfg = tiny_config().model
  m = VideoDiT(cfg, rngs=nnx.Rngs(0))
  flat = dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  layer_paths = [p for p in flat if p[0] == "layers"]
  assert layer_paths and all(isinstance(k, str) for p in flat for k in p)   # no layer index
  for p in layer_paths:
    assert flat[p].get_value().shape[0] == cfg.num_layers, p
    assert VideoDiT.stacked_axes(p) == 1
  assert VideoDiT.stacked_axes(("final_linear", "kernel")) == 0
  q = np.asarray(flat[("layers", "q", "kernel")].get_value())
  assert not np.allclose(q[0], q[1])                     # each layer initialised on its own
  assert q.shape == (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim)


def test_scan_and_unrolled_agree_on_velocity_kv_and_activations(model):
  outs = [nnx.jit(lambda m: official_forward(m, *INPUTS, KV, chunk_width=CHUNK_WIDTH,
                                             backend="flash", return_kv=True,
                                             return_activations=True))(
              _variant(model, scan=s))
          for s in (True, False)]
  a, b = outs
  chex.assert_shape(a.kv.k, (2, 1, 3 * TOKENS_PER_CHUNK, 2, 32))
  chex.assert_trees_all_close(a.velocity, b.velocity, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close((a.kv.k, a.kv.v), (b.kv.k, b.kv.v), atol=1e-6, rtol=1e-6)
  for i in range(2):
    key = f"videodit_blocks.layers.{i}"
    chex.assert_trees_all_close(a.activations[key], b.activations[key], atol=1e-6, rtol=1e-6)
  assert not np.allclose(a.activations["videodit_blocks.layers.0"],
                         a.activations["videodit_blocks.layers.1"])
  # The cache is scanned alongside the weights: layer i reads slice i. Chunk 2 from a cache
  # of chunk 1 equals the full call's chunk 2, on both paths.
  x, t, y, m = INPUTS
  cache = KVCache(a.kv.k[:, :, TOKENS_PER_CHUNK:2 * TOKENS_PER_CHUNK],
                  a.kv.v[:, :, TOKENS_PER_CHUNK:2 * TOKENS_PER_CHUNK])
  for scan in (True, False):
    c = official_forward(_variant(model, scan=scan), x[:, :, 2 * CHUNK_WIDTH:], t[:, 2:], y[2:],
                         m[2:], KV[2:], slice_point=2, chunk_width=CHUNK_WIDTH, cache=cache,
                         backend="flash")
    chex.assert_trees_all_close(c.velocity, a.velocity[:, :, 2 * CHUNK_WIDTH:], atol=2e-5,
                                rtol=2e-5)


def _grads(model, backend):
  """d loss / d (parameters, latents) of a velocity MSE, jitted."""
  graphdef, params = nnx.split(model, nnx.Param)
  target = np.random.default_rng(1).standard_normal(INPUTS[0].shape).astype(np.float32)

  def loss(params, x):
    m = nnx.merge(graphdef, params)
    v = official_forward(m, x, *INPUTS[1:], KV, chunk_width=CHUNK_WIDTH, backend=backend).velocity
    return jnp.mean(jnp.square(v - target))

  return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, INPUTS[0])


def test_grads_through_the_scanned_flash_dit_match_unrolled_and_reference(model):
  want = _grads(_variant(model, scan=False), "reference")
  assert float(jnp.abs(want[1]).max()) > 0
  for m, backend in ((_variant(model), "flash"), (_variant(model, scan=False), "flash"),
                     (_variant(model), "reference"),
                     (_variant(model, remat=True), "flash"),
                     (_variant(model, scan=False, remat=True), "flash")):
    got = _grads(m, backend)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def remat_grads(model):
  return _grads(_variant(model, remat=True), "flash")          # nothing_saveable


@pytest.mark.parametrize("policy", ["everything_saveable", "dots_saveable",
                                    "checkpoint_dots_with_no_batch_dims"])
def test_remat_policies_change_memory_not_gradients(model, remat_grads, policy):
  assert policy in REMAT_POLICIES
  chex.assert_trees_all_close(_grads(_variant(model, remat=True, policy=policy), "flash"),
                              remat_grads, atol=1e-6, rtol=1e-6)


def test_unknown_remat_policy_is_a_clear_error(model):
  with pytest.raises(RematPolicyError, match="unknown remat policy 'save_all'.*dots_saveable"):
    official_forward(_variant(model, remat=True, policy="save_all"), *INPUTS, KV,
                     chunk_width=CHUNK_WIDTH)


def test_scan_backward_memory_is_not_inflated_by_the_masks():
  """The masks' ranges enter the scan as scanned inputs; closed over, JAX would hoist every
  layer's tile masks out of the loop under grad (twice the temporaries, see stack.py)."""
  m = make_model(num_layers=3)
  x, t, y, mask = make_inputs(2, chunks_in_flight=4, hw=32)        # 4 chunks x 512 tokens
  kv = np.asarray([[0, 512 * (c + 1)] for c in range(4)], np.int32)
  graphdef, params = nnx.split(m, nnx.Param)

  def temp_bytes(scan):
    def loss(params, x):
      dit = nnx.merge(graphdef, params)
      dit.scan_layers = scan
      out = official_forward(dit, x, t, y, mask, kv, chunk_width=CHUNK_WIDTH, backend="flash")
      return jnp.sum(out.velocity ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  scanned, unrolled = temp_bytes(True), temp_bytes(False)
  assert scanned < 1.3 * unrolled, (scanned / 2 ** 20, unrolled / 2 ** 20)
