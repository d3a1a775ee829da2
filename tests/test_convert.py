"""Official checkpoint layout: strict loading, fp8 dequantization, sharding, orbax round trip."""

import json
import os

import chex
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES, make_model
from flax import nnx

from magi_jax.configs import load_magi_config, tiny_config
from magi_jax.convert import load_converted, save_converted
from magi_jax.formats.safetensors_io import CheckpointFormatError, save_safetensors
from magi_jax.official.dit import (CheckpointMismatchError, dequantize_fp8, load_official_dit,
                                   official_state_dict, save_official_dit)
from magi_jax.official.dit_layout import proj_to_model
from magi_jax.formats.safetensors_io import SafetensorsFile
from magi_jax.models import Precision
from magi_jax.official.forward import jit_forward


def _weights():
  f = SafetensorsFile(os.path.join(FIXTURES, "dit_weights.safetensors"))
  return {k: f.get(k) for k in f.keys()}


def _cfg():
  return load_magi_config(os.path.join(FIXTURES, "dit_config.json"), allow_extra_sections=True)


def _params(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_fixture_weights_load_and_export_bit_exact():
  sd = _weights()
  model = load_official_dit(sd, _cfg().model)
  back = official_state_dict(model)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_interleave8_is_undone_by_the_converter():
  # Official columns are [self g0, cross g0, self g1, cross g1, ...] in 8 groups.
  P, D = 16, 3
  w = np.zeros((D, 2 * P), np.float32)
  for g in range(8):
    for n in range(2):
      for d in range(P // 8):
        w[:, (g * 2 + n) * (P // 8) + d] = 1000 * n + 10 * g + d   # value names its source
  (kernel,) = proj_to_model(w)
  want = [1000 * n + 10 * g + d for n in range(2) for g in range(8) for d in range(P // 8)]
  np.testing.assert_array_equal(kernel[:, 0], want)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshaped"])
def test_strict_loading_names_the_bad_tensor(problem):
  sd = _weights()
  key = "videodit_blocks.layers.1.self_attention.linear_qkv.k.weight"
  if problem == "missing":
    del sd[key]
  elif problem == "unexpected":
    sd["videodit_blocks.layers.2.mlp.linear_fc1.weight"] = np.zeros((4, 4), np.float32)
    key = "videodit_blocks.layers.2.mlp.linear_fc1.weight"
  else:
    sd[key] = sd[key][:-1]
  with pytest.raises(CheckpointMismatchError,
                     match=problem.replace("misshaped", "mis-shaped")) as e:
    load_official_dit(sd, _cfg().model)
  assert key in str(e.value)


def test_sharded_directory_roundtrip_and_bf16_dtypes(tmp_path):
  model = make_model()
  save_official_dit(model, str(tmp_path / "ckpt"), max_shard_bytes=200_000,
                    dtype=ml_dtypes.bfloat16)
  files = sorted(os.listdir(tmp_path / "ckpt"))
  assert "model.safetensors.index.json" in files and len(files) > 2
  loaded = load_official_dit(str(tmp_path / "ckpt"), model.cfg, precision=Precision.bf16())
  p = _params(loaded)
  # Promoted (float32) and bf16 parameters, as the official loader leaves them.
  assert p[("layers", "q_norm", "weight")].dtype == np.float32
  assert p[("x_embedder", "kernel")].dtype == np.float32
  assert p[("layers", "q", "kernel")].dtype == jnp.bfloat16
  assert p[("layers", "qx_norm", "weight")].dtype == jnp.bfloat16
  ref = _params(model)
  for k, v in p.items():
    np.testing.assert_allclose(v.astype(np.float32),
                               ref[k].astype(ml_dtypes.bfloat16).astype(np.float32),
                               err_msg=str(k))


def test_missing_shard_and_corrupt_file_errors(tmp_path):
  model = make_model()
  d = tmp_path / "ckpt"
  save_official_dit(model, str(d), max_shard_bytes=200_000)
  index = json.loads((d / "model.safetensors.index.json").read_text())
  victim = sorted(set(index["weight_map"].values()))[0]
  data = (d / victim).read_bytes()
  (d / victim).write_bytes(data[: len(data) // 2])                 # truncated
  with pytest.raises(CheckpointFormatError, match="truncated"):
    load_official_dit(str(d), model.cfg)
  os.remove(d / victim)
  with pytest.raises(CheckpointFormatError, match="not found"):
    load_official_dit(str(d), model.cfg)
  with pytest.raises(CheckpointFormatError, match="no model.safetensors"):
    load_official_dit(str(tmp_path), model.cfg)


def test_fp8_dequantization_matches_the_fp8_gemm_without_activation_rounding():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(1, 6, 5)).astype(ml_dtypes.float8_e4m3fn)
  ws = np.array([0.02], np.float32)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  # Per-tensor type: x / input_scale (vector), product times input_scale[0] * weight_scale.
  inp = np.array([0.5, 0.5, 0.25, 0.5, 1.0], np.float32)
  y_ref = ((x / inp) @ w[0].astype(np.float32).T) * inp[0] * ws[0]
  np.testing.assert_allclose(x @ dequantize_fp8(w, ws, inp).T, y_ref, rtol=1e-5)
  # Per-channel type: x / smooth_scale, product times input_scale * weight_scale.
  ss = np.array([[1.0, 2.0, 0.5, 1.5, 3.0]], np.float32)
  isc = np.array([0.7], np.float32)
  y_ref = ((x / ss) @ w[0].astype(np.float32).T) * isc[0] * ws[0]
  np.testing.assert_allclose(x @ dequantize_fp8(w, ws, isc, ss).T, y_ref, rtol=1e-5)


def test_fp8_checkpoint_loads_dequantized(tmp_path):
  model = make_model()
  sd = official_state_dict(model)
  key = "videodit_blocks.layers.1.mlp.linear_fc2.weight"
  w8 = sd[key][None].astype(ml_dtypes.float8_e4m3fn)
  sd[key] = w8
  sd[key.replace("weight", "weight_scale")] = np.array([0.5], np.float32)
  sd[key.replace("weight", "input_scale")] = np.array([2.0], np.float32)
  sd[key.replace("weight", "smooth_scale")] = np.full((1, w8.shape[-1]), 4.0, np.float32)
  d = tmp_path / "fp8"
  d.mkdir()
  save_safetensors(sd, str(d / "model.safetensors"))
  loaded = load_official_dit(str(d), model.cfg)
  got = _params(loaded)[("layers", "fc2", "kernel")]
  want = (w8[0].astype(np.float32) * 0.5 * 2.0 / 4.0).T
  np.testing.assert_array_equal(got[1], want)
  # The other layer's slice of the stacked kernel is the plain float32 tensor.
  np.testing.assert_array_equal(got[0], sd[key.replace("layers.1", "layers.0")].T)


def test_orbax_roundtrip_same_outputs(tmp_path):
  cfg = tiny_config()
  model = make_model()
  save_converted(model, cfg, str(tmp_path / "conv"), precision="fp32")
  restored, cfg2 = load_converted(str(tmp_path / "conv"))
  assert cfg2 == cfg
  a, b = _params(model), _params(restored)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
  x = np.random.default_rng(0).normal(size=(1, 16, 2, 8, 8)).astype(np.float32)
  y = np.ones((1, 1, 64, 32), np.float32)
  args = (x, np.array([[0.4]]), y, np.ones((1, 1, 64)), np.array([[0, 32]]))
  out_a = jit_forward(model)(*args).velocity
  out_b = jit_forward(restored)(*args).velocity
  chex.assert_trees_all_equal(out_a, out_b)
  with pytest.raises(FileExistsError):
    save_converted(model, cfg, str(tmp_path / "conv"), precision="fp32")


def test_orbax_directory_from_before_layer_stacking_still_loads(tmp_path):
  """A converted DiT saved with per-layer paths (`layers/<i>/q/kernel`, the layout before the
  layers were stacked) restores into the stacked model, layer i into index i."""
  import shutil
  import orbax.checkpoint as ocp
  model = make_model()
  save_converted(model, tiny_config(), str(tmp_path / "conv"), precision="fp32")
  flat = []
  for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if p[0] != "layers":
      flat.append((p, var))
      continue
    flat += [(("layers", i) + p[1:], var.replace(var.get_value()[i]))
             for i in range(var.get_value().shape[0])]
  params = tmp_path / "conv" / "params"
  shutil.rmtree(params)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(str(params), nnx.from_flat_state(flat))
  ckptr.wait_until_finished()
  restored, _ = load_converted(str(tmp_path / "conv"))
  a, b = _params(model), _params(restored)
  assert a.keys() == b.keys() and b[("layers", "q", "kernel")].shape[0] == 2
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_orbax_restore_with_wrong_config_fails_clearly(tmp_path):
  model = make_model()
  save_converted(model, tiny_config(), str(tmp_path / "conv"), precision="fp32")
  cfg_path = tmp_path / "conv" / "magi_config.json"
  d = json.loads(cfg_path.read_text())
  d["model_config"]["num_layers"] = 3
  cfg_path.write_text(json.dumps(d))
  with pytest.raises(CheckpointFormatError, match="does not match"):
    load_converted(str(tmp_path / "conv"))
