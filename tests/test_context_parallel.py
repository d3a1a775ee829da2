"""Context-parallel attention on 8 CPU devices equals the dense reference, forward and backward.

Ring attention (zig-zag and contiguous placement) and Ulysses, for MAGI's three self-attention
masks: block-causal, kv-range windows and packed segments; plus GQA and meshes that also
split batch (data / fsdp) and heads (tensor). Gradients are of a random linear functional of
the output, compared in float32 to 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magi_jax.attention import ChunkMask, attention
from magi_jax.parallel.mesh import MeshConfig, make_mesh
from magi_jax.attention.ring import device_work, ring_attention, zigzag_order
from magi_jax.parallel.rules import use_mesh
from magi_jax.official.forward import official_forward
from multidevice import eight_devices

CHUNKS, TOKENS_PER_CHUNK = 8, 8


def _ranges(kind, B=2):
  c = np.arange(CHUNKS)
  if kind == "block_causal":
    lo = np.zeros(CHUNKS)
  elif kind == "kv_range":                        # each chunk sees itself and 2 earlier chunks
    lo = np.maximum(0, c - 2) * TOKENS_PER_CHUNK
  elif kind == "packed":                          # three videos of 3, 4 and 1 chunks in a row
    lo = np.array([0, 0, 0, 3, 3, 3, 3, 7]) * TOKENS_PER_CHUNK
  r = np.stack([lo, (c + 1) * TOKENS_PER_CHUNK], -1)[None].repeat(B, 0)
  return ChunkMask(jnp.asarray(r, jnp.int32), q_block=TOKENS_PER_CHUNK)


def _inputs(Hq=4, Hkv=2, D=16, B=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  S = CHUNKS * TOKENS_PER_CHUNK
  return (jax.random.normal(ks[0], (B, S, Hq, D)), jax.random.normal(ks[1], (B, S, Hkv, D)),
          jax.random.normal(ks[2], (B, S, Hkv, D)), jax.random.normal(ks[3], (B, S, Hq, D)))


def _check(fn, mask, mesh, **shape):
  q, k, v, w = _inputs(**shape)
  scale = q.shape[-1] ** -0.5

  def loss(q, k, v, f):
    return jnp.sum(f(q, k, v) * w)

  ref = lambda q, k, v: attention(q, k, v, mask, scale=scale, backend="reference")
  par = lambda q, k, v: fn(q, k, v, mask, scale=scale, mesh=mesh)
  with use_mesh(mesh):
    out = jax.jit(par)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: loss(*a, par), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(out, ref(q, k, v), atol=1e-5, rtol=1e-5)
  for g, g0 in zip(grads, jax.grad(lambda *a: loss(*a, ref), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-5)


MESHES = {
    "context8": MeshConfig(data=1, context=8),                       # contiguous placement
    "data2_context4": MeshConfig(data=2, context=4),                 # zig-zag, 8 chunks / 8 groups
    "fsdp2_context2_tensor2": MeshConfig(data=1, fsdp=2, context=2, tensor=2),
}


# Six of the nine (mesh, mask) pairs: each mask on two of the meshes, each mesh with two
# masks, so every mask meets two of contiguous placement, zig-zag and a batch / head split.
RING_CASES = [("context8", "block_causal"), ("context8", "packed"),
              ("data2_context4", "kv_range"), ("data2_context4", "block_causal"),
              ("fsdp2_context2_tensor2", "packed"), ("fsdp2_context2_tensor2", "kv_range")]


@eight_devices
@pytest.mark.parametrize("mesh_name, kind", RING_CASES)
def test_ring_matches_reference(mesh_name, kind):
  _check(ring_attention, _ranges(kind), make_mesh(MESHES[mesh_name]))


@eight_devices
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_layouts_and_mqa(layout):
  mesh = make_mesh(MeshConfig(data=2, context=4))
  fn = lambda *a, **k: ring_attention(*a, layout=layout, block_q=4, block_k=4, **k)
  _check(fn, _ranges("packed"), mesh, Hq=4, Hkv=1)


@eight_devices
def test_ring_without_skipping_is_the_same_function():
  mesh = make_mesh(MeshConfig(data=2, context=4))
  fn = lambda *a, **k: ring_attention(*a, skip=False, **k)
  _check(fn, _ranges("kv_range"), mesh)


@eight_devices
@pytest.mark.parametrize("mesh_name", ["context8", "fsdp2_context2_tensor2"])
@pytest.mark.parametrize("kind", ["block_causal", "kv_range", "packed"])
def test_ulysses_matches_reference(mesh_name, kind):
  from magi_jax.attention.ulysses import ulysses_attention
  _check(ulysses_attention, _ranges(kind), make_mesh(MESHES[mesh_name]), Hq=8, Hkv=2)


@eight_devices
def test_ulysses_with_a_kv_cache():
  """Sk != Sq (keys = [cache; current]) works through the head split."""
  from magi_jax.attention.ulysses import ulysses_attention
  mesh = make_mesh(MeshConfig(data=1, context=8))
  q, k, v, _ = _inputs(Hq=8, Hkv=8)
  kc = jnp.concatenate([k, k[:, ::-1]], axis=1)
  vc = jnp.concatenate([v, v[:, ::-1]], axis=1)
  S = q.shape[1]
  ranges = np.stack([np.zeros(CHUNKS), S + (np.arange(CHUNKS) + 1) * TOKENS_PER_CHUNK], -1)
  ranges = ranges[None].repeat(2, 0)
  mask = ChunkMask(jnp.asarray(ranges, jnp.int32), q_block=TOKENS_PER_CHUNK)
  with use_mesh(mesh):
    out = jax.jit(lambda q, k, v: ulysses_attention(q, k, v, mask, scale=0.25))(q, kc, vc)
  np.testing.assert_allclose(out, attention(q, kc, vc, mask, scale=0.25), atol=1e-5, rtol=1e-5)


@eight_devices
def test_dit_forward_on_a_mesh_matches_one_device():
  """The whole DiT with ring / Ulysses self-attention under `use_mesh` = blockwise on one device."""
  from conftest import randomize
  from flax import nnx
  from magi_jax.configs import tiny_config
  from magi_jax.models import Precision, VideoDiT
  cfg = tiny_config().model
  model = randomize(VideoDiT(cfg, precision=Precision.named("fp32"), rngs=nnx.Rngs(0)))
  N, chunks, chunk_width = 2, 4, cfg.t_patch_size
  T, H, W = chunks * chunk_width, 8, 8
  x = jax.random.normal(jax.random.key(1), (N, cfg.in_channels, T, H, W))
  t = jnp.tile(jnp.linspace(0.2, 0.9, chunks)[None], (N, 1))
  L = cfg.caption_max_length
  y = jax.random.normal(jax.random.key(2), (N * chunks, L, cfg.caption_channels))
  ymask = jnp.ones((N * chunks, L), jnp.int32)
  per = (chunk_width // cfg.t_patch_size) * (H // cfg.patch_size) * (W // cfg.patch_size)
  kv = np.stack([np.zeros(chunks), (np.arange(chunks) + 1) * per], -1)
  kv_range = jnp.asarray(np.concatenate([kv + b * chunks * per for b in range(N)]), jnp.int32)
  call = lambda m, backend: official_forward(m, x, t, y, ymask, kv_range, chunk_width=chunk_width,
                                             backend=backend).velocity
  want = jax.jit(lambda: call(model, "blockwise"))()
  mesh = make_mesh(MeshConfig(data=2, context=2, tensor=2))
  for backend in ("ring", "ulysses"):
    with use_mesh(mesh):
      got = jax.jit(lambda backend=backend: call(model, backend))()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=backend)


def test_zigzag_balances_causal_work():
  """Per-device visible (query chunk, key chunk) pairs: zig-zag within 10%, contiguous not."""
  for chunks, n in ((8, 4), (16, 8), (32, 4), (64, 16)):
    z = device_work(chunks, n, "zigzag")
    assert z.max() <= 1.1 * z.min(), (chunks, n, z)
    c = device_work(chunks, n, "contiguous")
    assert c.max() > 2 * c.min()
    assert z.sum() == c.sum() == chunks * (chunks + 1) // 2
  np.testing.assert_array_equal(zigzag_order(8), [0, 7, 1, 6, 2, 5, 3, 4])


def test_ring_falls_back_without_a_context_axis():
  q, k, v, _ = _inputs()
  mask = _ranges("packed")
  np.testing.assert_allclose(ring_attention(q, k, v, mask, scale=0.25),
                             attention(q, k, v, mask, scale=0.25), atol=1e-5, rtol=1e-5)


def test_ring_rejects_non_causal_concrete_masks():
  from magi_jax.attention import ring as ra
  mask = ChunkMask(jnp.asarray([[[0, 16], [0, 16]]], jnp.int32), q_block=8)
  with pytest.raises(ValueError, match="causal chunk masks"):
    ra._check_causal(mask)


@eight_devices
def test_fit_spec_replicates_dims_the_mesh_does_not_divide():
  from jax.sharding import PartitionSpec as P
  from magi_jax.parallel.rules import fit_spec
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, context=2, tensor=2))
  assert fit_spec(P(("fsdp", "context"), "tensor"), (8, 6), mesh) == P(("fsdp", "context"),
                                                                         "tensor")
  assert fit_spec(P(("fsdp", "context"), "tensor"), (6, 3), mesh) == P(None, None)


@eight_devices
def test_global_batch_must_divide_by_the_batch_axes():
  import ml_collections
  from magi_jax.configs import ConfigError
  from magi_jax.parallel.rules import ShardingRules
  from magi_jax.train.trainer import check_batch
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, context=2))
  c = ml_collections.ConfigDict({"data": {"batch_size": 8}})
  check_batch(c, mesh, ShardingRules())
  c.data.batch_size = 6
  with pytest.raises(ConfigError, match=r"batch axes \('data', 'fsdp'\) \(4\)"):
    check_batch(c, mesh, ShardingRules())
