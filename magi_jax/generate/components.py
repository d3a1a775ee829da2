"""The four parts of a sampling run: DiT, VAE, text encoder (magi_jax/convert/load.py loads
them) and special tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from magi_jax.configs import MagiConfig
from magi_jax.convert.load import ComponentError
from magi_jax.models import VideoDiT
from magi_jax.models.vae import ViTVAE
from magi_jax.text import SpecialTokens, TextEncoder, TextFlags


@dataclasses.dataclass
class Components:
  dit: VideoDiT
  cfg: MagiConfig
  vae: ViTVAE
  text: TextEncoder
  special: SpecialTokens | None
  samplers: dict = dataclasses.field(default_factory=dict)   # compiled samplers, reused
  ahead: object = None            # the steps compiling in the background (diffusion/ahead.py)

  def sampler(self, options):
    """One Sampler (and its compiled steps) per options, reused by every generate() call;
    under other runtime settings (`with_runtime`) the same compiled steps with that runtime."""
    from magi_jax.diffusion import Sampler
    if options not in self.samplers:
      self.samplers[options] = Sampler(self.dit, self.cfg, options=options)
    base = self.samplers[options]
    if base.cfg.runtime == self.cfg.runtime:
      return base
    changed = {f.name: getattr(self.cfg.runtime, f.name)
               for f in dataclasses.fields(self.cfg.runtime)
               if getattr(self.cfg.runtime, f.name) != getattr(base.cfg.runtime, f.name)}
    return base.with_runtime(**changed)

  def with_runtime(self, **fields) -> Components:
    """The same loaded parts and compiled samplers under other runtime settings (video size,
    frames, steps, guidance scales): what a server changes per request."""
    return dataclasses.replace(self, cfg=self.cfg.replace(runtime=fields))


def load_special_tokens(path: str, cfg: MagiConfig, flags: TextFlags, *, random_ok: bool,
                        seed: int = 0) -> SpecialTokens | None:
  if path:
    special_tokens = SpecialTokens.load(path)
    if special_tokens.dim != cfg.model.caption_channels:
      raise ComponentError(f"{path}: special tokens of dim {special_tokens.dim}, the DiT takes "
                           f"{cfg.model.caption_channels}")
    return special_tokens
  if not (flags.positive_keys() or flags.neg_prompt):
    return None
  if not random_ok:
    raise ComponentError("special-token flags are set but no special_tokens.npz was given "
                         "(--config.special_tokens, or --config.special_token_flags='')")
  rng = np.random.default_rng(seed + 3)
  d = cfg.model.caption_channels
  return SpecialTokens.from_arrays(rng.normal(0, 0.125, (1, d)), rng.normal(0, 0.125, (1, d)),
                                   rng.normal(0, 0.125, (100, d)))
