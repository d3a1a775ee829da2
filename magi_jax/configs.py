"""MAGI-1 configuration: the three sections of the official `*_config.json` files.

`ModelConfig`, `RuntimeConfig` and `EngineConfig` carry every field of the official
`model_config`, `runtime_config` and `engine_config` sections, with the same names, so an
official file loads as it is (`load_magi_config`). All three are frozen dataclasses that
validate themselves at construction: an impossible combination fails with a message that
names the fields involved, never later inside a jitted function.

Presets for the released models and a tiny test model live in `PRESETS`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any
from collections.abc import Mapping

from magi_jax.errors import MagiError
from magi_jax.json_file import read_json

_PARAMS_DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")
_CP_STRATEGIES = ("none", "cp_ulysses", "cp_shuffle_overlap")
_SHORTCUT_MODES = ("8,16,16", "16,16,8")


class ConfigError(MagiError, ValueError):
  """A configuration field is missing, unknown, or inconsistent with another."""


def _require(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def _freeze(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The DiT architecture (official `model_config`)."""

  model_name: str
  num_layers: int
  hidden_size: int
  ffn_hidden_size: int
  num_attention_heads: int
  num_query_groups: int
  kv_channels: int
  layernorm_epsilon: float
  apply_layernorm_1p: bool
  x_rescale_factor: float
  half_channel_vae: bool
  params_dtype: str
  patch_size: int
  t_patch_size: int
  in_channels: int
  out_channels: int
  cond_hidden_ratio: float
  caption_channels: int
  caption_max_length: int
  xattn_cond_hidden_ratio: float
  cond_gating_ratio: float
  gated_linear_unit: bool

  def __post_init__(self):
    positive = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "patch_size", "t_patch_size",
                "in_channels", "out_channels", "caption_channels", "caption_max_length")
    for name in positive:
      v = getattr(self, name)
      _require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
               f"model_config.{name} must be a positive integer, got {v!r}")
    _require(self.model_name == "videodit_ardf",
             f"model_config.model_name must be 'videodit_ardf', got {self.model_name!r}")
    _require(self.params_dtype in _PARAMS_DTYPES,
             f"model_config.params_dtype must be one of {_PARAMS_DTYPES}, "
             f"got {self.params_dtype!r}")
    _require(self.apply_layernorm_1p,
             "model_config.apply_layernorm_1p=false is not a released MAGI-1 model; only the 1p "
             "(1 + w) norms are implemented")
    _require(self.hidden_size % self.num_attention_heads == 0,
             f"model_config.hidden_size ({self.hidden_size}) must be divisible by "
             f"num_attention_heads ({self.num_attention_heads})")
    _require(self.num_attention_heads % self.num_query_groups == 0,
             f"model_config.num_attention_heads ({self.num_attention_heads}) must be divisible by "
             f"num_query_groups ({self.num_query_groups})")
    _require(self.rope_head_dim % 8 == 0,
             f"hidden_size // num_attention_heads = {self.rope_head_dim} must be divisible by 8 "
             "(the learnable 3D RoPE uses (hidden_size // heads) // 8 bands per axis)")
    _require(6 * (self.rope_head_dim // 8) <= self.kv_channels,
             f"RoPE rotates 3/4 of hidden_size // heads = {6 * (self.rope_head_dim // 8)} dims, "
             f"more than kv_channels ({self.kv_channels})")
    _require((self.num_attention_heads * self.kv_channels) % 8 == 0,
             f"num_attention_heads * kv_channels ({self.num_attention_heads * self.kv_channels}) "
             "must be divisible by 8: the official output projection interleaves 8 groups")
    _require(self.cond_hidden_ratio > 0 and self.cond_hidden_dim >= 1,
             f"model_config.cond_hidden_ratio ({self.cond_hidden_ratio}) gives an empty "
             "conditioning vector")
    _require(self.cond_gating_ratio == 1.0,
             f"model_config.cond_gating_ratio must be 1.0 (gate width = hidden_size), "
             f"got {self.cond_gating_ratio}")
    _require(self.xattn_cond_hidden_ratio == 1.0,
             "model_config.xattn_cond_hidden_ratio must be 1.0, "
             f"got {self.xattn_cond_hidden_ratio}")
    _require(self.x_rescale_factor != 0, "model_config.x_rescale_factor must be non-zero")
    if self.half_channel_vae:
      _require(self.in_channels % 2 == 0 and self.out_channels % 2 == 0,
               "model_config.half_channel_vae needs even in_channels and out_channels, got "
               f"{self.in_channels} and {self.out_channels}")

  @property
  def head_dim(self) -> int:
    return self.kv_channels

  @property
  def rope_head_dim(self) -> int:
    """The RoPE width basis: hidden_size // heads (may differ from kv_channels)."""
    return self.hidden_size // self.num_attention_heads

  @property
  def cond_hidden_dim(self) -> int:
    return int(self.hidden_size * self.cond_hidden_ratio)

  @property
  def latent_channels(self) -> int:
    """Channels of the latent the model is called with (the VAE's z channels)."""
    return self.in_channels // 2 if self.half_channel_vae else self.in_channels

  @property
  def output_channels(self) -> int:
    return self.out_channels // 2 if self.half_channel_vae else self.out_channels

  @property
  def patch_dim(self) -> int:
    return self.t_patch_size * self.patch_size * self.patch_size * self.out_channels


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """Sampling settings (official `runtime_config`)."""

  cfg_number: int
  cfg_t_range: tuple
  prev_chunk_scales: tuple
  text_scales: tuple
  noise2clean_kvrange: tuple
  clean_chunk_kvrange: int
  clean_t: float
  seed: int
  num_frames: int
  video_size_h: int
  video_size_w: int
  num_steps: int
  window_size: int
  fps: int
  chunk_width: int
  load: str | None
  t5_pretrained: str | None
  t5_device: str
  vae_pretrained: str | None
  scale_factor: float
  temporal_downsample_factor: int

  def __post_init__(self):
    for name in ("cfg_t_range", "prev_chunk_scales", "text_scales", "noise2clean_kvrange"):
      object.__setattr__(self, name, _freeze(getattr(self, name)))
    _require(self.cfg_number in (1, 3),
             f"runtime_config.cfg_number must be 1 or 3, got {self.cfg_number}")
    n = len(self.cfg_t_range)
    _require(len(self.prev_chunk_scales) == n and len(self.text_scales) == n,
             f"runtime_config.cfg_t_range ({n} entries), prev_chunk_scales "
             f"({len(self.prev_chunk_scales)}) and text_scales ({len(self.text_scales)}) must "
             "have the same length")
    _require(list(self.cfg_t_range) == sorted(self.cfg_t_range),
             f"runtime_config.cfg_t_range must be ascending, got {list(self.cfg_t_range)}")
    for name in ("num_steps", "window_size", "chunk_width", "num_frames", "fps",
                 "temporal_downsample_factor"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v > 0,
               f"runtime_config.{name} must be a positive integer, got {v!r}")
    _require(self.num_steps % self.window_size == 0,
             f"runtime_config.num_steps ({self.num_steps}) must be divisible by window_size "
             f"({self.window_size})")
    if self.noise2clean_kvrange:
      _require(self.num_steps % len(self.noise2clean_kvrange) == 0,
               f"runtime_config.num_steps ({self.num_steps}) must be divisible by "
               f"len(noise2clean_kvrange) ({len(self.noise2clean_kvrange)})")
      _require(all(isinstance(r, int) and r >= 1 for r in self.noise2clean_kvrange),
               f"runtime_config.noise2clean_kvrange entries must be >= 1, got "
               f"{list(self.noise2clean_kvrange)}")
    _require(self.clean_chunk_kvrange == -1 or self.clean_chunk_kvrange >= 1,
             f"runtime_config.clean_chunk_kvrange must be -1 (all earlier chunks) or >= 1, got "
             f"{self.clean_chunk_kvrange}")
    _require(0.0 < self.clean_t <= 1.0,
             f"runtime_config.clean_t must be in (0, 1], got {self.clean_t}")
    for name in ("video_size_h", "video_size_w"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v > 0 and v % 16 == 0,
               f"runtime_config.{name} must be a positive multiple of 16 (VAE 8x, patch 2x), "
               f"got {v!r}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Engine settings (official `engine_config`); most are distribution knobs without numerical
  effect."""

  distributed_backend: str
  distributed_timeout_minutes: int
  pp_size: int
  cp_size: int
  cp_strategy: str
  ulysses_overlap_degree: int
  fp8_quant: bool
  distill_nearly_clean_chunk_threshold: float
  shortcut_mode: str
  distill: bool
  kv_offload: bool
  enable_cuda_graph: bool

  def __post_init__(self):
    _require(self.cp_strategy in _CP_STRATEGIES,
             f"engine_config.cp_strategy must be one of {_CP_STRATEGIES}, got {self.cp_strategy!r}")
    _require(self.shortcut_mode in _SHORTCUT_MODES,
             f"engine_config.shortcut_mode must be one of {_SHORTCUT_MODES}, "
             f"got {self.shortcut_mode!r}")


@dataclasses.dataclass(frozen=True)
class MagiConfig:
  model: ModelConfig
  runtime: RuntimeConfig
  engine: EngineConfig

  def __post_init__(self):
    # The official loader's post-validation: distilled / fp8 models are one-pass guidance.
    if self.engine.distill or self.engine.fp8_quant:
      _require(self.runtime.cfg_number == 1,
               "runtime_config.cfg_number must be 1 for a distill or fp8_quant model "
               f"(engine_config.distill={self.engine.distill}, fp8_quant={self.engine.fp8_quant})")
    else:
      _require(self.runtime.cfg_number == 3,
               "runtime_config.cfg_number must be 3 for a base model (engine_config.distill=false)")

  def to_dict(self) -> dict:
    def plain(d):
      return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return {"model_config": plain(dataclasses.asdict(self.model)),
            "runtime_config": plain(dataclasses.asdict(self.runtime)),
            "engine_config": plain(dataclasses.asdict(self.engine))}

  def replace(self, **sections) -> MagiConfig:
    """`cfg.replace(runtime={"num_steps": 12}, engine={"distill": True})`."""
    kw = {}
    for attr, fields in sections.items():
      _require(attr in ("model", "runtime", "engine"), f"unknown config section {attr!r}")
      kw[attr] = dataclasses.replace(getattr(self, attr), **fields)
    return dataclasses.replace(self, **kw)


_SECTIONS = {"model_config": ("model", ModelConfig),
             "runtime_config": ("runtime", RuntimeConfig),
             "engine_config": ("engine", EngineConfig)}


def _section(cls, values: Mapping[str, Any], where: str):
  if not isinstance(values, Mapping):
    raise ConfigError(f"{where}: must be a JSON object, got {type(values).__name__}")
  names = [f.name for f in dataclasses.fields(cls)]
  missing = [n for n in names if n not in values]
  unknown = [k for k in values if k not in names]
  if missing:
    raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
  if unknown:
    raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
  return cls(**dict(values))


def magi_config_from_dict(d: Mapping[str, Any], *, where: str = "config",
                          allow_extra_sections: bool = False) -> MagiConfig:
  """Builds a MagiConfig from the official three-section dict. Strict on every field."""
  if not isinstance(d, Mapping):
    raise ConfigError(f"{where}: the top level must be a JSON object")
  missing = [s for s in _SECTIONS if s not in d]
  if missing:
    raise ConfigError(f"{where}: missing section(s) {', '.join(missing)}")
  extra = [k for k in d if k not in _SECTIONS]
  if extra and not allow_extra_sections:
    raise ConfigError(f"{where}: unknown top-level section(s) {', '.join(extra)}")
  kw = {attr: _section(cls, d[name], f"{where}: {name}") for name, (attr, cls) in _SECTIONS.items()}
  return MagiConfig(**kw)


def load_magi_config(path: str | os.PathLike, *, allow_extra_sections: bool = False) -> MagiConfig:
  """Loads an official `example/*/..._config.json` file as it is.

  `allow_extra_sections` tolerates top-level keys besides the three sections (the parity
  fixtures carry harness metadata there); the sections themselves are always strict.
  """
  path = os.fspath(path)
  d = read_json(path, ConfigError, "config file")
  return magi_config_from_dict(d, where=path, allow_extra_sections=allow_extra_sections)


def save_magi_config(cfg: MagiConfig, path: str | os.PathLike) -> None:
  with open(path, "w") as f:
    json.dump(cfg.to_dict(), f, indent=4)


# ---------------------------------------------------------------------------------------------
# Presets.

def _model(**kw) -> ModelConfig:
  base = dict(model_name="videodit_ardf", num_layers=34, hidden_size=3072, ffn_hidden_size=12288,
              num_attention_heads=24, num_query_groups=8, kv_channels=128, layernorm_epsilon=1e-6,
              apply_layernorm_1p=True, x_rescale_factor=1.0, half_channel_vae=False,
              params_dtype="torch.bfloat16", patch_size=2, t_patch_size=1, in_channels=16,
              out_channels=16, cond_hidden_ratio=0.25, caption_channels=4096,
              caption_max_length=800, xattn_cond_hidden_ratio=1.0, cond_gating_ratio=1.0,
              gated_linear_unit=False)
  base.update(kw)
  return ModelConfig(**base)


def _runtime(**kw) -> RuntimeConfig:
  base = dict(cfg_number=3, cfg_t_range=(0.0, 0.0217, 0.1, 0.3, 0.999),
              prev_chunk_scales=(1.5, 1.5, 1.5, 1.0, 1.0), text_scales=(7.5, 7.5, 7.5, 0.0, 0.0),
              noise2clean_kvrange=(5, 4, 3, 2), clean_chunk_kvrange=1, clean_t=0.9999, seed=1234,
              num_frames=96, video_size_h=720, video_size_w=720, num_steps=64, window_size=4,
              fps=24, chunk_width=6, load=None, t5_pretrained=None, t5_device="cpu",
              vae_pretrained=None, scale_factor=0.18215, temporal_downsample_factor=4)
  base.update(kw)
  return RuntimeConfig(**base)


def _engine(**kw) -> EngineConfig:
  base = dict(distributed_backend="nccl", distributed_timeout_minutes=15, pp_size=1, cp_size=1,
              cp_strategy="cp_ulysses", ulysses_overlap_degree=1, fp8_quant=False,
              distill_nearly_clean_chunk_threshold=0.3, shortcut_mode="8,16,16", distill=False,
              kv_offload=True, enable_cuda_graph=False)
  base.update(kw)
  return EngineConfig(**base)


_M_4P5B = dict()
_M_24B = dict(num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48,
              x_rescale_factor=0.1, half_channel_vae=True, in_channels=32, out_channels=32,
              gated_linear_unit=True)


def _preset(model_kw, *, distill=False, fp8=False, **runtime_kw) -> MagiConfig:
  return MagiConfig(model=_model(**model_kw),
                    runtime=_runtime(cfg_number=1 if (distill or fp8) else 3, **runtime_kw),
                    engine=_engine(distill=distill, fp8_quant=fp8))


def tiny_config(**model_kw) -> MagiConfig:
  """A 2-layer model that runs in milliseconds on a CPU (random weights, tests and demos)."""
  m = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
           num_query_groups=2, kv_channels=32, params_dtype="torch.float32", caption_channels=32,
           caption_max_length=64)
  m.update(model_kw)
  return MagiConfig(model=_model(**m),
                    runtime=_runtime(noise2clean_kvrange=(3, 2), num_steps=6, window_size=2,
                                     chunk_width=2, num_frames=24, video_size_h=64,
                                     video_size_w=64),
                    engine=_engine(distributed_backend="gloo"))


PRESETS = {
    "4.5B_base": lambda: _preset(_M_4P5B),
    "4.5B_distill": lambda: _preset(_M_4P5B, distill=True),
    "4.5B_distill_quant": lambda: _preset(_M_4P5B, distill=True, fp8=True),
    "24B_base": lambda: _preset(_M_24B, num_steps=32, video_size_w=1280),
    "24B_distill": lambda: _preset(_M_24B, distill=True, num_steps=16, video_size_w=1280),
    "24B_distill_quant": lambda: _preset(_M_24B, distill=True, fp8=True, num_steps=16,
                                         video_size_w=1280),
    "tiny": tiny_config,
}


def get_preset(name: str) -> MagiConfig:
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]()


def num_parameters(m: ModelConfig) -> int:
  """Parameter count of the official state dict for this architecture (fp8 scales excluded)."""
  D, Dc, F = m.hidden_size, m.cond_hidden_dim, m.ffn_hidden_size
  P = m.num_attention_heads * m.kv_channels
  G = m.num_query_groups * m.kv_channels
  C = m.caption_channels
  per_layer = (2 * D * Dc + 2 * D               # ada_modulate_layer
               + 2 * D                           # linear_qkv.layer_norm
               + 2 * P * D + 2 * G * D           # q, qx, k, v
               + 2 * G * D                       # linear_kv_xattn
               + D * 2 * P                       # linear_proj
               + 8 * m.kv_channels               # four head norms
               + 2 * D + 2 * D + 2 * D           # post norms + mlp pre-norm
               + D * F * (2 if m.gated_linear_unit else 1) + F * D)
  emb = (D * m.in_channels * m.t_patch_size * m.patch_size ** 2
         + 256 * Dc + Dc + Dc * Dc + Dc
         + C * D + D + C * Dc + Dc + m.caption_max_length * C
         + m.rope_head_dim // 8
         + 2 * D + m.patch_dim * D)
  return emb + m.num_layers * per_layer

