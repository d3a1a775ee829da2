"""Weights by Hugging Face repository id (magi_jax/convert/hub.py), offline on a fake cache.

The cache is built on disk in huggingface_hub's layout (models--owner--name/refs/<rev>,
snapshots/<commit>/<files>) with HF_HUB_OFFLINE=1, so nothing downloads: every released
preset resolves to the folders of the official repository's layout, a revision is a ref,
missing parts and revisions name the repository, revision and path, and a sampling config with
`--config.checkpoint=owner/name` loads the weights the cache holds.
"""

import os
import shutil

import numpy as np
import pytest

from experiments.configs.sample_common import sample_config
from magi_jax.configs import PRESETS, ConfigError, get_preset
from magi_jax.convert.hub import HubError, dit_dir, parse_hub_id, resolve

REPO = "sand-ai/MAGI-1"
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
RELEASED = [p for p in PRESETS if p != "tiny"]


def _snapshot(cache, repo, commit, ref="main"):
  root = cache / ("models--" + repo.replace("/", "--"))
  (root / "refs").mkdir(parents=True, exist_ok=True)
  (root / "refs" / ref).write_text(commit)
  snap = root / "snapshots" / commit
  snap.mkdir(parents=True, exist_ok=True)
  return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  cache = tmp_path / "hf"
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import huggingface_hub.constants as constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


def _fill(snap, folders):
  for folder in folders:
    (snap / folder).mkdir(parents=True, exist_ok=True)
    (snap / folder / "model.safetensors").write_bytes(b"placeholder")


def test_ids_and_local_paths(tmp_path):
  assert parse_hub_id("sand-ai/MAGI-1") == ("sand-ai/MAGI-1", None)
  assert parse_hub_id("sand-ai/MAGI-1@v1.0") == ("sand-ai/MAGI-1", "v1.0")
  (tmp_path / "a").mkdir()
  local = str(tmp_path / "a")
  assert parse_hub_id(local) is None and parse_hub_id("") is None
  assert parse_hub_id("not a/repo id") is None and parse_hub_id("a/b/c") is None


def test_every_released_preset_resolves_from_the_cache(offline_cache):
  snap = _snapshot(offline_cache, REPO, "a" * 40)
  folders = {dit_dir(p, get_preset(p)) for p in RELEASED} | {"ckpt/vae", "ckpt/t5/t5-v1_1-xxl"}
  _fill(snap, folders)
  assert dit_dir("4.5B_base", get_preset("4.5B_base")) == "ckpt/magi/4.5B_base/inference_weight"
  assert dit_dir("24B_distill", get_preset("24B_distill")) == \
      "ckpt/magi/24B_distill/inference_weight.distill"
  assert dit_dir("4.5B_distill_quant", get_preset("4.5B_distill_quant")) == \
      "ckpt/magi/4.5B_distill_quant/inference_weight.fp8.distill"
  for p in RELEASED:
    got = resolve(REPO, None, p, get_preset(p))
    assert got == {"dit": str(snap / dit_dir(p, get_preset(p))), "vae": str(snap / "ckpt/vae"),
                   "t5": str(snap / "ckpt/t5/t5-v1_1-xxl")}, p


def test_revisions_and_missing_parts_name_the_repository(offline_cache):
  main = _snapshot(offline_cache, REPO, "b" * 40)
  tagged = _snapshot(offline_cache, REPO, "c" * 40, ref="v2")
  _fill(main, ["ckpt/vae", "ckpt/t5/t5-v1_1-xxl"])           # no DiT on main
  _fill(tagged, ["ckpt/magi/4.5B_base/inference_weight", "ckpt/vae", "ckpt/t5/t5-v1_1-xxl"])
  cfg = get_preset("4.5B_base")
  assert resolve(REPO, "v2", "4.5B_base", cfg)["dit"].startswith(str(tagged))
  with pytest.raises(HubError, match=r"sand-ai/MAGI-1@main: no DIT weights at "
                                     r"ckpt/magi/4.5B_base/inference_weight/"):
    resolve(REPO, None, "4.5B_base", cfg)
  assert resolve(REPO, None, "4.5B_base", cfg, parts=("vae",)) == {"vae": str(main / "ckpt/vae")}
  with pytest.raises(HubError, match=r"sand-ai/MAGI-1@v9: not in the Hugging Face cache and "
                                     "HF_HUB_OFFLINE is set"):
    resolve(REPO, "v9", "4.5B_base", cfg)
  with pytest.raises(HubError, match=r"someone/else@main: not in the Hugging Face cache"):
    resolve("someone/else", None, "4.5B_base", cfg)


def test_a_sampling_config_loads_the_weights_the_cache_holds(offline_cache, tmp_path):
  """The tiny preset's DiT and VAE in the official layout and the tiny T5 fixture, in the
  repository's folders; build_from_config loads each from there."""
  import jax
  from conftest import make_model
  from magi_jax.generate import build_from_config
  from magi_jax.models import Precision
  from magi_jax.convert.load import TINY_VAE
  from magi_jax.models.vae import ViTVAE
  from magi_jax.official.dit import save_official_dit
  from magi_jax.official.vae import save_official_vae
  from flax import nnx
  snap = _snapshot(offline_cache, "me/tiny-magi", "d" * 40)
  cfg = get_preset("tiny")
  dit = make_model(seed=3)
  save_official_dit(dit, str(snap / dit_dir("tiny", cfg)))
  vae = ViTVAE(TINY_VAE, precision=Precision.fp32(), rngs=nnx.Rngs(2))
  save_official_vae(vae, str(snap / "ckpt/vae"))
  # T5 in the Hugging Face layout at the DiT's caption width (the fixture's tokenizer).
  from magi_jax.official.t5 import save_t5
  from magi_jax.text import T5Config, T5Encoder
  t5_dir = snap / "ckpt/t5/t5-v1_1-xxl"
  shutil.copytree(os.path.join(FIXTURES, "text", "t5_tiny"), t5_dir,
                  ignore=shutil.ignore_patterns("config.json", "model.safetensors"))
  d = cfg.model.caption_channels
  save_t5(T5Encoder(T5Config(vocab_size=500, d_model=d, d_kv=8, num_heads=4, d_ff=2 * d,
                             num_layers=1), rngs=nnx.Rngs(4)), str(t5_dir))
  sc = sample_config("tiny", checkpoint="me/tiny-magi", special_token_flags="",
                     precision="fp32", output=str(tmp_path / "x.mp4"), text_cache_dir="")
  comp, req, _, _ = build_from_config(sc)
  for a, b in zip(jax.tree.leaves(nnx.state(dit, nnx.Param)),
                  jax.tree.leaves(nnx.state(comp.dit, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 4, 16, 16)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(comp.vae.encode(x)), np.asarray(vae.encode(x)))
  assert comp.text.tokenizer is not None
  # A part given explicitly is not looked up; a missing repository names itself.
  sc.vae_checkpoint = str(snap / "ckpt/vae")
  build_from_config(sc)
  sc.checkpoint = "me/other"
  with pytest.raises(HubError, match="me/other@main: not in the Hugging Face cache"):
    build_from_config(sc)
  sc.checkpoint = "./no/such dir"
  with pytest.raises(ConfigError, match="neither a training run directory .* nor a Hugging "
                                        "Face repository id"):
    build_from_config(sc)
