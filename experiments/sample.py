"""Sample a video: `python -m experiments.sample --config=experiments/configs/<preset>.py`.

See experiments/configs/tiny.py (runs anywhere) and the official-model configs. Everything is
validated before any weights are loaded; a bad field fails with a message naming it.
"""

from absl import app, logging
from ml_collections import config_flags

from magi_jax.errors import MagiError
from magi_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py",
                                          "sampling config file")


def build(c):
  """(components, request, flags, options) from a sampling ConfigDict."""
  import os
  from magi_jax.configs import ConfigError, get_preset, load_magi_config
  from magi_jax.generate import Request, load_dit, load_special_tokens, load_text_encoder, load_vae
  from magi_jax.generate.components import Components
  from magi_jax.diffusion import SamplerOptions
  from magi_jax.text import TextFlags

  try:
    cfg = load_magi_config(c.magi_config) if c.magi_config else get_preset(c.preset)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  rt = cfg.runtime
  runtime = {"video_size_h": c.height or rt.video_size_h,
             "video_size_w": c.width or rt.video_size_w,
             "num_frames": c.num_frames or rt.num_frames, "num_steps": c.num_steps or rt.num_steps}
  if c.text_scales:
    runtime["text_scales"] = tuple(c.text_scales)
  if c.prev_chunk_scales:
    runtime["prev_chunk_scales"] = tuple(c.prev_chunk_scales)
  engine = {"shortcut_mode": c.shortcut_mode} if c.shortcut_mode else {}
  try:
    cfg = cfg.replace(runtime=runtime, engine=engine)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  req = Request(mode=c.mode, prompt=c.prompt, prompt_file=c.prompt_file, image=c.image,
                video=c.video, prefix_frames=c.prefix_frames, height=cfg.runtime.video_size_h,
                width=cfg.runtime.video_size_w, num_frames=cfg.runtime.num_frames, seed=c.seed,
                output=c.output)
  req.validate()
  _check_prompts(req, cfg)
  known = {"static", "dynamic", "borderness", "hq", "three_d_model", "two_d_anime", "duration"}
  names = [n.strip() for n in c.special_token_flags.split(",") if n.strip()]
  bad = [n for n in names if n not in known]
  if bad:
    raise app.UsageError(f"--config.special_token_flags: unknown {bad}; known: {sorted(known)}")
  flags = TextFlags(**{k: k in names for k in known}, neg_prompt=bool(c.neg_prompt))
  random_ok = c.preset == "tiny" and not c.magi_config
  for field in ("dit_checkpoint", "vae_checkpoint", "t5_checkpoint", "special_tokens"):
    path = getattr(c, field)
    if path and not os.path.exists(path):
      raise app.UsageError(f"--config.{field}={path!r} does not exist")
  if not random_ok:      # name every missing part at once, before loading anything
    needed = ["dit_checkpoint", "vae_checkpoint", "t5_checkpoint"]
    if flags.positive_keys() or flags.neg_prompt:
      needed.append("special_tokens")
    missing = [f for f in needed if not getattr(c, f)]
    if missing:
      raise app.UsageError(
          "preset " + repr(c.preset) + " needs real weights; set " +
          ", ".join(f"--config.{f}" for f in missing) +
          " (random weights are only for the tiny preset)")
  dit, cfg = load_dit(c.dit_checkpoint, cfg, c.precision, random_ok=random_ok, seed=c.seed)
  comp = Components(
      dit=dit, cfg=cfg, vae=load_vae(c.vae_checkpoint, c.precision, random_ok=random_ok),
      text=load_text_encoder(c.t5_checkpoint, cfg, random_ok=random_ok,
                             cache_dir=c.text_cache_dir or None),
      special=load_special_tokens(c.special_tokens, cfg, flags, random_ok=random_ok))
  opts = SamplerOptions(nearly_clean_weight=c.nearly_clean_weight, backend=c.backend)
  return comp, req, flags, opts


def _check_prompts(req, cfg):
  """Parses a prompt file and checks it covers the generated chunks (before any loading)."""
  from magi_jax.media import plan_frames
  from magi_jax.text.prompts import load_prompt_file, prompts_per_chunk
  if not req.prompt_file:
    return
  schedule = load_prompt_file(req.prompt_file)
  if req.mode == "v2v":       # the prefix length is known only once the video is read
    return
  plan = plan_frames(req.num_frames, 1 if req.mode == "i2v" else 0, cfg.runtime.chunk_width,
                     cfg.runtime.temporal_downsample_factor, req.fps)
  prompts_per_chunk(schedule, plan.infer_chunk_num - plan.clean_chunk_num)


def main(argv):
  del argv
  try:
    distributed.initialize()   # before anything touches JAX devices
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from magi_jax.generate import generate

  c = _CONFIG.value
  try:
    comp, req, flags, opts = build(c)
    logging.info("sampling %s with %s", req.mode, c.preset)
    generate(comp, req, flags=flags, options=opts, progress=c.progress)
  except MagiError as e:          # bad input: a usage error, not a traceback
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
