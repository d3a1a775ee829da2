"""LoRA fine-tuning (magi_jax.train.lora) on a tiny random DiT: the adapted model starts equal
to the base and keeps the base weights' paths, only the adapters train, adapters save / load
separately from the base checkpoint with clear errors, and merging reproduces the adapted
model. The forward and the training step are jitted once at module level and shared (their
caches are keyed by the model's structure), so the file stays fast on a 2-core CPU.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import make_model
from magi_jax.configs import tiny_config
from magi_jax.official.dit import load_official_dit, official_state_dict, save_official_dit
from magi_jax.formats.safetensors_io import SafetensorsFile, save_safetensors
from magi_jax.convert.load import random_module
from magi_jax.models import Precision, VideoDiT
from magi_jax.models.layers import Linear
from magi_jax.train.lora import (DEFAULT_TARGETS, LoRAError, LoRALinear, apply_lora, load_lora,
                                 lora_config, lora_state, merge_lora, save_lora, split_trainable)
from magi_jax.official.forward import official_forward

C_LAT, L, C_CAP = 16, 64, 32          # tiny latent channels, caption length / channels
CHUNK_WIDTH, CHUNKS_IN_FLIGHT, TOKENS_PER_CHUNK = 2, 2, 32   # chunks per call; 8x8 latents
KV_RANGE = np.asarray([[0, 1], [0, 2]], np.int32) * TOKENS_PER_CHUNK     # block-causal
RANK, ALPHA = 4, 8.0
F32 = jnp.float32
TX = optax.adamw(1e-2)                # shared: the optimizer's graphdef (hence the jit) is reused


def make_inputs(seed):
  r = np.random.default_rng(seed)
  x = r.standard_normal((1, C_LAT, CHUNKS_IN_FLIGHT * CHUNK_WIDTH, 8, 8)).astype(np.float32)
  t = r.uniform(0.05, 0.95, (1, CHUNKS_IN_FLIGHT)).astype(np.float32)
  y = r.standard_normal((CHUNKS_IN_FLIGHT, 1, L, C_CAP)).astype(np.float32)
  mask = (np.arange(L)[None, :] < np.asarray([7, 40])[:, None]).astype(np.int32)[:, None, :]
  target = r.standard_normal(x.shape).astype(np.float32)
  return (x, t, y, mask, KV_RANGE), target


INPUTS, TARGET = make_inputs(0)


def _velocity(model, x, t, y, mask, kv_range):
  # The dense reference attention compiles fastest at this size.
  return official_forward(model, x, t, y, mask, kv_range, chunk_width=CHUNK_WIDTH,
                          backend="reference").velocity


velocity = nnx.jit(_velocity)


def _loss(model, target):
  """Velocity MSE against a fixed random target."""
  return jnp.mean(jnp.square(_velocity(model, *INPUTS) - target))


@nnx.jit
def train_step(model, optimizer, target):
  loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, target)
  optimizer.update(model, grads)
  return loss


def train(model, steps):
  optimizer = nnx.Optimizer(model, TX, wrt=nnx.LoRAParam)
  losses = [float(train_step(model, optimizer, TARGET)) for _ in range(steps)]
  return optimizer, losses


def base_flat(model):
  flt = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, flt))}


def lora_flat(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(lora_state(model))}


def randomize_adapters(model, seed):
  """Non-zero B (and new A) so that the adapters change the output."""
  r = np.random.default_rng(seed)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, LoRALinear):
      m.lora_a.set_value(jnp.asarray(r.standard_normal(m.lora_a.get_value().shape) * 0.1, F32))
      m.lora_b.set_value(jnp.asarray(r.standard_normal(m.lora_b.get_value().shape) * 0.1, F32))
  return model



@pytest.fixture(scope="module")
def base_out():
  return np.asarray(velocity(make_model(), *INPUTS))


def adapted(seed=1, **kw):
  return apply_lora(make_model(), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(seed), **kw)


# ---------------------------------------------------------------------------------------------

def test_lora_linear_formula_base_sharing_and_single_rounding():
  base = Linear(24, 40, use_bias=True, dtype=F32, rngs=nnx.Rngs(0))
  base.bias.set_value(jnp.linspace(-1, 1, 40, dtype=F32))
  lin = LoRALinear(base, rank=3, alpha=6.0, rngs=nnx.Rngs(1))
  assert lin.kernel is base.kernel and lin.bias is base.bias
  assert isinstance(lin.lora_a, nnx.LoRAParam) and isinstance(lin.lora_b, nnx.LoRAParam)
  chex.assert_shape((lin.lora_a.get_value(), lin.lora_b.get_value()), ((24, 3), (3, 40)))
  x = jax.random.normal(jax.random.key(2), (2, 5, 24), F32)
  # B = 0: bitwise the base layer.
  np.testing.assert_array_equal(lin(x, out_dtype=F32), base(x, out_dtype=F32))
  lin.lora_b.set_value(jax.random.normal(jax.random.key(3), (3, 40), F32))
  y = lin(x, out_dtype=F32)
  chex.assert_shape(y, (2, 5, 40))
  chex.assert_type(y, F32)
  xd = np.asarray(x, np.float64)
  want = (xd @ np.asarray(base.kernel[...], np.float64) + np.asarray(base.bias[...])
          + (xd @ np.asarray(lin.lora_a[...], np.float64)) @ np.asarray(lin.lora_b[...],
                                                                      np.float64) * 2.0)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
  # Rounded once: the bf16 output is the float32 result rounded.
  yb = lin(x, out_dtype=jnp.bfloat16)
  chex.assert_type(yb, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(yb), np.asarray(y.astype(jnp.bfloat16)))


def test_lora_linear_on_a_stacked_base_has_stacked_adapters_and_per_layer_merge():
  base = Linear(6, 10, use_bias=False, dtype=F32, rngs=nnx.Rngs(0))
  base.kernel.set_value(jax.random.normal(jax.random.key(1), (3, 6, 10), F32))   # 3 layers
  lin = LoRALinear(base, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  chex.assert_shape((lin.lora_a.get_value(), lin.lora_b.get_value()), ((3, 6, 2), (3, 2, 10)))
  a = np.asarray(lin.lora_a[...])
  assert not np.allclose(a[0], a[1])                    # each layer's A is its own draw
  lin.lora_b.set_value(jax.random.normal(jax.random.key(2), (3, 2, 10), F32))
  merged = np.asarray(lin.merged_kernel())
  for i in range(3):
    want = (np.asarray(base.kernel[...][i], np.float64)
            + a[i].astype(np.float64) @ np.asarray(lin.lora_b[...][i], np.float64) * 2.0)
    np.testing.assert_allclose(merged[i], want, rtol=1e-6, atol=1e-6)


def test_apply_lora_keeps_base_paths_values_and_output(base_out):
  plain = make_model()
  before = base_flat(plain)
  model = adapted()
  assert all(type(getattr(model.layers, n)) is LoRALinear for n in DEFAULT_TARGETS)
  assert type(model.layers.ada_modulate) is Linear
  after = base_flat(model)
  assert set(after) == set(before)             # base paths unchanged, nothing renamed
  for p in before:
    np.testing.assert_array_equal(after[p], before[p])
  adapters = lora_flat(model)
  assert set(adapters) == {("layers", n, leaf) for n in DEFAULT_TARGETS
                           for leaf in ("lora_a", "lora_b")}
  for n in DEFAULT_TARGETS:                     # one adapter per layer, stacked like the base
    d_in, d_out = before[("layers", n, "kernel")].shape[1:]
    assert adapters[("layers", n, "lora_a")].shape == (2, d_in, RANK)
    assert adapters[("layers", n, "lora_b")].shape == (2, RANK, d_out)
  assert lora_config(model) == (RANK, ALPHA, DEFAULT_TARGETS)
  # The official exporter writes exactly the base checkpoint from an adapted model.
  sd0, sd1 = official_state_dict(plain), official_state_dict(model)
  assert set(sd0) == set(sd1)
  for k in sd0:
    np.testing.assert_array_equal(sd0[k], sd1[k])
  # B = 0: the adapted model is bitwise the base model.
  np.testing.assert_array_equal(np.asarray(velocity(model, *INPUTS)), base_out)


def test_apply_lora_errors_name_the_problem_and_leave_the_model_alone():
  model = make_model()
  with pytest.raises(LoRAError, match="'ln_qkv' is not a Linear.*LayerNorm"):
    apply_lora(model, rank=2, alpha=2, targets=("q", "ln_qkv"), rngs=nnx.Rngs(0))
  with pytest.raises(LoRAError, match="'nope' is not a Linear.*missing"):
    apply_lora(model, rank=2, alpha=2, targets=("q", "nope"), rngs=nnx.Rngs(0))
  assert type(model.layers.q) is Linear         # validated before any change
  for rank in (0, -3, 2.5):
    with pytest.raises(LoRAError, match="rank must be a positive integer"):
      apply_lora(model, rank=rank, alpha=2, rngs=nnx.Rngs(0))
  with pytest.raises(LoRAError, match="targets are empty"):
    apply_lora(model, rank=2, alpha=2, targets=(), rngs=nnx.Rngs(0))
  apply_lora(model, rank=2, alpha=2, targets=("ada_modulate",), rngs=nnx.Rngs(0))
  with pytest.raises(LoRAError, match="layers.0.ada_modulate already has a LoRA adapter"):
    apply_lora(model, rank=2, alpha=2, targets=("q", "ada_modulate"), rngs=nnx.Rngs(0))
  with pytest.raises(LoRAError, match="no LoRA adapters"):
    merge_lora(make_model())
  with pytest.raises(LoRAError, match="without adapters"):
    split_trainable(make_model(), lora=True)


def test_merge_lora_gives_a_plain_model_with_the_adapted_output():
  model = randomize_adapters(adapted(), seed=5)
  before = lora_flat(model)
  merged = merge_lora(model)
  assert type(merged) is VideoDiT
  assert all(type(getattr(merged.layers, n)) is Linear for n in DEFAULT_TARGETS)
  assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  m = model.layers.fc1
  for i in range(2):                            # each layer merged with its own adapters
    w = np.asarray(m.kernel[...][i], np.float64)
    want = w + (np.asarray(m.lora_a[...][i], np.float64)
                @ np.asarray(m.lora_b[...][i], np.float64) * 2.0)
    np.testing.assert_allclose(np.asarray(merged.layers.fc1.kernel[...][i]), want, atol=1e-6)
  # Unadapted weights carried over exactly.
  np.testing.assert_array_equal(np.asarray(merged.layers.ada_modulate.kernel[...]),
                                np.asarray(model.layers.ada_modulate.kernel[...]))
  v_adapted = np.asarray(velocity(model, *INPUTS))
  v_merged = np.asarray(velocity(merged, *INPUTS))
  chex.assert_trees_all_close(v_merged, v_adapted, atol=1e-5, rtol=1e-5)
  assert np.abs(v_adapted - np.asarray(velocity(make_model(), *INPUTS))).max() > 1e-3
  # The adapted model itself is left unchanged.
  for p, v in lora_flat(model).items():
    np.testing.assert_array_equal(v, before[p])
  assert type(model.layers.fc1) is LoRALinear


def test_training_changes_only_the_adapters_and_lowers_the_loss():
  model = adapted()
  base0, lora0 = base_flat(model), lora_flat(model)
  optimizer, losses = train(model, 4)
  final = float(_loss(model, TARGET))
  assert final < losses[0] and losses[-1] < losses[0], (losses, final)
  for p, v in base_flat(model).items():          # every base parameter bitwise unchanged
    np.testing.assert_array_equal(v, base0[p], err_msg=str(p))
  for p, v in lora_flat(model).items():          # A and B both moved
    assert not np.array_equal(v, lora0[p]), p
  # The optimizer state holds only adapter-shaped tensors (Adam's two moments per adapter).
  adapter_shapes = sorted(v.shape for v in lora0.values())
  arrays = [l for l in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if np.ndim(l) > 0]
  assert sorted(np.shape(a) for a in arrays) == sorted(adapter_shapes * 2)


def test_split_trainable_round_trips_and_works_under_jit():
  model = randomize_adapters(adapted(), seed=2)
  graphdef, trainable, frozen = split_trainable(model, lora=True)
  flat_t = dict(nnx.to_flat_state(trainable))
  assert flat_t and all(isinstance(v, nnx.LoRAParam) for v in flat_t.values())
  assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(frozen))
  assert {p for p, _ in nnx.to_flat_state(frozen)} == set(base_flat(model))
  back = nnx.merge(graphdef, trainable, frozen)
  assert type(back.layers.q) is LoRALinear
  for p, v in lora_flat(back).items():
    np.testing.assert_array_equal(v, lora_flat(model)[p])
  # Functional use inside jax.jit: the merged module sees the traced adapters.
  f = jax.jit(lambda t, fr: nnx.merge(graphdef, t, fr).layers.q.merged_kernel())
  np.testing.assert_array_equal(np.asarray(f(trainable, frozen)),
                                np.asarray(model.layers.q.merged_kernel()))
  g2, all_params, rest = split_trainable(model, lora=False)
  n_params = len(base_flat(model)) + len(lora_flat(model))
  assert len(nnx.to_flat_state(all_params)) == n_params
  assert not jax.tree.leaves(rest)


def test_save_load_roundtrip_and_file_layout(tmp_path):
  model = randomize_adapters(adapted(), seed=3)
  path = tmp_path / "adapters" / "lora.safetensors"
  save_lora(path, model, rank=RANK, alpha=ALPHA, targets=DEFAULT_TARGETS)
  f = SafetensorsFile(str(path))
  # Per-layer names and tensors: layer i's adapter is slice i of the stacked one.
  stacked = lora_flat(model)
  assert set(f.keys()) == {f"layers.{i}.{n}.{leaf}" for i in range(2) for n in DEFAULT_TARGETS
                           for leaf in ("lora_a", "lora_b")}
  for (_, n, leaf), v in stacked.items():
    for i in range(2):
      np.testing.assert_array_equal(np.asarray(f.get(f"layers.{i}.{n}.{leaf}")), v[i])
  assert f.metadata["num_layers"] == "2"
  assert f.metadata["rank"] == str(RANK) and float(f.metadata["alpha"]) == ALPHA
  # A plain base model gets the file's configuration; an adapted one is filled.
  for target in (make_model(), adapted(seed=9)):
    loaded = load_lora(path, target)
    assert lora_config(loaded) == (RANK, ALPHA, DEFAULT_TARGETS)
    chex.assert_trees_all_equal(lora_flat(loaded), lora_flat(model))
  with pytest.raises(LoRAError, match="rank=8 but the model's adapters have rank 4"):
    save_lora(tmp_path / "x.safetensors", model, rank=8)
  with pytest.raises(LoRAError, match="targets"):
    save_lora(tmp_path / "x.safetensors", model, targets=("q",))


def _rewrite(src, dst, edit):
  f = SafetensorsFile(str(src))
  tensors = {k: np.array(f.get(k)) for k in f.keys()}
  meta = dict(f.metadata)
  edit(tensors, meta)
  save_safetensors(tensors, str(dst), metadata=meta)
  return dst


def test_load_lora_errors_name_the_problem(tmp_path):
  model = adapted()
  good = tmp_path / "good.safetensors"
  save_lora(good, model)
  fresh = lambda: adapted(seed=4)     # noqa: E731
  with pytest.raises(LoRAError, match="rank mismatch: the file has rank 4, the model's "
                                      "adapters rank 2"):
    load_lora(good, apply_lora(make_model(), rank=2, alpha=ALPHA, rngs=nnx.Rngs(0)))
  with pytest.raises(LoRAError, match="targets mismatch"):
    load_lora(good, apply_lora(make_model(), rank=RANK, alpha=ALPHA, targets=("q", "k"),
                               rngs=nnx.Rngs(0)))
  with pytest.raises(LoRAError, match="alpha mismatch"):
    load_lora(good, apply_lora(make_model(), rank=RANK, alpha=1.0, rngs=nnx.Rngs(0)))

  def drop(t, m):
    del t["layers.1.fc2.lora_b"]
  def extra(t, m):
    t["layers.7.q.lora_a"] = np.zeros((128, RANK), np.float32)
  def reshape(t, m):
    t["layers.0.k.lora_a"] = np.zeros((128, RANK + 1), np.float32)
  cases = [(drop, "1 missing: layers.1.fc2.lora_b"), (extra, "1 unexpected: layers.7.q.lora_a"),
           (reshape, r"layers.0.k.lora_a: file \(128, 5\), expected \(128, 4\)")]
  for i, (edit, msg) in enumerate(cases):
    bad = _rewrite(good, tmp_path / f"bad{i}.safetensors", edit)
    target = fresh()
    a0 = lora_flat(target)
    with pytest.raises(LoRAError, match=msg):
      load_lora(bad, target)
    chex.assert_trees_all_equal(lora_flat(target), a0)   # nothing loaded on error
  # Targets in the file that the model lacks, on a plain model.
  bad = _rewrite(good, tmp_path / "t.safetensors", lambda t, m: m.update(targets='["q", "zz"]'))
  with pytest.raises(LoRAError, match="'zz' is not a Linear"):
    load_lora(bad, make_model())
  # Corrupt / truncated / foreign / absent files name the file.
  data = good.read_bytes()
  trunc = tmp_path / "trunc.safetensors"
  trunc.write_bytes(data[: len(data) // 2])
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
  foreign = tmp_path / "foreign.safetensors"
  save_safetensors({"w": np.zeros(3, np.float32)}, str(foreign))
  for p, msg in ((trunc, "truncated"), (junk, "corrupt"), (foreign, "not a LoRA adapter file"),
                 (tmp_path / "absent.safetensors", "not found")):
    with pytest.raises(LoRAError, match=msg) as e:
      load_lora(p, make_model())
    assert str(p) in str(e.value)


def test_official_checkpoint_finetune_save_load_merge(tmp_path):
  cfg = tiny_config().model
  base = random_module(lambda: VideoDiT(cfg, precision=Precision.fp32(), rngs=nnx.Rngs(0)), 7)
  ckpt = str(tmp_path / "official")
  save_official_dit(base, ckpt)
  model = load_official_dit(ckpt, cfg)                     # strict loader
  base0 = base_flat(model)
  apply_lora(model, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(3))
  _, losses = train(model, 3)
  assert all(np.isfinite(losses))
  for p, v in base_flat(model).items():
    np.testing.assert_array_equal(v, base0[p])
  lora_path = tmp_path / "lora.safetensors"
  save_lora(lora_path, model, rank=RANK, alpha=ALPHA, targets=DEFAULT_TARGETS)
  assert lora_path.stat().st_size < 0.2 * sum(
      f.stat().st_size for f in (tmp_path / "official").iterdir())

  again = load_lora(lora_path, load_official_dit(ckpt, cfg))
  want = np.asarray(velocity(model, *INPUTS))
  got = np.asarray(velocity(again, *INPUTS))
  chex.assert_shape(got, INPUTS[0].shape)
  chex.assert_type(got, jnp.float32)
  np.testing.assert_array_equal(got, want)
  assert np.abs(want - np.asarray(velocity(load_official_dit(ckpt, cfg), *INPUTS))).max() > 0
  merged = merge_lora(again)
  chex.assert_trees_all_close(np.asarray(velocity(merged, *INPUTS)), want, atol=1e-5, rtol=1e-5)
  # The merged model exports to the official layout and strict-loads back.
  save_official_dit(merged, str(tmp_path / "merged"))
  reloaded = load_official_dit(str(tmp_path / "merged"), cfg)
  np.testing.assert_array_equal(np.asarray(velocity(reloaded, *INPUTS)),
                                np.asarray(velocity(merged, *INPUTS)))
