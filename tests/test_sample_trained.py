"""Sampling what you trained: `experiments.sample --config.checkpoint=<run dir>`.

One `:smoke` bouncing run (pixel space, demo text encoder, EMA) is the source. The command's
sampler is the one the run's own evaluation builds (same weights, settings and geometry), the
prefix of a V2V request comes back unchanged in front of the generated frames (an I2V image
conditions every call), a LoRA
file is merged with its scale (checked against W + A·B·alpha/rank·scale formed from the file),
and bad requests fail naming the field.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.configs import bouncing_tiny
from experiments.configs.sample_common import sample_config
from magi_jax.configs import ConfigError
from magi_jax.generate.trained import apply_lora, generate_run, is_run_dir, load_run
from magi_jax.media.write import write_video
from magi_jax.train.trainer import load_trained, train

pytestmark = pytest.mark.usefixtures("compile_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  base = tmp_path_factory.mktemp("trained")
  c = bouncing_tiny.get_config("smoke")
  c.total_steps, c.checkpoint_every = 4, 2
  c.data.data_dir = str(base / "tfds")
  workdir = base / "run"
  train(c, str(workdir), echo=lambda *_: None)
  return workdir


@pytest.fixture(scope="module")
def run(run_dir):
  return load_run(_sc(run_dir))


def _kernels(dit, names=("q", "fc2")):
  return {n: np.asarray(getattr(dit.layers, n).kernel[...]) for n in names}


def _sc(run_dir, **kw):
  sc = sample_config("tiny", checkpoint=str(run_dir), prompt="a red ball", seed=3,
                     progress=False)
  sc.update(kw)
  return sc


def test_the_command_samples_like_the_runs_own_evaluation(run_dir, run):
  from magi_jax.proj.bouncing.evaluation import make_sampler
  from magi_jax.generate import trained
  from magi_jax.train import checkpoint
  assert trained.RUN_FILE == checkpoint.RUN_FILE
  assert is_run_dir(str(run_dir)) and not is_run_dir(str(run_dir / "checkpoints"))
  c, model, tok, step = load_trained(str(run_dir))
  assert (run.step, step) == (4, 4)
  world = c.data.world
  assert (run.height, run.width, run.frames_per_chunk, run.num_chunks, run.latent) == (
      world.height, world.width, world.frames_per_chunk,
      world.num_frames // world.frames_per_chunk, False)
  got = generate_run(run, _sc(run_dir))
  want = make_sampler(c, model, tok).generate(["a red ball"] * run.num_chunks,
                                              num_chunks=run.num_chunks, height=world.height,
                                              width=world.width, seed=3)
  assert got.dtype == np.uint8 and got.shape == (world.num_frames, world.height, world.width, 3)
  np.testing.assert_array_equal(got, want)
  assert np.abs(generate_run(run, _sc(run_dir, seed=4)).astype(int) - got).max() > 0
  longer = generate_run(run, _sc(run_dir, num_frames=3 * run.frames_per_chunk))
  assert longer.shape[0] == 3 * run.frames_per_chunk
  with pytest.raises(ConfigError, match="num_frames=5: this run's chunks are 4 frames"):
    generate_run(run, _sc(run_dir, num_frames=5))


def test_step_and_ema_choose_the_weights(run_dir, run):
  """`step` and `use_ema` pick the checkpoint and the weights the trainer saved."""
  kernels = {}
  for kw, (step, ema) in (({}, (None, True)), ({"use_ema": False}, (None, False)),
                          ({"step": 2}, (2, True))):
    got = run if not kw else load_run(_sc(run_dir, **kw))
    _, model, _, want_step = load_trained(str(run_dir), step=step, use_ema=ema)
    assert got.step == want_step == (step or 4)
    kernels[(step, ema)] = _kernels(got.sampler.model.dit)
    for n, k in kernels[(step, ema)].items():
      np.testing.assert_array_equal(k, _kernels(model.dit)[n])
  assert np.abs(kernels[(None, False)]["q"] - kernels[(None, True)]["q"]).max() > 0
  assert np.abs(kernels[(2, True)]["q"] - kernels[(None, True)]["q"]).max() > 0


def test_v2v_and_i2v_keep_their_prefix(run_dir, run, tmp_path):
  F = run.frames_per_chunk
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 256, (F + 1, run.height, run.width, 3), dtype=np.uint8)
  path = str(tmp_path / "clip.gif")
  write_video(path, clip, fps=8)                    # the run's sample.fps
  from magi_jax.media import read_image, read_video
  prefix = read_video(path, run.height, run.width, fps=8, max_frames=None, multiple=1)[:F]
  v2v = generate_run(run, _sc(run_dir, mode="v2v", video=path, prefix_frames=0))
  assert v2v.shape[0] == run.num_chunks * F
  np.testing.assert_array_equal(v2v[:F], prefix)
  Image = pytest.importorskip("PIL.Image")
  img_path = str(tmp_path / "first.png")
  Image.fromarray(clip[0]).save(img_path)
  # I2V: the image is the first frame of every call's input (the official padding), not a
  # clean chunk, so the output is num_chunks chunks that the image conditions.
  i2v = generate_run(run, _sc(run_dir, mode="i2v", image=img_path))
  assert i2v.shape[0] == run.num_chunks * F
  t2v = generate_run(run, _sc(run_dir))
  assert np.abs(i2v.astype(int) - t2v).max() > 0
  assert read_image(img_path, run.height, run.width, multiple=1).shape == (1, 24, 24, 3)


def test_a_lora_file_is_merged_with_its_scale(run_dir, tmp_path):
  from magi_jax.formats.safetensors_io import SafetensorsFile
  from magi_jax.train import lora
  _, model, _, _ = load_trained(str(run_dir))
  base = jax.tree.map(np.asarray, jax.device_get(
      {n: getattr(model.dit.layers, n).kernel[...] for n in ("q", "fc2")}))
  adapted = model.dit
  lora.apply_lora(adapted, rank=2, alpha=4.0, targets=("q", "fc2"), rngs=nnx.Rngs(5))
  for n in ("q", "fc2"):
    layer = getattr(adapted.layers, n)
    layer.lora_b[...] = jax.random.normal(jax.random.key(1), layer.lora_b.shape) * 0.1
  path = str(tmp_path / "lora.safetensors")
  lora.save_lora(path, adapted)
  f = SafetensorsFile(path)
  _, fresh, _, _ = load_trained(str(run_dir))
  merged = apply_lora(fresh.dit, path, 0.5)
  L = base["q"].shape[0]
  for n in ("q", "fc2"):
    a = np.stack([f.get(f"{lora._key(i, n)}.lora_a") for i in range(L)])
    b = np.stack([f.get(f"{lora._key(i, n)}.lora_b") for i in range(L)])
    want = base[n] + np.matmul(a, b) * (4.0 / 2) * 0.5
    np.testing.assert_allclose(np.asarray(getattr(merged.layers, n).kernel[...]), want,
                               rtol=1e-5, atol=1e-6)
  # Through the command: the run's DiT with the file merged at scale 1.
  got = _kernels(load_run(_sc(run_dir, lora=path)).sampler.model.dit)
  for n in ("q", "fc2"):
    a = np.stack([f.get(f"{lora._key(i, n)}.lora_a") for i in range(L)])
    b = np.stack([f.get(f"{lora._key(i, n)}.lora_b") for i in range(L)])
    np.testing.assert_allclose(got[n], base[n] + np.matmul(a, b) * 2.0, rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="--config.lora=.*does not exist"):
    load_run(_sc(run_dir, lora=str(tmp_path / "missing.safetensors")))
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"not a safetensors file at all")
  with pytest.raises(ConfigError, match="--config.lora: cannot read LoRA adapter file"):
    load_run(_sc(run_dir, lora=str(junk)))


def test_bad_requests_name_the_field(run_dir, run, tmp_path):
  from magi_jax.generate import build_from_config
  with pytest.raises(ConfigError, match="drop --config.dit_checkpoint"):
    load_run(_sc(run_dir, dit_checkpoint=str(tmp_path)))
  with pytest.raises(ConfigError, match="height / width: a training run samples at its data"):
    generate_run(run, _sc(run_dir, height=48))
  with pytest.raises(ConfigError, match="mode='x2v'"):
    generate_run(run, _sc(run_dir, mode="x2v"))
  with pytest.raises(ConfigError, match="neither a training run directory"):
    build_from_config(_sc(run_dir / "checkpoints"))


def test_the_sample_command_writes_a_video_of_the_run(run_dir, tmp_path, compile_cache):
  out = tmp_path / "trained.mp4"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compile_cache)
  proc = subprocess.run([sys.executable, "-m", "experiments.sample",
                         f"--config.checkpoint={run_dir}", "--config.prompt=a blue square",
                         f"--config.output={out}", "--config.progress=False"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert f"wrote {out}: 8 frames, 24x24, 2 chunks" in proc.stdout
  from magi_jax.media import read_video
  assert read_video(str(out), 24, 24, fps=8, max_frames=None, multiple=1).shape[0] == 8


def test_a_latent_runs_vae_is_the_one_it_trained_with(tmp_path):
  """Sampling loads the run's VAE as training does (`build.frozen_vae`): random weights only
  for `random_tiny`; an official VAE without a path is an error, never random weights."""
  from magi_jax.convert.load import ComponentError
  from magi_jax.train.build import frozen_vae
  c = bouncing_tiny.get_config("smoke")
  assert frozen_vae(c) is None                                  # pixel space
  c.vae.kind = "random_tiny"
  a, b = frozen_vae(c), frozen_vae(c)
  np.testing.assert_array_equal(np.asarray(a.encoder.patch_embed.kernel[...]),
                                np.asarray(b.encoder.patch_embed.kernel[...]))
  c.vae.kind = "official"
  with pytest.raises(ComponentError, match="no VAE checkpoint given"):
    frozen_vae(c)
  with pytest.raises(ComponentError, match="not found"):
    frozen_vae(c, str(tmp_path / "missing"))
