"""MAGI-1's special tokens: learned vectors in T5 output space prepended to the caption.

`special_tokens.npz` (official `example/assets/`) holds `caption_token` [1, D], `logo_token`
[1, D] and `other_tokens` [100, D] in float64; the official loader rounds them through float16,
so a token is `float32(float16(value))` (official prompt_process.py,
example/assets/special_tokens.npz). Which tokens are used is decided by flags (the official code
reads them from environment variables `PAD_HQ`, `PAD_DURATION`, ...; `TextFlags.from_env` does the
same, and the sample configs carry them as fields).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np

from magi_jax.errors import MagiError

NPZ_KEYS = ("caption_token", "logo_token", "other_tokens")
NUM_OTHER = 100
# Rows of `other_tokens` (the rest are unused by the official pipeline).
OTHER_ROWS = {"TRANS": 0, "HQ": 1, "STATIC_FIRST_FRAMES": 2, "DYNAMIC_FIRST_FRAMES": 3,
              "BORDERNESS": 4, "THREE_D_MODEL": 15, "TWO_D_ANIME": 16}
DURATION_FIRST_ROW = 7          # DURATION_k is row 7 + (k - 1), k = 1..8
DURATION_MAX = 8
# (flag, token) in the order the official code collects the positive keys; DURATION is last.
POSITIVE_FLAGS = (("static", "STATIC_FIRST_FRAMES"), ("dynamic", "DYNAMIC_FIRST_FRAMES"),
                  ("borderness", "BORDERNESS"), ("hq", "HQ"), ("three_d_model", "THREE_D_MODEL"),
                  ("two_d_anime", "TWO_D_ANIME"), ("duration", "DURATION"))
NEGATIVE_KEYS = ("CAPTION", "LOGO", "TRANS", "BORDERNESS")
_TRUE = {"1", "true", "yes", "y", "on", "enabled"}


class SpecialTokenError(MagiError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class TextFlags:
  """Which special tokens pad the prompt. Defaults = the official run.sh (PAD_HQ, PAD_DURATION)."""
  static: bool = False
  dynamic: bool = False
  borderness: bool = False
  hq: bool = True
  three_d_model: bool = False
  two_d_anime: bool = False
  duration: bool = True
  neg_prompt: bool = False     # pad the null (negative) rows with CAPTION/LOGO/TRANS/BORDERNESS

  @classmethod
  def none(cls) -> TextFlags:
    return cls(hq=False, duration=False)

  @classmethod
  def from_env(cls, env=None) -> TextFlags:
    """The official environment variables: PAD_STATIC, ..., PAD_DURATION, NEG_PROMPT."""
    env = os.environ if env is None else env
    on = lambda name: str(env.get(name, "")).strip().lower() in _TRUE
    return cls(**{f.name: on("NEG_PROMPT" if f.name == "neg_prompt" else f"PAD_{f.name.upper()}")
                  for f in dataclasses.fields(cls)})

  @classmethod
  def parse(cls, names: str, neg_prompt: bool = False,
            field: str = "--config.special_token_flags") -> TextFlags:
    """"hq,duration" (names of POSITIVE_FLAGS, comma separated) as TextFlags."""
    known = {flag for flag, _ in POSITIVE_FLAGS}
    given = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in given if n not in known]
    if bad:
      raise SpecialTokenError(f"{field}: unknown {bad}; known: {sorted(known)}")
    return cls(**{k: k in given for k in known}, neg_prompt=bool(neg_prompt))

  def positive_keys(self) -> tuple[str, ...]:
    return tuple(token for flag, token in POSITIVE_FLAGS if getattr(self, flag))


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  caption: np.ndarray     # (D,) float32, fp16-rounded
  logo: np.ndarray        # (D,)
  other: np.ndarray       # (100, D)

  @classmethod
  def from_arrays(cls, caption_token, logo_token, other_tokens, source: str = "special tokens"):
    arrays = {"caption_token": np.asarray(caption_token), "logo_token": np.asarray(logo_token),
              "other_tokens": np.asarray(other_tokens)}
    dim = arrays["other_tokens"].shape[-1] if arrays["other_tokens"].ndim == 2 else None
    want = {"caption_token": (1, dim), "logo_token": (1, dim), "other_tokens": (NUM_OTHER, dim)}
    bad = [f"{k} {arrays[k].shape} (expected {want[k]})" for k in NPZ_KEYS
           if dim is None or arrays[k].shape != want[k]]
    if bad:
      raise SpecialTokenError(f"{source}: wrong shapes: " + "; ".join(bad))
    rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in arrays.items()}
    return cls(rounded["caption_token"][0], rounded["logo_token"][0], rounded["other_tokens"])

  @classmethod
  def load(cls, path: str) -> SpecialTokens:
    if not os.path.exists(path):
      raise SpecialTokenError(f"{path}: special-token file not found")
    try:
      with np.load(path, allow_pickle=False) as z:
        missing = [k for k in NPZ_KEYS if k not in z.files]
        if missing:
          raise SpecialTokenError(f"{path}: missing array(s) {', '.join(missing)}")
        return cls.from_arrays(*(z[k] for k in NPZ_KEYS), source=path)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
      if isinstance(e, SpecialTokenError):
        raise
      raise SpecialTokenError(f"{path}: not a readable .npz file ({e})") from None

  @property
  def dim(self) -> int:
    return int(self.other.shape[-1])

  def token(self, name: str) -> np.ndarray:
    if name == "CAPTION":
      return self.caption
    if name == "LOGO":
      return self.logo
    return self.other[OTHER_ROWS[name]]

  def duration(self, remaining: int) -> np.ndarray:
    """DURATION_k for k = min(remaining, 8) chunks left, including this one."""
    k = min(max(int(remaining), 1), DURATION_MAX)
    return self.other[DURATION_FIRST_ROW + k - 1]
