"""Sampling pipeline: components (DiT, VAE, text encoder, special tokens), request, generate.

`build_from_config` turns a sampling config into the components, request, flags and options
that `generate` takes (the sampling command and the Colab notebook both use it).
"""

from magi_jax.convert.load import ComponentError, load_dit, load_text_encoder, load_vae
from magi_jax.generate.components import Components, load_special_tokens
from magi_jax.generate.from_config import build_from_config
from magi_jax.generate.pipeline import ChunkFrames, Result, encode_prefix, generate, text_rows
from magi_jax.generate.request import MODES, Request, RequestError

__all__ = ["MODES", "ChunkFrames", "ComponentError", "Components", "Request", "RequestError",
           "Result", "build_from_config", "encode_prefix", "generate", "load_dit",
           "load_special_tokens", "load_text_encoder", "load_vae", "text_rows"]
