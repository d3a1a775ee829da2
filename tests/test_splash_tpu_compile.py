"""Splash attention compiled by the real TPU compiler, ahead of time, on this CPU host.

libtpu compiles for a TPU topology (`topologies.get_topology_desc`) without a chip. These
tests lower inside `use_mesh` (so `target_platform()` is 'tpu' and the kernel is Mosaic, not
the interpreter) and compile forward and `jax.grad` on meshes of 1, 2 and 4 v5e chips: the
compile that fails with "Mosaic kernels cannot be automatically partitioned" unless the kernel
runs under a shard_map, and that silently used the interpreter when `interpret` followed
`jax.default_backend()`. Shapes are tiny; a compile takes about a second.
"""

import os

# Another process on this host (a parallel test worker, a benchmark) may hold libtpu's
# lockfile; an ahead-of-time compile uses no chip, so sharing the library is safe here.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

pytest.importorskip("libtpu", reason="libtpu is not installed: no TPU compiler to test with")

import magi_jax.attention as attention_pkg  # noqa: E402
from magi_jax.attention import ChunkMask, attention  # noqa: E402
from magi_jax.attention import splash  # noqa: E402
from magi_jax.parallel.rules import (ShardingRules, fit_spec, tree_shardings,  # noqa: E402
                                     use_mesh)

AXES = ("data", "fsdp", "context", "tensor")
BATCH = ("data", "fsdp")
MOSAIC = "tpu_custom_call"


def _topology(name, **kw):
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu", **kw)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"libtpu cannot describe topology {name}: {type(e).__name__}: {e}")


@pytest.fixture(scope="module")
def chips():
  """{number of chips: v5e devices}: 1 from v5e:1x1, 2 and 4 from v5e:2x2."""
  one = _topology("v5e:1x1", chips_per_host_bounds=(1, 1, 1)).devices
  four = _topology("v5e:2x2").devices
  assert jax.default_backend() == "cpu"           # describing a topology leaves JAX on CPU
  return {1: list(one), 2: list(four)[:2], 4: list(four)}


def _mesh(devices, data=1, fsdp=1, context=1, tensor=1):
  return Mesh(np.array(devices).reshape(data, fsdp, context, tensor), AXES)


def _sds(mesh, shape, dtype, spec):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _activation(mesh, shape, dtype=jnp.bfloat16):
  """(B, S, H, D) placed as the model places it: batch over data x fsdp, heads over tensor,
  each where it divides."""
  return _sds(mesh, shape, dtype, fit_spec(P(BATCH, None, "tensor", None), shape, mesh))


def _compile_forward_and_grad(mesh, args, layout, q_block):
  """Lowers and compiles attention(..., backend='splash') and its grad; returns the lowered
  texts and the compiled programs."""
  def fwd(q, k, v, r):
    mask = ChunkMask(r, q_block=q_block, layout=layout)
    return attention(q, k, v, mask, scale=q.shape[-1] ** -0.5, backend="splash")

  loss = lambda q, k, v, r: jnp.sum(fwd(q, k, v, r).astype(jnp.float32))
  out = []
  with use_mesh(mesh):
    for f in (fwd, jax.grad(loss, argnums=(0, 1, 2))):
      lowered = jax.jit(f).lower(*args)
      out.append((lowered.as_text(), lowered.compile()))
  return out


def _check_compiled(results):
  for text, compiled in results:
    assert MOSAIC in text                          # the Mosaic kernel, not the interpreter
    mem = compiled.memory_analysis()
    assert mem is not None
    for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
      assert isinstance(getattr(mem, field), int) and getattr(mem, field) >= 0
    assert mem.argument_size_in_bytes > 0
    # Inputs arrive placed as the shard_map wants them: no gathering of activations.
    assert "all-gather" not in compiled.as_text()


MESHES = {
    "1chip": (1, dict()),
    "tensor2": (2, dict(tensor=2)),
    "fsdp4": (4, dict(fsdp=4)),
    "data2_tensor2": (4, dict(data=2, tensor=2)),
    "fsdp2_tensor2": (4, dict(fsdp=2, tensor=2)),
}


# GQA (4 query / 2 kv heads) everywhere; MQA where tensor splits heads (the kv-head repeat).
CASES = [(name, 2) for name in MESHES] + [("tensor2", 1), ("fsdp2_tensor2", 1)]


@pytest.mark.parametrize("name,kv_heads", CASES, ids=[f"{n}-kv{h}" for n, h in CASES])
def test_causal_segments_compile(chips, name, kv_heads):
  """Packed-row self-attention (layout causal_segments, traced ranges), forward and grad."""
  n, sizes = MESHES[name]
  mesh = _mesh(chips[n], **sizes)
  B, S, Hq, D, qb = 4, 256, 4, 128, 128
  args = (_activation(mesh, (B, S, Hq, D)), _activation(mesh, (B, S, kv_heads, D)),
          _activation(mesh, (B, S, kv_heads, D)),
          _sds(mesh, (B, S // qb, 2), jnp.int32, P(BATCH)))
  _check_compiled(_compile_forward_and_grad(mesh, args, "causal_segments", qb))


def test_sharded_arguments_shrink_per_device(chips):
  """fsdp 4 splits the batch: each chip holds a quarter of the activations, not all of them."""
  B, S, H, D = 4, 256, 4, 128
  sizes = {}
  for n, kw in ((1, {}), (4, dict(fsdp=4))):
    mesh = _mesh(chips[n], **kw)
    args = tuple(_activation(mesh, (B, S, H, D)) for _ in range(3)) + (
        _sds(mesh, (B, 2, 2), jnp.int32, P(BATCH)),)
    (_, compiled), _ = _compile_forward_and_grad(mesh, args, "causal_segments", 128)
    sizes[n] = compiled.memory_analysis().argument_size_in_bytes
  assert sizes[4] * 3 < sizes[1]


def test_key_prefix_cross_attention_compiles(chips):
  """Caption cross-attention: one query block per row against 64 caption keys (Sk != Sq)."""
  mesh = _mesh(chips[4], fsdp=2, tensor=2)
  B, Sq, Sk, Hq, Hkv, D = 4, 256, 64, 4, 2, 128
  args = (_activation(mesh, (B, Sq, Hq, D)), _activation(mesh, (B, Sk, Hkv, D)),
          _activation(mesh, (B, Sk, Hkv, D)), _sds(mesh, (B, 1, 2), jnp.int32, P(BATCH)))
  _check_compiled(_compile_forward_and_grad(mesh, args, "key_prefix", Sq))


def test_context_mesh_refused_and_auto_uses_ring(chips):
  """A mesh that splits the sequence: splash raises (naming ring), `supports` is False for
  it, and 'auto' routes self-attention to ring."""
  mesh = _mesh(chips[4], fsdp=2, context=2)
  q = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
  r = jnp.asarray(np.array([[[0, 128], [0, 256]]] * 2), jnp.int32)
  mask = ChunkMask(r, q_block=128, layout="causal_segments")
  with use_mesh(mesh):
    assert not splash.supports(mask, 256, 256)
    assert attention_pkg.select_backend(q, q, mask) == "ring"
    with pytest.raises(ValueError, match="'ring' backend"):
      jax.eval_shape(lambda q: splash.splash_attention(q, q, q, mask, scale=0.1), q)


def test_dit_training_grad_uses_splash(chips, monkeypatch):
  """The tiny VideoDiT's training-loss gradient on fsdp 2 x tensor 2 with backend 'auto':
  self-attention (packed rows, promised causal segments) and caption cross-attention both
  pick splash, and the program holds Mosaic kernels and compiles."""
  from flax import nnx
  from magi_jax.configs import get_preset
  from magi_jax.models.dit import VideoDiT
  from magi_jax.train.objective import Objective, TrainModel, training_loss

  picked = []
  select = attention_pkg.select_backend

  def spy(q, k, mask):
    picked.append((q.shape[1] == k.shape[1], mask.layout, select(q, k, mask)))
    return picked[-1][-1]

  monkeypatch.setattr(attention_pkg, "select_backend", spy)
  cfg = get_preset("tiny").model
  mesh = _mesh(chips[4], fsdp=2, tensor=2)
  rules = ShardingRules()
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TrainModel(VideoDiT(cfg,
                                                                             rngs=nnx.Rngs(0)))))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, tree_shardings(abstract, mesh, rules))
  N, K, chunk_width, hw = 2, 2, 1, 8
  L, C = cfg.caption_max_length, cfg.caption_channels
  batch = {"x1": _sds(mesh, (N, cfg.latent_channels, K * chunk_width, hw, hw), jnp.float32,
                      P(BATCH)),
           "segment_ids": _sds(mesh, (N, K), jnp.int32, P(BATCH)),
           "text_emb": _sds(mesh, (N, K, L, C), jnp.float32, P(BATCH)),
           "text_mask": _sds(mesh, (N, K, L), jnp.float32, P(BATCH))}
  key = _sds(mesh, (2,), jnp.uint32, P())
  obj = Objective(chunk_width=chunk_width, backend="auto")

  def loss(p, batch, key):
    model = nnx.merge(graphdef, p)
    return training_loss(model, batch, jax.random.wrap_key_data(key), obj)[0]

  with use_mesh(mesh, rules):
    lowered = jax.jit(jax.grad(loss)).lower(params, batch, key)
    compiled = lowered.compile()
  self_calls = [p for p in picked if p[0]]
  assert self_calls and all(p == (True, "causal_segments", "splash") for p in self_calls)
  assert all(p[1:] == ("key_prefix", "splash") for p in picked if not p[0])
  assert MOSAIC in lowered.as_text()
  mem = compiled.memory_analysis()          # the compiler reports its plan (temps may be 0:
  assert mem.argument_size_in_bytes > 0     # a tiny scanned program fits in its buffers)
