"""The transformer VAE: building blocks against independent numpy, image/latent edge cases,
strict loading and config errors. (Numerical parity: tests/test_parity_command.py, vae_io.)"""

import json
import os

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from magi_jax.configs import ConfigError
from magi_jax.official.strict import CheckpointMismatchError
from magi_jax.formats.safetensors_io import SafetensorsFile
from magi_jax.official.vae import load_official_vae, save_official_vae
from magi_jax.models import Precision
from magi_jax.models.pos_resize import resize_axis
from magi_jax.models.vae import head_norm, vae_config_from_dict


def _cfg_dict():
  with open(os.path.join(FIXTURES, "vae_config.json")) as f:
    return json.load(f)


def _weights():
  f = SafetensorsFile(os.path.join(FIXTURES, "vae_weights.safetensors"))
  return {k: np.array(f.get(k)) for k in f.keys()}


@pytest.fixture(scope="module")
def vae():
  return load_official_vae(_weights(), vae_config_from_dict(_cfg_dict()))


@pytest.mark.parametrize("n_in,n_out", [(4, 3), (4, 1), (32, 6), (4, 4), (3, 7)])
def test_linear_resize_matches_torch_formula(n_in, n_out):
  x = np.random.default_rng(n_in * 10 + n_out).normal(size=(2, n_in, 5)).astype(np.float32)
  want = np.zeros((2, n_out, 5), np.float64)
  for d in range(n_out):                      # align_corners=False, no antialias
    src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = int(np.floor(src))
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    want[:, d] = (1 - lam) * x[:, i0] + lam * x[:, i1]
  # float32 source coordinates (as the official kernel) vs float64 here: rounding-level gap.
  np.testing.assert_allclose(resize_axis(jnp.asarray(x), 1, n_out), want, atol=1e-5)


def test_head_norm_adds_eps_to_the_std():
  u = np.random.default_rng(0).normal(size=(3, 7, 64)).astype(np.float32) * 1e-4
  mean = u.mean(-1, keepdims=True)
  want = (u - mean) / (u.std(-1, keepdims=True) + 1e-5)   # not sqrt(var + eps)
  np.testing.assert_allclose(head_norm(jnp.asarray(u)), want, rtol=1e-4, atol=1e-5)


def test_single_image_is_encoded_as_four_repeated_frames(vae):
  img = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 1, 32, 32)).astype(np.float32)
  z = vae.encode(img)
  chex.assert_shape(z, (2, 16, 1, 4, 4))
  clip = np.repeat(img, 4, axis=2)
  np.testing.assert_allclose(z, vae.moments(clip)[:, :16, :1], atol=1e-6)


def test_decode_shapes_and_one_latent_frame_gives_one_frame(vae):
  z = np.random.default_rng(2).normal(size=(1, 16, 3, 4, 6)).astype(np.float32)
  out = vae.decode(z)
  chex.assert_shape(out, (1, 3, 12, 32, 48))
  chex.assert_type(out, jnp.float32)
  one = vae.decode(z[:, :, :1])
  chex.assert_shape(one, (1, 3, 1, 32, 48))


def test_encoder_drops_trailing_frames_like_a_stride_4_conv(vae):
  x = np.random.default_rng(3).uniform(-1, 1, size=(1, 3, 10, 32, 32)).astype(np.float32)
  np.testing.assert_array_equal(vae.moments(x), vae.moments(x[:, :, :8]))


def test_bf16_mode_is_close_to_fp32():
  cfg = vae_config_from_dict(_cfg_dict())
  w = _weights()
  f32 = load_official_vae(w, cfg)
  bf = load_official_vae(w, cfg, precision=Precision.bf16())
  z = np.random.default_rng(4).normal(size=(1, 16, 2, 4, 4)).astype(np.float32)
  a, b = np.asarray(f32.decode(z)), np.asarray(bf.decode(z))
  assert np.abs(a - b).max() / np.abs(a).max() < 5e-2
  assert not np.array_equal(a, b)            # the bf16 path really rounds


def test_official_directory_roundtrip_and_strict_errors(tmp_path, vae):
  save_official_vae(vae, str(tmp_path / "vae"))
  again = load_official_vae(str(tmp_path / "vae"))
  x = np.random.default_rng(5).uniform(-1, 1, size=(1, 3, 4, 32, 32)).astype(np.float32)
  np.testing.assert_array_equal(vae.encode(x), again.encode(x))
  w = _weights()
  del w["decoder.blocks.0.norm2.bias"]
  with pytest.raises(CheckpointMismatchError, match="decoder.blocks.0.norm2.bias"):
    load_official_vae(w, vae.cfg)
  w = _weights()
  w["encoder.pos_embed"] = w["encoder.pos_embed"][:, :-1]
  with pytest.raises(CheckpointMismatchError, match="mis-shaped.*encoder.pos_embed"):
    load_official_vae(w, vae.cfg)


@pytest.mark.parametrize("edit,word", [
    (lambda d: d["ddconfig"].pop("depth"), "depth"),
    (lambda d: d["ddconfig"].update(colour=1), "colour"),
    (lambda d: d["ddconfig"].update(ln_in_attn=False), "ln_in_attn"),
    (lambda d: d["ddconfig"].update(embed_dim=200), "embed_dim"),
    (lambda d: d.update(_class_name="AutoencoderKL"), "ViTVAE"),
])
def test_bad_vae_config_names_the_field(edit, word):
  d = _cfg_dict()
  edit(d)
  with pytest.raises(ConfigError, match=word):
    vae_config_from_dict(d)


def test_convert_command_roundtrips_the_vae(tmp_path, vae):
  import subprocess
  import sys
  save_official_vae(vae, str(tmp_path / "official"))
  run = lambda *a: subprocess.run([sys.executable, "-m", "magi_jax.convert", "--model=vae", *a],
                                  check=True, capture_output=True, text=True)
  run(f"--src={tmp_path / 'official'}", f"--dst={tmp_path / 'orbax'}", "--precision=fp32")
  run(f"--src={tmp_path / 'orbax'}", f"--dst={tmp_path / 'back'}", "--to=official",
      "--precision=fp32")
  a = SafetensorsFile(str(tmp_path / "official" / "diffusion_pytorch_model.safetensors"))
  b = SafetensorsFile(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
  assert sorted(a.keys()) == sorted(b.keys())
  for k in a.keys():
    np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=k)
  from magi_jax.convert.orbax_io import load_converted_vae
  restored = load_converted_vae(str(tmp_path / "orbax"))
  z = np.random.default_rng(6).normal(size=(1, 16, 1, 4, 4)).astype(np.float32)
  np.testing.assert_array_equal(vae.decode(z), restored.decode(z))
