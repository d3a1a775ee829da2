"""Official weights by Hugging Face repository id: `--config.checkpoint=sand-ai/MAGI-1[@rev]`.

The official repository keeps every released model under one root (its README's model
table; the official loader appends the weight folder to `runtime_config.load`):

  ckpt/magi/<model>/inference_weight[.fp8][.distill]/   the DiT (model = the preset's name:
                                                        4.5B_base, 24B_distill_quant, ...)
  ckpt/vae/                                             the VAE (config.json + safetensors)
  ckpt/t5/t5-v1_1-xxl/                                  T5-XXL, weights and tokenizer

`resolve` fetches just the folders one preset needs with `huggingface_hub.snapshot_download`
(`allow_patterns`), into the user's Hugging Face cache and with their token (`HF_TOKEN` or
`huggingface-cli login`); with `HF_HUB_OFFLINE=1` it resolves from that cache alone. A part
that is not there afterwards raises `HubError` naming the repository, the revision and the
path. The special-token embeddings are not in that repository (the official code reads
`example/assets/special_tokens.npz` of its GitHub repository): pass `--config.special_tokens`.
"""

from __future__ import annotations

import os
import re

from magi_jax.configs import MagiConfig
from magi_jax.errors import MagiError

OFFICIAL_REPO = "sand-ai/MAGI-1"
VAE_DIR = "ckpt/vae"
T5_DIR = "ckpt/t5/t5-v1_1-xxl"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


class HubError(MagiError, OSError):
  pass


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
  """('owner/name', revision or None) when `spec` is a repository id (`owner/name[@rev]`) and
  not a local path that exists; else None."""
  if not spec or os.path.exists(spec) or not _HUB_ID.match(spec):
    return None
  repo, _, revision = spec.partition("@")
  return repo, revision or None


def dit_dir(model: str, cfg: MagiConfig) -> str:
  """The DiT's folder in the repository, suffixed as the official loader does."""
  sub = "inference_weight" + (".fp8" if cfg.engine.fp8_quant else "") + (
      ".distill" if cfg.engine.distill else "")
  return f"ckpt/magi/{model}/{sub}"


def resolve(repo: str, revision: str | None, model: str, cfg: MagiConfig,
            parts=("dit", "vae", "t5")) -> dict[str, str]:
  """{part: local directory} for the preset `model` (its config `cfg`) from the repository."""
  try:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
  except ImportError as e:
    raise HubError(f"hub checkpoint {repo!r}: huggingface_hub is not installed ({e})") from None
  folders = {"dit": dit_dir(model, cfg), "vae": VAE_DIR, "t5": T5_DIR}
  wanted = {p: folders[p] for p in parts}
  where = f"{repo}@{revision or 'main'}"
  try:
    root = snapshot_download(repo, revision=revision,
                             allow_patterns=[f"{d}/*" for d in wanted.values()])
  except LocalEntryNotFoundError as e:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    raise HubError(f"{where}: not in the Hugging Face cache" + (
        " and HF_HUB_OFFLINE is set (unset it to download)" if offline else
        " and the Hub cannot be reached") + f" ({e.__class__.__name__})") from None
  except (HfHubHTTPError, OSError, ValueError) as e:
    raise HubError(f"{where}: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
  out = {}
  for part, folder in wanted.items():
    path = os.path.join(root, folder)
    if not (os.path.isdir(path) and os.listdir(path)):
      raise HubError(f"{where}: no {part.upper()} weights at {folder}/ (the layout of "
                     f"{OFFICIAL_REPO}; preset {model!r})")
    out[part] = path
  return out
