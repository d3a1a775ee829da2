"""Configs: presets, JSON round trip, strict loading and validation at construction."""

import dataclasses
import json
import os

import pytest

from magi_jax.configs import (PRESETS, ConfigError, MagiConfig, ModelConfig, get_preset,
                              load_magi_config, magi_config_from_dict, num_parameters,
                              save_magi_config, tiny_config)

FIXTURE_CONFIG = os.path.join(os.path.dirname(__file__), "fixtures", "dit_config.json")


# ---------------------------------------------------------------------------------------------
# (a) presets

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_constructs(name):
  cfg = get_preset(name)
  assert isinstance(cfg, MagiConfig)
  assert isinstance(cfg.model, ModelConfig)
  # Distilled / fp8 presets are one-pass guidance, base presets three-pass (official rule).
  assert cfg.runtime.cfg_number == (1 if (cfg.engine.distill or cfg.engine.fp8_quant) else 3)


def test_4p5b_parameter_count():
  # the official 4.5B checkpoint: 898 tensors, 4,459,898,128 parameters.
  assert num_parameters(get_preset("4.5B_base").model) == 4_459_898_128


def test_24b_parameter_count_is_about_23p9b():
  # the official 24B checkpoint: about 23.90 B parameters.
  n = num_parameters(get_preset("24B_base").model)
  assert abs(n - 23.90e9) < 0.01e9, n


def test_24b_shape():
  m = get_preset("24B_distill").model
  assert (m.half_channel_vae, m.gated_linear_unit, m.x_rescale_factor) == (True, True, 0.1)
  assert m.latent_channels == 16 and m.output_channels == 16


def test_unknown_preset():
  with pytest.raises(ConfigError, match="no_such_model"):
    get_preset("no_such_model")


# ---------------------------------------------------------------------------------------------
# (b) round trip

@pytest.mark.parametrize("name", ["4.5B_base", "24B_distill", "tiny"])
def test_save_load_round_trip(tmp_path, name):
  cfg = get_preset(name)
  path = tmp_path / "cfg.json"
  save_magi_config(cfg, path)
  back = load_magi_config(path)
  assert back == cfg
  # The file has the official three sections and nothing else.
  with open(path) as f:
    assert set(json.load(f)) == {"model_config", "runtime_config", "engine_config"}


# ---------------------------------------------------------------------------------------------
# (c) strict loading

def _write(tmp_path, d):
  path = tmp_path / "c.json"
  path.write_text(json.dumps(d))
  return path


def test_missing_field_is_named(tmp_path):
  d = tiny_config().to_dict()
  del d["model_config"]["kv_channels"]
  with pytest.raises(ConfigError, match="kv_channels"):
    load_magi_config(_write(tmp_path, d))


def test_unknown_field_is_named(tmp_path):
  d = tiny_config().to_dict()
  d["runtime_config"]["bogus_knob"] = 3
  with pytest.raises(ConfigError, match="bogus_knob"):
    load_magi_config(_write(tmp_path, d))


def test_unknown_section_is_named(tmp_path):
  d = tiny_config().to_dict()
  d["harness_metadata"] = {"a": 1}
  path = _write(tmp_path, d)
  with pytest.raises(ConfigError, match="harness_metadata"):
    load_magi_config(path)
  assert load_magi_config(path, allow_extra_sections=True) == tiny_config()
  # Extra sections never excuse unknown fields inside a section.
  d["engine_config"]["also_bogus"] = 1
  with pytest.raises(ConfigError, match="also_bogus"):
    magi_config_from_dict(d, allow_extra_sections=True)


def test_missing_section_is_named():
  d = tiny_config().to_dict()
  del d["engine_config"]
  with pytest.raises(ConfigError, match="engine_config"):
    magi_config_from_dict(d)


def test_missing_file_and_bad_json(tmp_path):
  with pytest.raises(ConfigError, match="not found"):
    load_magi_config(tmp_path / "nope.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ConfigError, match="JSON"):
    load_magi_config(bad)


# ---------------------------------------------------------------------------------------------
# (d) invalid combinations fail at construction

BASE = get_preset("4.5B_base")


@pytest.mark.parametrize("fields,needle", [
    (dict(hidden_size=3000), "hidden_size"),                 # 3000 % 24 != 0
    (dict(num_query_groups=5), "num_query_groups"),          # 24 % 5 != 0
    (dict(num_layers=0), "num_layers"),
    (dict(half_channel_vae=True, in_channels=15), "half_channel_vae"),
])
def test_invalid_model_combinations(fields, needle):
  with pytest.raises(ConfigError, match=needle):
    dataclasses.replace(BASE.model, **fields)


def test_cfg_number_3_with_distill():
  assert BASE.runtime.cfg_number == 3
  with pytest.raises(ConfigError, match="cfg_number"):
    BASE.replace(engine={"distill": True})
  with pytest.raises(ConfigError, match="cfg_number"):
    MagiConfig(model=BASE.model, runtime=BASE.runtime,
               engine=dataclasses.replace(BASE.engine, distill=True))
  # ... and fine once cfg_number is 1.
  ok = BASE.replace(engine={"distill": True}, runtime={"cfg_number": 1})
  assert ok.engine.distill and ok.runtime.cfg_number == 1


def test_num_steps_not_divisible_by_window():
  with pytest.raises(ConfigError, match="window_size"):
    BASE.replace(runtime={"num_steps": 62})
  with pytest.raises(ConfigError, match="window_size"):
    dataclasses.replace(BASE.runtime, num_steps=10, window_size=4)


@pytest.mark.parametrize("field", ["video_size_h", "video_size_w"])
def test_video_size_not_multiple_of_16(field):
  with pytest.raises(ConfigError, match=field):
    BASE.replace(runtime={field: 100})
  assert getattr(BASE.replace(runtime={field: 112}).runtime, field) == 112


def test_invalid_config_from_json_fails_at_load(tmp_path):
  d = tiny_config().to_dict()
  d["model_config"]["num_attention_heads"] = 3            # 128 % 3 != 0
  with pytest.raises(ConfigError, match="num_attention_heads"):
    load_magi_config(_write(tmp_path, d))


# ---------------------------------------------------------------------------------------------
# (e) the parity fixture's config

def test_fixture_config_loads():
  with pytest.raises(ConfigError):
    load_magi_config(FIXTURE_CONFIG)             # it carries harness sections
  cfg = load_magi_config(FIXTURE_CONFIG, allow_extra_sections=True)
  assert cfg.model.num_layers == 2
  assert cfg.model.hidden_size == 128 and cfg.model.num_query_groups == 2
  assert cfg.runtime.noise2clean_kvrange == (3, 2)   # lists are frozen to tuples
