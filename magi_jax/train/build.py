"""From a training config to the objects of a run: model, text path, objective, settings.

Kept apart from the loop (trainer.py) so evaluation rebuilds exactly the model a run trained
from the run description saved beside its checkpoints.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from magi_jax.configs import ConfigError, ModelConfig, get_preset
from magi_jax.convert.load import random_module
from magi_jax.models import Precision, VideoDiT
from magi_jax.models.stack import DEFAULT_REMAT_POLICY, RematPolicyError, remat_policy
from magi_jax.train import optim
from magi_jax.train.project import text_kind
from magi_jax.diffusion.conditioning import ConditioningConfig
from magi_jax.train.distill import DistillObjective, Guidance
from magi_jax.train.objective import Objective, TrainModel
from magi_jax.train.own_context import OwnContext
from magi_jax.train.samples import SampleSettings


def _plain(c):
  return c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)


def model_config(c) -> ModelConfig:
  base = get_preset(c.model.preset).model
  over = _plain(c.model.overrides)
  unknown = [k for k in over if k not in {f.name for f in dataclasses.fields(ModelConfig)}]
  if unknown:
    raise ConfigError(f"config.model.overrides: unknown ModelConfig field(s) {unknown}")
  if c.text.kind != "precomputed":     # a text encoder trained with the DiT sets the rows
    over.setdefault("caption_channels", c.text.width)
    over.setdefault("caption_max_length", c.text.max_length)
  mcfg = dataclasses.replace(base, **over)
  if c.text.kind == "precomputed" and mcfg.caption_max_length != c.text.max_length:
    raise ConfigError(f"text.max_length is {c.text.max_length} but the DiT takes caption rows of "
                      f"{mcfg.caption_max_length} tokens (model.preset {c.model.preset!r}); T5 "
                      "rows are made text.max_length long, so set the two equal")
  return mcfg


def tokenizer_for(c):
  """The tokenizer of the config's trained text encoder (config.project), or None for
  precomputed T5 rows."""
  if c.text.kind == "precomputed":
    return None
  return text_kind(c).tokenizer(c)


def distilling(c) -> bool:
  """The run distils a teacher (`config.distill.teacher`) into a shortcut student."""
  return bool(c.get("distill", {}).get("teacher", ""))


def token_head(c):
  """The special tokens sampling puts before a caption (`text.special_tokens`, the official
  special_tokens.npz, with `text.special_token_flags`), for precomputed T5 rows; None without."""
  path = c.text.get("special_tokens", "")
  if not path:
    return None
  from magi_jax.text.rows import TokenHead
  from magi_jax.text.special_tokens import SpecialTokens, TextFlags
  if c.text.kind != "precomputed":
    raise ConfigError(f"text.special_tokens is set but text.kind is {c.text.kind!r}: special "
                      "tokens go before precomputed T5 rows (text.kind='precomputed')")
  try:
    flags = TextFlags.parse(c.text.get("special_token_flags", "hq,duration"),
                            field="config.text.special_token_flags")
    special = SpecialTokens.load(path)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  width = model_config(c).caption_channels
  if special.dim != width:
    raise ConfigError(f"text.special_tokens {path}: tokens of width {special.dim}, the DiT's "
                      f"caption rows are {width} wide")
  return TokenHead.build(special, flags)


def objective(c) -> Objective | DistillObjective:
  o = c.objective
  cond = ConditioningConfig(p_v2v=o.p_v2v, p_i2v=o.p_i2v, clean_t_min=o.clean_t_min,
                            text_dropout=o.text_dropout, t_mean=o.t_mean, t_std=o.t_std,
                            t_shift=o.t_shift, levels=o.levels, stagger=o.stagger)
  try:
    off = OwnContext()      # runs saved before the fields: off
    t_min, t_max = (float(v) for v in o.get("own_context_t", (off.t_min, off.t_max)))
    own = OwnContext(p=float(o.get("own_context", off.p)), t_min=t_min, t_max=t_max,
                     from_step=int(o.get("own_context_from", off.from_step)))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.objective.own_context / own_context_t / own_context_from: {e}"
                      ) from None
  base = Objective(chunk_width=o.chunk_width, conditioning=cond, prediction=c.model.prediction,
                   backend=c.model.backend, special=token_head(c), own_context=own)
  if not distilling(c):
    return base
  if own.on:
    raise ConfigError("config.objective.own_context is a base-training option; distillation "
                      "trains on the teacher's targets and does not use it (set it to 0)")
  d = c.distill
  try:
    v2v = tuple(d.v2v_text_scales) or None
    guidance = Guidance(cfg_t_range=tuple(d.cfg_t_range),
                        prev_chunk_scales=tuple(d.prev_chunk_scales),
                        text_scales=tuple(d.text_scales), v2v_text_scales=v2v)
    return DistillObjective(base=base, cycle=tuple(d.cycle), guidance=guidance)
  except ValueError as e:
    raise ConfigError(f"config.distill: {e}") from None


def optimizer(c):
  """(learning-rate schedule, optax transformation) of config `c`."""
  o = c.optim
  schedule = optim.learning_rate(o.lr, o.warmup_steps, c.total_steps, o.schedule, o.end_lr)
  tx = optim.make_optimizer(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                            grad_clip=o.grad_clip)
  return schedule, tx


def mesh(c, devices=None):
  """The run's device mesh from `config.mesh` (all devices of all processes by default)."""
  from magi_jax.parallel.mesh import MeshConfig, make_mesh
  return make_mesh(MeshConfig.from_config(c.get("mesh")), devices)


def sharding_rules(c):
  from magi_jax.parallel.rules import ShardingRules
  return ShardingRules.from_config(c.get("sharding"))


def sample_settings(c) -> SampleSettings:
  s = c.sample
  return SampleSettings(num_steps=s.num_steps, window_size=s.window_size,
                        text_scale=s.text_scale, prev_scale=s.prev_scale,
                        kv_chunks=s.get("kv_chunks", 0))      # runs saved before the field: 0


def build_model(c, tokenizer, *, with_teacher: bool = True, echo=None) -> TrainModel:
  """A TrainModel with the config's init weights (the trainer loads checkpoints over it).

  A distillation run (`distilling(c)`) gets a distilled student DiT and, with `with_teacher`,
  a `teacher` TrainModel of the same architecture (base DiT and text encoder) whose weights
  the trainer loads (`trainer.load_teacher`); evaluation builds the student alone.
  init.kind='run' (magi_jax/train/stages.py): random weights, which a new run's trainer
  replaces by the previous run's (a resume or evaluation restores its own over them); a LoRA
  run's frozen base is the previous run's at every build (its checkpoints hold the adapters
  only). echo: where that load reports (None: silent)."""
  mcfg = model_config(c)
  precision = Precision.named(c.model.precision)
  policy_name = c.model.get("remat_policy", DEFAULT_REMAT_POLICY)   # older run configs lack it
  try:
    remat_policy(policy_name)
  except RematPolicyError as e:
    raise ConfigError(f"config.model.remat_policy: {e}") from None
  distill = distilling(c)
  from_run = c.init.kind == "run"
  if from_run:
    from magi_jax.train.stages import check_not_distilling
    check_not_distilling(c)             # refused: a run is distilled through distill.teacher
  if distill and c.init.kind != "random" and c.distill.teacher != "init":
    raise ConfigError(f"config.init.kind={c.init.kind!r} with config.distill.teacher="
                      f"{c.distill.teacher!r}: a student starts from its teacher; set "
                      "distill.teacher='init' to distil the init weights")
  if c.init.kind in ("random", "run"):
    dit = random_module(lambda: VideoDiT(mcfg, precision=precision, rngs=nnx.Rngs(c.seed)),
                        c.seed)
  elif c.init.kind == "official":
    from magi_jax.official.dit import load_official_dit
    dit = load_official_dit(c.init.path, mcfg, precision=precision)
  elif c.init.kind == "converted":
    from magi_jax.convert.orbax_io import load_converted
    dit, _ = load_converted(c.init.path, precision=c.model.precision)
  else:
    raise ConfigError(f"config.init.kind must be random | official | converted | run, got "
                      f"{c.init.kind!r}")
  base = None
  if from_run and c.lora.rank:          # the frozen base: not in this run's checkpoints
    from magi_jax.train import stages
    base = stages.previous_weights(c, echo or (lambda s: None))
    stages.assign(dit, base[0], cast=True)
  teacher = None
  if distill:
    # The init weights (random when the teacher is a run: the trainer loads it over both) are
    # the teacher; the student is a distilled copy of them.
    if dit.distill:
      raise ConfigError("config.distill: the init weights are already a distilled model")
    if with_teacher:
      teacher = dit
    dit = distilled_copy(dit, c.seed)
  dit.remat = bool(c.model.remat)
  dit.remat_policy = policy_name
  dit.scan_layers = bool(c.model.get("scan_layers", True))
  if c.lora.rank:
    from magi_jax.train.lora import apply_lora
    apply_lora(dit, rank=c.lora.rank, alpha=c.lora.alpha, targets=tuple(c.lora.targets),
               rngs=nnx.Rngs(c.seed + 1))
  text = None
  if tokenizer is not None:
    text = text_kind(c).encoder(c, tokenizer, mcfg.caption_channels, nnx.Rngs(c.seed + 2))
    if base is not None and base[1] is not None:     # frozen too in a LoRA run
      stages.assign(text, base[1], cast=True)
  if teacher is not None:
    teacher.scan_layers = dit.scan_layers
    teacher = TrainModel(teacher, None if text is None else _copy(text))
  return TrainModel(dit, text, teacher)


def _copy(module):
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def distilled_copy(dit: VideoDiT, seed: int) -> VideoDiT:
  """A distilled DiT (`distill=True`: the timestep embedder also embeds the step size) with
  `dit`'s weights: the official distilled architecture adds no parameters."""
  student = VideoDiT(dit.cfg, precision=dit.precision, distill=True, rngs=nnx.Rngs(seed))
  nnx.update(student, jax.tree.map(jnp.copy, nnx.state(dit)))
  return student


def frozen_vae(c, path: str = ""):
  """The frozen VAE of a latent-space config, or None (pixel space): `config.vae`'s, from
  `path` instead of `vae.path` when given (random weights only for `random_tiny` without one)."""
  if c.vae.kind == "none":
    return None
  from magi_jax.convert.load import load_vae
  if c.vae.kind not in ("official", "converted", "random_tiny"):
    raise ConfigError(f"config.vae.kind must be none | official | converted | random_tiny, got "
                      f"{c.vae.kind!r}")
  random = c.vae.kind == "random_tiny"
  path = path or ("" if random else c.vae.path)
  return load_vae(path, c.vae.precision, random_ok=random and not path, seed=c.seed)


def frame_encoder(c):
  """The frozen VAE's per-chunk encoder for latent-space training, or None (pixel space, or
  data prepared offline: its batches carry the latents)."""
  if c.data.kind == "prepared":
    return None
  vae = frozen_vae(c)
  if vae is None:
    return None
  from magi_jax.train.step import vae_chunk_encoder
  F = c.data.frames_per_chunk
  if F % 4 or F // 4 != c.objective.chunk_width:
    raise ConfigError(f"latent training: data.frames_per_chunk ({F}) must be 4 x "
                      f"objective.chunk_width ({c.objective.chunk_width}) (the VAE compresses "
                      "time 4x)")
  return vae_chunk_encoder(vae, scale_factor=c.vae.scale_factor, frames_per_chunk=F)
