"""The runtime detection and memory plan of magi_jax/device_plan, and the loading order it asks
for (`text_first`, `t5_device`, `t5_dtype` in `build_from_config`).

Runtimes are built from the readings a Colab runtime gives (device kind, allocator limit, host
memory); the plan's decisions are checked against sizes worked out by hand from the presets,
and its step estimate against the TPU compiler's own figures (README, `magi_jax.aot`).
"""

import os
import weakref

import jax
import numpy as np
import pytest

from magi_jax.configs import get_preset, num_parameters
from magi_jax.device_plan import PlanError, choose, detect, runtime_of
from magi_jax.device_plan.detect import host_available_gib
from magi_jax.device_plan.estimate import GIB, part_sizes

T4 = runtime_of("gpu", "Tesla T4", 1, int(14.25 * GIB), 12.0)        # Colab free GPU, 95%
V5E = runtime_of("tpu", "TPU v5 lite", 1, None, 47.0)                 # Colab free TPU
A100 = runtime_of("gpu", "NVIDIA A100-SXM4-40GB", 1, int(38 * GIB), 80.0)


def test_runtime_readings():
  assert (T4.platform, T4.label, T4.device_gib, T4.memory_source) == (
      "gpu", "NVIDIA T4 x1", 14.25, "allocator limit")
  assert (V5E.label, V5E.device_gib, V5E.memory_source) == (
      "TPU v5e x1", 15.75, "known figure for this kind")
  assert runtime_of("cuda", "NVIDIA L4", 1, int(21 * GIB), 50.0).platform == "gpu"
  cpu = runtime_of("cpu", "cpu", 1, None, 20.5)
  assert (cpu.label, cpu.device_gib) == ("CPU", 20.5)
  with pytest.raises(ValueError, match="reports no memory limit"):
    runtime_of("gpu", "Some New Card", 1, None, 10.0)
  here = detect()                            # this machine: the CPU
  assert here.platform == "cpu" and here.host_gib > 0


def test_host_memory_from_meminfo(tmp_path):
  f = tmp_path / "meminfo"
  f.write_text("MemTotal:       32000000 kB\nMemAvailable:   12582912 kB\n")
  assert host_available_gib(str(f)) == 12.0


def test_part_sizes_by_hand():
  cfg = get_preset("4.5B_distill")
  s = part_sizes(cfg, 480, 832)
  assert s.dit_weights == num_parameters(cfg.model) * 2
  # 60x104 latents, patch 2: 30·52 = 1,560 tokens per frame, 6 frames a chunk: 9,360; the
  # steady state reads one cached chunk: 34 layers x 9,360 x 8 kv groups x 128 x K,V x bf16.
  assert s.kv_cache == 34 * 9360 * 8 * 128 * 2 * 2
  # The refresh call: 5 chunks and the nearly-clean copy (README: 56,160 tokens).
  assert s.step_tokens == 6 * 9360
  assert s.t5_weights("float32") == 2 * s.t5_weights("bfloat16") == s.t5_params * 4
  # T5 v1.1 XXL's encoder (the compiler's bf16 argument figure is 8.87 GiB).
  assert abs(s.t5_weights("bfloat16") / GIB - 8.87) < 0.01


@pytest.mark.parametrize("preset,size,compiler_temp_gib", [
    ("4.5B_distill", (480, 832), 3.46),     # v5e:1x1, step refresh call (README table)
    ("4.5B_base", (720, 1280), 21.97),      # v6e:1x1, cfg 3 refresh call
])
def test_step_estimate_covers_the_tpu_compilers_figure(preset, size, compiler_temp_gib):
  est = part_sizes(get_preset(preset), *size).step_temp / GIB
  assert compiler_temp_gib <= est <= 1.3 * compiler_temp_gib


def test_free_tpu_v5e_plan():
  p = choose("4.5B_distill", V5E)
  # 720x720 needs 8.31 + 1.58 + 5.42 + 1.14 GiB > 15.75·0.95; 480x832 is the largest that fits.
  assert (p.height, p.width, p.fits) == (480, 832, True)
  assert "does not" in p.size_note
  # T5 in float32 (17.7 GiB) fits on the host (47 GiB) but not the chip: encode there first.
  assert (p.t5_dtype, p.t5_device, p.text_first) == ("float32", "cpu", True)
  assert p.sampling_gib <= p.budget_gib


def test_free_t4_plan():
  p = choose("4.5B_distill", T4)
  assert (p.height, p.width, p.fits) == (480, 480, True)
  # Neither float32 place fits (device 13.5 GiB budget, host 12 GiB): bfloat16 on the card,
  # freed before the DiT loads.
  assert (p.t5_dtype, p.t5_device, p.text_first) == ("bfloat16", "", True)


def test_a100_keeps_the_preset_and_t5_in_float32():
  p = choose("4.5B_distill", A100)
  assert (p.height, p.width) == (720, 720)
  assert (p.t5_dtype, p.t5_device, p.text_first) == ("float32", "", False)
  text = p.describe()
  assert "stays loaded next to the DiT" in text and text.endswith("fits: yes")


def test_what_does_not_fit_says_what_would():
  p = choose("24B_distill", T4)
  assert not p.fits and (p.height, p.width) == (720, 1280)
  assert "int8" in p.problem and "4.5B_distill" in p.problem
  with pytest.raises(PlanError, match="24B_distill on NVIDIA T4 x1: 720x1280 needs"):
    p.require()
  # An explicit size is kept, not lowered: 720x720 on the T4 takes int8 weights instead.
  asked = choose("4.5B_distill", T4, height=720, width=720)
  assert (asked.height, asked.width, asked.size_note, asked.fits, asked.dit_weights) == (
      720, 720, "as asked", True, "int8")


def test_int8_weights_where_bf16_fits_nowhere():
  p = choose("24B_distill", A100)
  # bf16: 44.5 GiB of weights alone; int8 (22.4 GiB) at 480x832 leaves room for the step.
  assert (p.dit_weights, p.height, p.width, p.fits) == ("int8", 480, 832, True)
  assert 0.5 < p.parts.dit_int8 / p.parts.dit_weights < 0.51
  assert "int8 layer weights: bf16 does not fit" in p.describe()
  assert choose("4.5B_distill", A100).dit_weights == "bf16"


def test_apply_sets_the_sampling_fields():
  from experiments.configs import magi
  c = magi.get_config("4.5B_distill")
  choose("4.5B_distill", V5E).apply(c)
  assert (c.height, c.width, c.t5_dtype, c.t5_device, c.text_first, c.dit_weights) == (
      480, 832, "float32", "cpu", True, "bf16")


def test_compiler_check_on_this_cpu():
  from magi_jax.device_plan.compiler import check
  p = check(choose("tiny", detect(), precision="fp32"))
  names = [r.program for r in p.compiler]
  assert {"vae", "t5"} <= set(names) and any(n.startswith("step") for n in names)
  assert p.fits and all(r.peak_gib and r.peak_gib > 0 for r in p.compiler)
  steps = max(r.peak_gib for r in p.compiler if r.program.startswith("step"))
  t5 = next(r for r in p.compiler if r.program == "t5")
  assert not p.text_first                 # the tiny T5 stays loaded: its weights count too
  assert p.sampling_gib == pytest.approx(steps + p.parts.vae_weights / GIB + t5.args_gib)
  assert "peak (the compiler)" in p.describe()


# ------------------------------------------------------------------ the loading order

def _tiny(tmp_path, name, **fields):
  from experiments.configs import tiny
  c = tiny.get_config()
  c.output = os.path.join(tmp_path, f"{name}.mp4")
  c.progress = False
  c.compile_ahead = False
  c.num_frames = 16
  c.num_steps = 2
  for k, v in fields.items():
    setattr(c, k, v)
  return c


def test_text_first_frees_t5_before_the_dit_loads_and_changes_nothing(tmp_path, monkeypatch):
  from magi_jax.generate import build_from_config, from_config, generate
  from magi_jax.media import read_video
  from magi_jax.text.encoder import EncodedPrompts, PromptNotEncodedError

  t5_arrays, order = [], []
  load_text, load_dit = from_config._load_text, from_config.load_dit

  def recording_text(*a, **k):
    enc = load_text(*a, **k)
    order.append("t5")
    t5_arrays.extend(weakref.ref(x) for x in jax.tree.leaves(enc._state))
    return enc

  def recording_dit(*a, **k):
    order.append("dit")
    order.append(sum(r() is not None for r in t5_arrays))     # T5 arrays alive now
    return load_dit(*a, **k)

  monkeypatch.setattr(from_config, "_load_text", recording_text)
  monkeypatch.setattr(from_config, "load_dit", recording_dit)
  frames = {}
  for name, fields in (("plain", {}), ("first", dict(text_first=True)),
                       ("host", dict(text_first=True, t5_device="cpu"))):
    order.clear()
    t5_arrays.clear()
    comp, req, flags, opts = build_from_config(_tiny(tmp_path, name, **fields))
    if name == "plain":
      assert order[0] == "dit"
    else:
      assert isinstance(comp.text, EncodedPrompts)
      assert order == ["t5", "dit", 0] and t5_arrays      # every T5 array freed by then
    generate(comp, req, flags=flags, options=opts, progress=False, log=lambda s: None)
    frames[name] = read_video(req.output, 64, 64, max_frames=None)
  np.testing.assert_array_equal(frames["first"], frames["plain"])
  np.testing.assert_array_equal(frames["host"], frames["plain"])
  with pytest.raises(PromptNotEncodedError, match="was not encoded before the text encoder"):
    comp.text.encode(["another prompt"])


def test_t5_in_bfloat16_and_bad_fields(tmp_path):
  from magi_jax.configs import ConfigError
  from magi_jax.generate import build_from_config
  comp, *_ = build_from_config(_tiny(tmp_path, "bf16", t5_dtype="bfloat16"))
  assert comp.text.t5.dtype == np.dtype("bfloat16")
  assert {x.dtype for x in jax.tree.leaves(comp.text._state)} == {np.dtype("bfloat16")}
  with pytest.raises(ConfigError, match="t5_device='gpu0'"):
    build_from_config(_tiny(tmp_path, "bad", t5_device="gpu0"))
  with pytest.raises(ConfigError, match="t5_dtype='float16'"):
    build_from_config(_tiny(tmp_path, "bad", t5_dtype="float16"))
