"""A sampling config -> what `generate` takes: (Components, Request, TextFlags, SamplerOptions).

The config is the ConfigDict of experiments/configs/sample_common.py (any object with those
attributes will do); `python -m experiments.sample` and launch/colab/sample.ipynb both call
`build_from_config`. Everything is checked before any weights load, and a bad value raises a
typed error (a `MagiError`) whose message names the `--config.<field>` to change:
`ConfigError` for the preset, the config file, the sizes and steps, the checkpoint paths and
the special-token flags; `HubError` for weights named by repository (`--config.checkpoint`);
`RequestError` / `PromptScheduleError` for what to generate.
"""

from __future__ import annotations

import os

from magi_jax.configs import ConfigError, MagiConfig, get_preset, load_magi_config
from magi_jax.convert.load import load_dit, load_text_encoder, load_vae
from magi_jax.diffusion import Sampler, SamplerOptions
from magi_jax.diffusion.ahead import compile_ahead
from magi_jax.generate.components import Components, load_special_tokens
from magi_jax.generate.request import Request
from magi_jax.media import plan_frames
from magi_jax.text import TextFlags
from magi_jax.text.prompts import load_prompt_file, prompts_per_chunk

_CHECKPOINTS = ("dit_checkpoint", "vae_checkpoint", "t5_checkpoint")


def build_from_config(c) -> tuple[Components, Request, TextFlags, SamplerOptions]:
  """(components, request, flags, options) from a sampling ConfigDict.

  Random weights are used for the parts without a checkpoint, for the `tiny` preset only.
  """
  cfg = _magi_config(c)
  req = Request(mode=c.mode, prompt=c.prompt, prompt_file=c.prompt_file, image=c.image,
                video=c.video, prefix_frames=c.prefix_frames, height=cfg.runtime.video_size_h,
                width=cfg.runtime.video_size_w, num_frames=cfg.runtime.num_frames, seed=c.seed,
                output=c.output)
  req.validate()
  _check_prompts(req, cfg)
  flags = _text_flags(c)
  _t5_placement(c)                        # bad t5_device / t5_dtype: before anything loads
  if getattr(c, "t5_dtype", "float32") not in ("float32", "bfloat16"):
    raise ConfigError(f"--config.t5_dtype={c.t5_dtype!r}: use float32 or bfloat16")
  weights = getattr(c, "dit_weights", "bf16")
  if weights not in ("bf16", "int8"):
    raise ConfigError(f"--config.dit_weights={weights!r}: use bf16 (the precision's weights) "
                      "or int8")
  int8 = weights == "int8"
  hub = getattr(c, "checkpoint", "")
  random_ok = c.preset == "tiny" and not c.magi_config and not hub
  paths = _weight_paths(c, cfg)
  _check_checkpoints(c, paths, flags, random_ok)
  text = None
  if getattr(c, "text_first", False):     # encode the prompts, free T5, then load the DiT
    text = _encode_first(c, paths, cfg, req, random_ok)
  with _host_if(int8):          # int8: quantized on the host, then placed (never bf16 there)
    dit, cfg = load_dit(paths["dit_checkpoint"], cfg, c.precision, random_ok=random_ok,
                        seed=c.seed)
    if getattr(c, "lora", ""):
      from magi_jax.generate.trained import apply_lora
      dit = apply_lora(dit, c.lora, c.lora_scale)
    if int8:
      from magi_jax.models.quant import quantize_int8
      dit = quantize_int8(dit)
  if int8:
    _to_default_device(dit)
  opts = SamplerOptions(nearly_clean_weight=c.nearly_clean_weight, backend=c.backend)
  sampler = Sampler(dit, cfg, options=opts)
  ahead = _compile_ahead(sampler, req, cfg) if getattr(c, "compile_ahead", True) else None
  if text is None:
    with _t5_placement(c):
      text = _load_text(c, paths, cfg, random_ok)
  comp = Components(      # the VAE and the text encoder load while the steps compile
      dit=dit, cfg=cfg, vae=load_vae(paths["vae_checkpoint"], c.precision, random_ok=random_ok),
      text=text, special=load_special_tokens(c.special_tokens, cfg, flags, random_ok=random_ok),
      samplers={opts: sampler}, ahead=ahead)
  return comp, req, flags, opts


def _load_text(c, paths, cfg: MagiConfig, random_ok: bool):
  return load_text_encoder(paths["t5_checkpoint"], cfg, random_ok=random_ok,
                           cache_dir=c.text_cache_dir or None,
                           dtype=getattr(c, "t5_dtype", "float32"))


def _host_if(on: bool):
  """New arrays on the host CPU inside the block when `on`, else where JAX puts them."""
  import contextlib

  import jax
  return jax.default_device(jax.devices("cpu")[0]) if on else contextlib.nullcontext()


def _to_default_device(model) -> None:
  import jax
  from flax import nnx
  device = jax.devices()[0]
  if device.platform != "cpu":
    nnx.update(model, jax.device_put(nnx.state(model), device))


def _t5_placement(c):
  """Where T5's weights live: the default device, or the host CPU (`--config.t5_device=cpu`,
  the official runtime_config.t5_device)."""
  device = getattr(c, "t5_device", "")
  if device not in ("", "cpu"):
    raise ConfigError(f"--config.t5_device={device!r}: use '' (the accelerator) or 'cpu'")
  return _host_if(device == "cpu")


def _encode_first(c, paths, cfg: MagiConfig, req: Request, random_ok: bool):
  """The request's prompts encoded by a T5 that is freed before returning (EncodedPrompts)."""
  import gc

  from magi_jax.text.encoder import EncodedPrompts
  prompts = ([p.prompt for p in load_prompt_file(req.prompt_file)] if req.prompt_file
             else [req.prompt])
  with _t5_placement(c):
    encoder = _load_text(c, paths, cfg, random_ok)
    encoded = EncodedPrompts(encoder, prompts)
  del encoder
  gc.collect()                  # the T5 weights' device buffers go with their last reference
  return encoded


def _compile_ahead(sampler: Sampler, req: Request, cfg: MagiConfig):
  """The request's sampler steps compiling in the background (diffusion/ahead.py); None for
  V2V, whose prefix length is known only once the video is read (compiled on first use)."""
  if req.mode == "v2v":
    return None
  rt = cfg.runtime
  P = 1 if req.mode == "i2v" else 0
  plan = plan_frames(req.num_frames, P, rt.chunk_width, rt.temporal_downsample_factor, req.fps)
  return compile_ahead(sampler, latent_hw=(req.height // 8, req.width // 8),
                       num_chunks=plan.infer_chunk_num, prefix_latent_frames=P)


def _magi_config(c) -> MagiConfig:
  """The preset (or official config file) with the config's size / step / guidance overrides."""
  cfg = load_magi_config(c.magi_config) if c.magi_config else get_preset(c.preset)
  rt = cfg.runtime
  runtime = {"video_size_h": c.height or rt.video_size_h,
             "video_size_w": c.width or rt.video_size_w,
             "num_frames": c.num_frames or rt.num_frames, "num_steps": c.num_steps or rt.num_steps}
  if c.text_scales:
    runtime["text_scales"] = tuple(c.text_scales)
  if c.prev_chunk_scales:
    runtime["prev_chunk_scales"] = tuple(c.prev_chunk_scales)
  engine = {"shortcut_mode": c.shortcut_mode} if c.shortcut_mode else {}
  return cfg.replace(runtime=runtime, engine=engine)


def _check_prompts(req: Request, cfg: MagiConfig) -> None:
  """Parses a prompt file and checks it covers the generated chunks (before any loading)."""
  if not req.prompt_file:
    return
  schedule = load_prompt_file(req.prompt_file)
  if req.mode == "v2v":       # the prefix length is known only once the video is read
    return
  plan = plan_frames(req.num_frames, 1 if req.mode == "i2v" else 0, cfg.runtime.chunk_width,
                     cfg.runtime.temporal_downsample_factor, req.fps)
  prompts_per_chunk(schedule, plan.infer_chunk_num - plan.clean_chunk_num)


def _text_flags(c) -> TextFlags:
  """`special_token_flags` ("hq,duration") and `neg_prompt` as TextFlags."""
  try:
    return TextFlags.parse(c.special_token_flags, c.neg_prompt)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _weight_paths(c, cfg: MagiConfig) -> dict[str, str]:
  """{checkpoint field: local path}: the fields as given, the parts left empty from the
  repository `--config.checkpoint` names (magi_jax/convert/hub.py)."""
  from magi_jax.convert.hub import parse_hub_id, resolve
  paths = {f: getattr(c, f) for f in _CHECKPOINTS}
  spec = getattr(c, "checkpoint", "")
  if not spec:
    return paths
  hub = parse_hub_id(spec)
  if hub is None:
    raise ConfigError(f"--config.checkpoint={spec!r} is neither a training run directory (no "
                      "checkpoints/run.json in it) nor a Hugging Face repository id "
                      "(owner/name[@revision])")
  if c.magi_config:
    raise ConfigError("--config.checkpoint (a repository) finds the weights by preset name: "
                      "use --config.preset, not --config.magi_config")
  parts = {"dit_checkpoint": "dit", "vae_checkpoint": "vae", "t5_checkpoint": "t5"}
  need = [part for field, part in parts.items() if not paths[field]]
  if need:
    found = resolve(*hub, c.preset, cfg, need)
    paths.update({field: found[part] for field, part in parts.items() if part in found})
  return paths


def _check_checkpoints(c, paths: dict[str, str], flags: TextFlags, random_ok: bool) -> None:
  """Every given path exists; without random weights, every needed one is given."""
  given = dict(paths, special_tokens=c.special_tokens)
  for field, path in given.items():
    if path and not os.path.exists(path):
      raise ConfigError(f"--config.{field}={path!r} does not exist")
  if random_ok:
    return
  needed = list(_CHECKPOINTS)       # name every missing part at once, before loading anything
  if flags.positive_keys() or flags.neg_prompt:
    needed.append("special_tokens")
  missing = [f for f in needed if not given[f]]
  if missing:
    raise ConfigError(
        "preset " + repr(c.preset) + " needs real weights; set " +
        ", ".join(f"--config.{f}" for f in missing) +
        " (random weights are only for the tiny preset)")
