"""Splash attention under a mesh on 8 CPU devices (Pallas interpreter) equals the reference.

The shard_map wrapper splits batch rows over data x fsdp and heads over tensor: packed-row
self-attention with GQA (kv heads split with the query heads) and MQA (the one kv head
repeated for the head split), caption cross-attention (key_prefix), forward and gradients of a
random linear functional, float32 to 1e-5. A mesh that splits the sequence is refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax.attention import ChunkMask, attention
from magi_jax.parallel.mesh import MeshConfig, make_mesh
from magi_jax.parallel.rules import use_mesh
from multidevice import eight_devices

QB, D = 128, 32
TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(B, Sq, Sk, Hq, Hkv, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (B, Sq, Hq, D)), jax.random.normal(ks[1], (B, Sk, Hkv, D)),
          jax.random.normal(ks[2], (B, Sk, Hkv, D)), jax.random.normal(ks[3], (B, Sq, Hq, D)))


def _check(mesh, q, k, v, w, ranges, layout, q_block):
  def run(backend):
    def f(q, k, v):
      mask = ChunkMask(ranges, q_block=q_block, layout=layout)
      return attention(q, k, v, mask, scale=D ** -0.5, backend=backend)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))
    return jax.jit(f)(q, k, v), jax.jit(grad)(q, k, v)

  with use_mesh(mesh):
    out, grads = run("splash")
  ref, ref_grads = run("reference")
  np.testing.assert_allclose(out, ref, **TOL)
  for g, g0 in zip(grads, ref_grads):
    np.testing.assert_allclose(g, g0, **TOL)


@eight_devices
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_packed_rows_on_data_fsdp_tensor_mesh(kv_heads):
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  # Four rows of two 128-token chunks: one video, two videos, alternating.
  starts = np.array([[0, 0], [0, 1], [0, 0], [0, 1]])
  ranges = jnp.asarray(np.stack([starts * QB, np.broadcast_to([QB, 2 * QB], starts.shape)],
                                -1), jnp.int32)
  q, k, v, w = _inputs(4, 2 * QB, 2 * QB, 4, kv_heads)
  _check(mesh, q, k, v, w, ranges, "causal_segments", QB)


@eight_devices
def test_key_prefix_on_data_fsdp_tensor_mesh():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  ranges = jnp.asarray([[[0, 40]], [[0, 7]], [[0, 0]], [[0, 40]]], jnp.int32)
  q, k, v, w = _inputs(4, 24, 40, 4, 2, seed=1)
  _check(mesh, q, k, v, w, ranges, "key_prefix", 24)


@eight_devices
def test_sequence_split_is_refused():
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, context=2))
  q, k, v, _ = _inputs(4, QB, QB, 2, 2)
  mask = ChunkMask(jnp.asarray([[[0, QB]]] * 4, jnp.int32), q_block=QB, layout="causal_segments")
  with use_mesh(mesh), pytest.raises(ValueError, match="'ring' backend"):
    attention(q, k, v, mask, scale=0.1, backend="splash")
