"""`sample.kv_chunks`: the sampler's bounded attention (MAGI's clean_chunk_kvrange /
noise2clean_kvrange with one width), as the trainer's sampling and `experiments.evaluate` set
it. The width reaches the sampler's config, bad values are refused by name, and on a 1-layer
model a generated chunk no longer depends on a prefix chunk outside its width (and does
without the bound)."""

import numpy as np
import pytest

from magi_jax.train.samples import SampleSettings


def test_the_width_reaches_the_sampler_config():
  from experiments.configs import bouncing_tiny
  from magi_jax.train import build
  from magi_jax.train.samples import sampler_config
  from experiments.configs.train_common import train_config
  assert build.sample_settings(train_config()).kv_chunks == 0          # the trainer's default
  c = bouncing_tiny.get_config("smoke")
  assert build.sample_settings(c).kv_chunks == 4                       # the demo's 4-chunk videos
  tok = build.tokenizer_for(c)
  dit = build.build_model(c, tok, with_teacher=False).dit
  rt = sampler_config(dit, 4, SampleSettings()).runtime
  assert tuple(rt.noise2clean_kvrange) == () and rt.clean_chunk_kvrange == -1
  c.sample.kv_chunks = 3
  rt = sampler_config(dit, 4, build.sample_settings(c)).runtime
  assert tuple(rt.noise2clean_kvrange) == (3,) and rt.clean_chunk_kvrange == 3


def test_a_run_saved_before_the_field_samples_with_every_chunk():
  from experiments.configs import bouncing_tiny
  from magi_jax.train import build
  c = bouncing_tiny.get_config("smoke")
  del c.sample["kv_chunks"]
  assert build.sample_settings(c).kv_chunks == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_widths_are_refused(bad):
  with pytest.raises(ValueError, match="sample.kv_chunks"):
    SampleSettings(kv_chunks=bad)


@pytest.fixture(scope="module")
def tiny():
  from experiments.configs import bouncing_tiny
  from magi_jax.train import build
  c = bouncing_tiny.get_config("smoke")          # 1 layer: keys are projections of the input
  tok = build.tokenizer_for(c)
  return c, tok, build.build_model(c, tok, with_teacher=False)


def _continue(tiny, kv_chunks, prefix):
  from magi_jax.train.samples import VideoSampler
  c, tok, model = tiny
  s = SampleSettings(num_steps=2, window_size=2, prev_scale=2.0, kv_chunks=kv_chunks)
  vs = VideoSampler(model, tok, chunk_width=c.objective.chunk_width,
                    prediction=c.model.prediction, settings=s)
  video = vs.generate(["a red ball"], num_chunks=4, height=24, width=24, seed=0,
                      prefix_frames=prefix)
  assert video.shape == (16, 24, 24, 3)
  np.testing.assert_array_equal(video[:12], prefix)
  return video[12:]


def test_a_chunk_outside_the_width_does_not_reach_the_generated_chunk(tiny):
  """Prefix of 3 clean chunks that differ only in chunk 0; the generated chunk 3 with width 2
  sees chunks 2 and 3 only (one layer: nothing carries chunk 0 forward), so it is the same for
  both prefixes; with every earlier chunk in range it differs."""
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, size=(12, 24, 24, 3), dtype=np.uint8)
  b = a.copy()
  b[:4] = rng.integers(0, 256, size=(4, 24, 24, 3), dtype=np.uint8)
  np.testing.assert_array_equal(_continue(tiny, 2, a), _continue(tiny, 2, b))
  full_a, full_b = _continue(tiny, 0, a), _continue(tiny, 0, b)
  assert np.abs(full_a.astype(int) - full_b.astype(int)).max() > 0
  # Width 3 reaches chunk 1 but not chunk 0: still the same.
  np.testing.assert_array_equal(_continue(tiny, 3, a), _continue(tiny, 3, b))
