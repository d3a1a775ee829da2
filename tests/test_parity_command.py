"""`python -m magi_jax.official.parity` on the official fixtures:
passes, and fails when it should."""

import os
import shutil

import numpy as np
from conftest import FIXTURES

from magi_jax.formats.safetensors_io import SafetensorsFile, save_safetensors
from magi_jax.official.parity.__main__ import main


def test_dit_forward_parity_passes_with_activations(capsys):
  assert main([FIXTURES, "--only", "dit_forward", "--activations"]) == 0
  out = capsys.readouterr().out
  assert "PASS  dit_forward " in out and "FAIL" not in out
  assert "dit_forward/videodit_blocks.layers.1" in out and "dit_forward/rope" in out


def test_blockwise_backend_also_passes(capsys):
  assert main([FIXTURES, "--only", "dit_forward", "--backend", "blockwise"]) == 0


def test_a_wrong_weight_fails_and_activations_localise_it(tmp_path, capsys):
  d = tmp_path / "fx"
  shutil.copytree(FIXTURES, d)
  os.chmod(d / "dit_weights.safetensors", 0o644)
  f = SafetensorsFile(str(d / "dit_weights.safetensors"))
  sd = {k: np.array(f.get(k)) for k in f.keys()}
  del f
  # A per-feature bias error (a scaled fc2 or a uniform shift would be normalised away).
  key = "videodit_blocks.layers.1.mlp_post_norm.bias"
  sd[key] += 0.05 * np.random.default_rng(0).normal(size=sd[key].shape).astype(np.float32)
  save_safetensors(sd, str(d / "dit_weights.safetensors"))
  assert main([str(d), "--only", "dit_forward", "--activations"]) == 1
  out = capsys.readouterr().out
  assert "FAIL  dit_forward " in out
  assert "PASS  dit_forward/videodit_blocks.layers.0" in out      # layer 0 is still right
  assert "FAIL  dit_forward/videodit_blocks.layers.1" in out


def test_missing_fixture_and_unknown_check(tmp_path, capsys):
  assert main([str(tmp_path), "--only", "dit_forward"]) == 1
  assert "not found" in capsys.readouterr().out
  assert main([FIXTURES, "--only", "nope"]) == 2


def test_vae_io_parity_passes(capsys):
  assert main([FIXTURES, "--only", "vae_io"]) == 0
  out = capsys.readouterr().out
  assert "PASS  vae_io/decode_resized_pos" in out and "FAIL" not in out


def test_text_parity_passes(capsys):
  assert main([FIXTURES, "--only", "text", "--activations"]) == 0
  out = capsys.readouterr().out
  for name in ("text/clean_caption (twice, as the pipeline)", "text/token_ids",
               "text/t5_last_hidden_state", "text/act/block.1", "text/rows/t2v_10_chunks/y"):
    assert f"PASS  {name}" in out
  assert "FAIL" not in out


def test_text_parity_catches_a_wrong_cleaner_pair(tmp_path, capsys):
  import json
  import shutil
  shutil.copytree(os.path.join(FIXTURES, "text"), tmp_path / "text")
  path = tmp_path / "text" / "clean_caption.json"
  data = json.loads(path.read_text())
  data["pairs"][0]["output"] += "!"
  path.write_text(json.dumps(data))
  assert main([str(tmp_path), "--only", "text"]) == 1
  assert "FAIL  text/clean_caption (twice" in capsys.readouterr().out


def test_sampling_loop_parity_passes_for_both_guidance_modes(capsys):
  assert main([FIXTURES, "--only", "dit_sample_cfg3,dit_sample_cfg1"]) == 0
  out = capsys.readouterr().out
  for name in ("dit_sample_cfg3/final_latent", "dit_sample_cfg1/final_latent",
               "dit_sample_cfg3/per-call velocity", "dit_sample_cfg1/per-call kv_range"):
    assert f"PASS  {name}" in out
  assert "FAIL" not in out


def test_sampling_loop_parity_fails_on_a_wrong_final_latent(tmp_path, capsys):
  for name in ("dit_config.json", "dit_weights.safetensors"):
    shutil.copy(os.path.join(FIXTURES, name), tmp_path / name)
  f = SafetensorsFile(os.path.join(FIXTURES, "dit_sample_cfg1.safetensors"))
  data = {k: f.get(k) for k in f.keys()}
  data["out.final_latent"] = data["out.final_latent"].copy()
  data["out.final_latent"][0, 0, -1] += 0.01       # the last chunk, off by 1e-2
  save_safetensors(data, str(tmp_path / "dit_sample_cfg1.safetensors"), metadata=f.metadata)
  assert main([str(tmp_path), "--only", "dit_sample_cfg1"]) == 1
  assert "FAIL  dit_sample_cfg1/final_latent" in capsys.readouterr().out
